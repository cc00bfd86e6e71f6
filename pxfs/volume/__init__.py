"""Volume lifecycle: specs, create/attach/mount, replica states, resync."""
