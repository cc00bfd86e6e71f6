"""Operator tools: pxctl, the local-cluster launcher."""
