"""On-disk format of one chunk file.

A chunk file holds CHUNK_SIZE bytes of one volume at offset ``idx *
CHUNK_SIZE``.  It starts with a 4 KiB header, then the data, sparse where
never written::

    0    magic "PXCH", format u16, flags u16, volid u64, idx u64,
         csum_block u32, gen u64                    (36 bytes, little endian)
    64   written bitmap, one bit per CSUM_BLOCK     (32 bytes for 256 blocks)
    96   CRC32 per CSUM_BLOCK                       (1024 bytes)
    4096 data

``gen`` is the highest replica-set generation of any write applied to the
chunk: resync copies the chunks whose gen is at least the generation at which
a replica fell out of sync.
"""

from __future__ import annotations

import array
import struct
import zlib

from .. import CHUNK_SIZE, CSUM_BLOCK
from ..errors import InvalidArgument

try:        # the C helper (setup.py builds it): CRCs at ~13 GB/s without the GIL
    from ._crc import block_crcs as _c_block_crcs
except ImportError:         # not built: zlib.crc32 per block, same results
    _c_block_crcs = None

MAGIC = b"PXCH"
FORMAT = 2                 # 2: 64-bit idx (shared volumes key file data by inode)
HEADER_SIZE = 4096
NBLOCKS = CHUNK_SIZE // CSUM_BLOCK
_FIXED = struct.Struct("<4sHHQQIQ")
_FIXED_V1 = struct.Struct("<4sHHQIIQ")     # format 1: 32-bit idx, still read
BITMAP_OFF = 64
CRC_OFF = BITMAP_OFF + NBLOCKS // 8
META_END = CRC_OFF + 4 * NBLOCKS


MAX_IDX = (1 << 64) - 1
MAX_VOLID = (1 << 64) - 1


def check_range(off: int, size: int) -> None:
    if off < 0 or size < 0 or off + size > CHUNK_SIZE:
        raise InvalidArgument(f"range {off}+{size} outside a chunk")


def check_id(volid: int, idx: int) -> None:
    if not 0 <= volid <= MAX_VOLID or not 0 <= idx <= MAX_IDX:
        raise InvalidArgument(f"chunk id {volid}/{idx} out of range")


def block_crcs(data) -> bytes:
    """The CRC32 of each CSUM_BLOCK of ``data`` (whole blocks), packed as
    the chunk header stores them."""
    if _c_block_crcs is not None:
        return _c_block_crcs(data, CSUM_BLOCK)
    mv = memoryview(data)
    crc = zlib.crc32
    return array.array("I", [crc(mv[i:i + CSUM_BLOCK])
                             for i in range(0, len(mv), CSUM_BLOCK)]).tobytes()


class Header:
    __slots__ = ("volid", "idx", "gen", "bitmap", "crcs")

    def __init__(self, volid: int, idx: int, gen: int = 0, bitmap=None, crcs=None):
        self.volid, self.idx, self.gen = volid, idx, gen
        self.bitmap = bytearray(NBLOCKS // 8) if bitmap is None else bytearray(bitmap)
        self.crcs = array.array("I", bytes(4 * NBLOCKS)) if crcs is None else crcs

    def written(self, blk: int) -> bool:
        return bool(self.bitmap[blk >> 3] & (1 << (blk & 7)))

    def all_written(self, first: int, last: int) -> bool:
        """Whether every block first..last (inclusive) was ever written."""
        mask = ((1 << (last - first + 1)) - 1) << first
        return int.from_bytes(self.bitmap, "little") & mask == mask

    def mark(self, blk: int, crc: int) -> None:
        self.bitmap[blk >> 3] |= 1 << (blk & 7)
        self.crcs[blk] = crc

    def mark_range(self, first: int, crcs: bytes) -> None:
        """Mark blocks first.. written with the packed CRC32s ``crcs``."""
        n = len(crcs) // 4
        self.crcs[first:first + n] = array.array("I", crcs)
        blk, end = first, first + n
        while blk < end and blk & 7:                  # up to a byte boundary
            self.bitmap[blk >> 3] |= 1 << (blk & 7)
            blk += 1
        whole = (end - blk) >> 3                      # then whole bytes at once
        if whole:
            self.bitmap[blk >> 3:(blk >> 3) + whole] = b"\xff" * whole
            blk += whole << 3
        while blk < end:
            self.bitmap[blk >> 3] |= 1 << (blk & 7)
            blk += 1

    def unmark_range(self, first: int, last: int) -> None:
        """Mark blocks first..last (inclusive) never written: they read as
        zeros (a discard)."""
        mask = ((1 << (last - first + 1)) - 1) << first
        bits = int.from_bytes(self.bitmap, "little") & ~mask
        self.bitmap[:] = bits.to_bytes(len(self.bitmap), "little")

    def pack(self) -> bytes:
        fixed = _FIXED.pack(MAGIC, FORMAT, 0, self.volid, self.idx, CSUM_BLOCK, self.gen)
        return (fixed.ljust(BITMAP_OFF, b"\0") + bytes(self.bitmap) + self.crcs.tobytes())

    @classmethod
    def unpack(cls, raw: bytes) -> "Header":
        if len(raw) < META_END:
            raise ValueError("short chunk header")
        magic, fmt, _flags, volid, idx, cblock, gen = _fixed(raw).unpack_from(raw)
        if magic != MAGIC or cblock != CSUM_BLOCK:
            raise ValueError("not a pxfs chunk header")
        crcs = array.array("I")
        crcs.frombytes(raw[CRC_OFF:META_END])
        return cls(volid, idx, gen, raw[BITMAP_OFF:CRC_OFF], crcs)

    @staticmethod
    def read_gen(raw: bytes) -> int:
        fields = _fixed(raw).unpack_from(raw)
        if fields[0] != MAGIC:
            raise ValueError("not a chunk header")
        return fields[6]


def _fixed(raw: bytes) -> struct.Struct:
    fmt = struct.unpack_from("<H", raw, 4)[0] if len(raw) >= 6 else 0
    if fmt == FORMAT:
        return _FIXED
    if fmt == 1:
        return _FIXED_V1
    raise ValueError(f"unknown chunk format {fmt}")
