"""pxfs: replicated software-defined storage for containers."""

__version__ = "0.1.0"

#: A volume is cut into chunks of this size.  1 MiB keeps a chunk's block
#: checksums in one 4 KiB header, makes resync and copy-on-write granular
#: enough for databases, and is the size of the largest FUSE write request.
CHUNK_SIZE = 1 << 20

#: Every CSUM_BLOCK bytes of a chunk carry their own CRC32.  4 KiB is the
#: block size of ext4/xfs on our volumes, so their writes never need a
#: read-modify-write.
CSUM_BLOCK = 4096

#: Largest RPC frame (a whole chunk plus headers).
MAX_FRAME = CHUNK_SIZE + 64 * 1024
