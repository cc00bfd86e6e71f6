"""The REST control plane (what pxctl talks to)."""
