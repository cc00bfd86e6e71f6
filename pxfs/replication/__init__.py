"""Replica service, fan-out writes, read repair and resync."""
