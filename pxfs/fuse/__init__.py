"""The node's FUSE view: the only place that imports pyfuse3."""
