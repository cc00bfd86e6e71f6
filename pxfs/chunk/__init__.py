"""Local chunk storage on a node's pool."""
