"""Node-to-node requests: length-prefixed msgpack frames over TCP."""
