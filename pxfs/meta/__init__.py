"""Cluster metadata: the etcd key schema, the KV interface and transactions."""
