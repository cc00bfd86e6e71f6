"""The local chunk store (pxfs/chunk/store.py) on a tmp directory: data,
checksums, thin files, whole-chunk copies, fencing terms, eviction."""

import os
import platform
import subprocess
import threading
import time

import pytest

from pxfs import CHUNK_SIZE, CSUM_BLOCK
from pxfs.chunk.layout import HEADER_SIZE, NBLOCKS, block_crcs
from pxfs.chunk.store import ChunkStore
from pxfs.errors import ChecksumError, InvalidArgument, PxfsError

from conftest import drop_cache

VOL = 7


@pytest.fixture
def store(tmp_path):
    s = ChunkStore([str(tmp_path / "pool")])
    yield s
    s.close()


def chunk_path(root, volid, idx):
    return os.path.join(str(root), "vols", str(volid), f"{idx:08x}.chk")


def pattern(n, seed=1):
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def flip_byte(path, pos):
    with open(path, "r+b") as fh:
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0xFF]))


# -- data --------------------------------------------------------------------------
@pytest.mark.parametrize("off, size", [
    (0, CSUM_BLOCK),                       # exactly one block
    (100, 10),                             # inside one block
    (CSUM_BLOCK - 7, 20),                  # across a block boundary
    (3 * CSUM_BLOCK + 5, 5 * CSUM_BLOCK),  # several blocks, both ends unaligned
    (CHUNK_SIZE - 3, 3),                   # the chunk's last bytes
    (0, CHUNK_SIZE),                       # the whole chunk
])
def test_write_read_round_trip(store, off, size):
    data = pattern(size)
    store.write(VOL, 0, off, data, gen=1)
    assert store.read(VOL, 0, off, size) == data
    # the bytes around the write are still zero
    lo, hi = max(0, off - 9), min(CHUNK_SIZE, off + size + 9)
    around = store.read(VOL, 0, lo, hi - lo)
    assert around == bytes(off - lo) + data + bytes(hi - off - size)


def test_overlapping_writes(store):
    store.write(VOL, 0, 0, b"a" * 10000, gen=1)
    store.write(VOL, 0, 5000, b"b" * 100, gen=1)
    want = b"a" * 5000 + b"b" * 100 + b"a" * 4900
    assert store.read(VOL, 0, 0, 10000) == want


def test_data_survives_a_new_instance(tmp_path):
    root = str(tmp_path / "pool")
    s = ChunkStore([root])
    s.write(VOL, 3, 777, pattern(9000), gen=1)
    s.sync(VOL)
    s.close()
    s2 = ChunkStore([root])
    assert s2.read(VOL, 3, 777, 9000) == pattern(9000)
    s2.close()


def test_thin_reads_zeros(store):
    assert store.read(VOL, 5, 0, 4096) == bytes(4096)          # no volume at all
    store.write(VOL, 0, 0, b"x", gen=1)
    assert store.read(VOL, 1, 1000, 50) == bytes(50)           # no such chunk
    assert store.read(VOL, 0, CSUM_BLOCK, 8192) == bytes(8192)  # unwritten blocks


def test_chunk_file_is_sparse(store, tmp_path):
    store.write(VOL, 0, 0, b"head", gen=1)
    store.write(VOL, 0, CHUNK_SIZE - 4, b"tail", gen=1)
    store.sync(VOL)
    st = os.stat(chunk_path(tmp_path / "pool", VOL, 0))
    assert st.st_size == HEADER_SIZE + CHUNK_SIZE
    assert st.st_blocks * 512 <= 64 * 1024                   # header + two blocks, not 1 MiB
    assert store.read(VOL, 0, CHUNK_SIZE // 2, 4096) == bytes(4096)
    assert store.usage(VOL) == st.st_blocks * 512


def test_empty_write_and_read(store):
    store.write(VOL, 0, 10, b"", gen=1)
    assert store.read(VOL, 0, 10, 0) == b""
    assert store.list_chunks(VOL) == {}


@pytest.mark.parametrize("off, size", [(CHUNK_SIZE - 1, 2), (CHUNK_SIZE, 1), (-1, 1),
                                       (0, CHUNK_SIZE + 1)])
def test_write_beyond_chunk(store, off, size):
    with pytest.raises(InvalidArgument, match="outside a chunk"):
        store.write(VOL, 0, off, b"x" * size, gen=1)
    assert store.list_chunks(VOL) == {}


@pytest.mark.parametrize("volid, idx", [(VOL, 2**64), (VOL, -1)])
def test_write_bad_chunk_id(store, volid, idx):
    # ids that do not fit the chunk header (u64 volid, u32 idx) are bad input,
    # not a struct.error escaping from the store
    with pytest.raises(InvalidArgument):
        store.write(volid, idx, 0, b"x", gen=1)


@pytest.mark.parametrize("off, size", [(CHUNK_SIZE - 1, 2), (-1, 1), (0, -1)])
def test_read_beyond_chunk(store, off, size):
    with pytest.raises(InvalidArgument):
        store.read(VOL, 0, off, size)


# -- checksums ---------------------------------------------------------------------
def test_corrupt_byte_raises_checksum_error(store, tmp_path):
    store.write(VOL, 0, 0, pattern(3 * CSUM_BLOCK), gen=1)
    store.sync(VOL)
    flip_byte(chunk_path(tmp_path / "pool", VOL, 0), HEADER_SIZE + CSUM_BLOCK + 123)
    with pytest.raises(ChecksumError) as ei:
        store.read(VOL, 0, CSUM_BLOCK + 100, 50)
    assert ei.value.blocks == [1]
    # the blocks on either side are still good
    assert store.read(VOL, 0, 0, CSUM_BLOCK) == pattern(CSUM_BLOCK)
    assert store.read(VOL, 0, 2 * CSUM_BLOCK, CSUM_BLOCK) == pattern(3 * CSUM_BLOCK)[2 * CSUM_BLOCK:]
    with pytest.raises(ChecksumError):
        store.get_chunk(VOL, 0)


def test_corruption_seen_by_a_new_instance(tmp_path):
    root = str(tmp_path / "pool")
    s = ChunkStore([root])
    s.write(VOL, 0, 0, pattern(CSUM_BLOCK), gen=1)
    s.close()
    flip_byte(chunk_path(root, VOL, 0), HEADER_SIZE + 5)
    s2 = ChunkStore([root])
    with pytest.raises(ChecksumError):
        s2.read(VOL, 0, 0, 10)
    s2.close()


def test_bad_header_is_checksum_error(tmp_path):
    root = str(tmp_path / "pool")
    s = ChunkStore([root])
    s.write(VOL, 0, 0, b"x", gen=1)
    s.close()
    flip_byte(chunk_path(root, VOL, 0), 0)            # the magic
    s2 = ChunkStore([root])
    with pytest.raises(ChecksumError, match="bad header"):
        s2.read(VOL, 0, 0, 1)
    s2.close()


def test_partial_write_does_not_hide_corruption(store, tmp_path):
    # A write that covers only part of a corrupted block must not recompute
    # the block's CRC over the bad bytes: the corruption would become silent.
    store.write(VOL, 0, 0, pattern(CSUM_BLOCK), gen=1)
    store.sync(VOL)
    flip_byte(chunk_path(tmp_path / "pool", VOL, 0), HEADER_SIZE + 3000)
    try:
        store.write(VOL, 0, 100, b"new", gen=2)
    except ChecksumError:
        return                                      # refusing the write is fine too
    with pytest.raises(ChecksumError):
        store.read(VOL, 0, 0, CSUM_BLOCK)


def test_crc_helper_matches_zlib():
    # The C helper must give zlib's CRC32 bit for bit (the on-disk format):
    # every length around the 64- and 16-byte steps of the folding path
    # (one block of that length), and a whole chunk.
    import random
    import struct
    import zlib
    from pxfs.chunk import _crc
    if platform.machine() == "x86_64":
        assert _crc.accelerated, "PCLMULQDQ path not used on x86-64"
    rnd = random.Random(5)
    for n in [*range(1, 200), 4095, 4096, 4097, 65536 + 13, CHUNK_SIZE]:
        data = rnd.randbytes(n)
        assert _crc.block_crcs(data, n) == struct.pack("=I", zlib.crc32(data)), n
    assert _crc.block_crcs(memoryview(b"123456789"), 9) == struct.pack("=I", 0xCBF43926)


def test_block_crcs_match_the_per_block_reference(monkeypatch):
    import array
    import zlib
    from pxfs.chunk import _crc, layout
    data = os.urandom(CHUNK_SIZE)
    want = array.array("I", [zlib.crc32(data[i:i + CSUM_BLOCK])
                             for i in range(0, CHUNK_SIZE, CSUM_BLOCK)]).tobytes()
    assert block_crcs(data) == want
    with monkeypatch.context() as m:            # the fallback when _crc is not built
        m.setattr(layout, "_c_block_crcs", None)
        assert block_crcs(data) == want
    assert block_crcs(bytearray(data[:CSUM_BLOCK])) == want[:4]
    assert block_crcs(b"") == b""
    for bad in [(data[:100], CSUM_BLOCK), (data, 0), (data, -4096)]:
        with pytest.raises(ValueError, match="multiple"):
            _crc.block_crcs(*bad)
    with pytest.raises(TypeError):
        _crc.block_crcs("text", 4)


def test_all_written_bitmap_ranges():
    from pxfs.chunk.layout import Header
    h = Header(1, 0)
    h.mark_range(3, bytes(4 * 30))              # blocks 3..32
    assert h.all_written(3, 32) and h.all_written(8, 15) and h.all_written(5, 5)
    assert not h.all_written(2, 32) and not h.all_written(3, 33)
    assert not h.all_written(0, NBLOCKS - 1)
    h.mark_range(0, bytes(4 * NBLOCKS))
    assert h.all_written(0, NBLOCKS - 1)
    h.bitmap[10] &= ~(1 << 3)                   # block 83 unwritten
    assert not h.all_written(64, 127) and h.all_written(84, 127) and h.all_written(0, 82)


def test_unmark_range_clears_only_its_blocks():
    from pxfs.chunk.layout import Header
    for first, last in [(0, 0), (3, 17), (8, 15), (0, NBLOCKS - 1), (250, 255), (7, 8)]:
        h = Header(VOL, 0)
        h.mark_range(0, bytes(4 * NBLOCKS))
        h.unmark_range(first, last)
        assert [b for b in range(NBLOCKS) if not h.written(b)] == list(range(first, last + 1))


def test_trim_reads_zeros_keeps_the_rest_and_bumps_the_gen(store, tmp_path):
    data = pattern(32 * CSUM_BLOCK)
    store.write(VOL, 0, 0, data, gen=5)
    assert store.trim(VOL, 0, 4, 9, gen=9) is False
    want = data[:4 * CSUM_BLOCK] + bytes(6 * CSUM_BLOCK) + data[10 * CSUM_BLOCK:]
    assert store.read(VOL, 0, 0, len(data)) == want
    assert store.list_chunks(VOL) == {0: 9}
    store.sync(VOL)
    again = ChunkStore([str(tmp_path / "pool")])        # the header on disk says so too
    try:
        assert again.read(VOL, 0, 0, len(data)) == want
    finally:
        again.close()
    # a trimmed block written again reads its new data
    store.write(VOL, 0, 5 * CSUM_BLOCK, b"n" * CSUM_BLOCK, gen=10)
    assert store.read(VOL, 0, 5 * CSUM_BLOCK, CSUM_BLOCK) == b"n" * CSUM_BLOCK


def test_trimmed_blocks_give_their_space_back_once_synced(store, tmp_path):
    """The hole is punched only after the sync that made the header
    durable (never before: a crash between the two would leave blocks whose
    checksum does not match), and only where no write took a block again."""
    B = CSUM_BLOCK
    data = pattern(64 * B)
    store.write(VOL, 0, 0, data, gen=1)
    store.sync(VOL)
    path = chunk_path(tmp_path / "pool", VOL, 0)
    full = os.stat(path).st_blocks
    store.trim(VOL, 0, 8, 39, gen=2)
    assert os.stat(path).st_blocks == full              # the header is not durable yet
    store.write(VOL, 0, 20 * B, b"n" * B, gen=3)        # one block taken again
    store.sync(VOL)
    assert os.stat(path).st_blocks <= full - 31 * B // 512
    want = data[:8 * B] + bytes(12 * B) + b"n" * B + bytes(19 * B) + data[40 * B:]
    assert store.read(VOL, 0, 0, 64 * B) == want
    store.write(VOL, 0, 30 * B, b"m" * B, gen=4)        # a punched block written again
    store.sync(VOL)
    want = want[:30 * B] + b"m" * B + want[31 * B:]
    again = ChunkStore([str(tmp_path / "pool")])
    try:
        drop_cache(path)
        assert again.read(VOL, 0, 0, 64 * B) == want
    finally:
        again.close()


def _allocated(path, blk: int) -> bool:
    """Whether block ``blk`` of a chunk file holds space (is not a hole)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = HEADER_SIZE + blk * CSUM_BLOCK
        try:
            return os.lseek(fd, pos, os.SEEK_DATA) == pos
        except OSError:
            return False                # ENXIO: nothing but holes from there
    finally:
        os.close(fd)


def test_a_block_trimmed_again_during_a_sync_waits_for_the_next(store, tmp_path, monkeypatch):
    """A write and a second trim of a block between the moment a sync takes
    its list of trims and the moment it punches: the header on the disk may
    mark that block written again, so its hole waits for the next sync."""
    B = CSUM_BLOCK
    store.write(VOL, 0, 0, pattern(64 * B), gen=1)
    store.sync(VOL)
    path = chunk_path(tmp_path / "pool", VOL, 0)
    store.trim(VOL, 0, 8, 15, gen=2)
    punch = store._punch

    def racing_punch(ch, ranges):
        store.write(VOL, 0, 10 * B, b"w" * B, gen=3)
        store.trim(VOL, 0, 10, 10, gen=4)
        punch(ch, ranges)

    monkeypatch.setattr(store, "_punch", racing_punch)
    store.sync(VOL)
    monkeypatch.setattr(store, "_punch", punch)
    assert [_allocated(path, b) for b in range(8, 16)] == [
        False, False, True, False, False, False, False, False]
    store.sync(VOL)
    assert not _allocated(path, 10)
    assert store.read(VOL, 0, 8 * B, 8 * B) == bytes(8 * B)


def test_trim_of_all_a_chunk_holds_deletes_it(store, tmp_path):
    store.write(VOL, 3, 10 * CSUM_BLOCK, pattern(2 * CSUM_BLOCK), gen=1)
    assert store.trim(VOL, 3, 11, 11, gen=2) is False
    assert store.trim(VOL, 3, 0, 10, gen=3) is True
    assert not os.path.exists(chunk_path(tmp_path / "pool", VOL, 3))
    assert store.read(VOL, 3, 0, CHUNK_SIZE) == bytes(CHUNK_SIZE)
    assert store.trim(VOL, 4, 0, 1, gen=3) is True                # never there


@pytest.mark.parametrize("first, last", [(5, 4), (-1, 3), (0, NBLOCKS), (NBLOCKS, NBLOCKS)])
def test_trim_outside_the_chunk_is_refused(store, first, last):
    store.write(VOL, 0, 0, pattern(CSUM_BLOCK), gen=1)
    with pytest.raises(InvalidArgument):
        store.trim(VOL, 0, first, last, gen=2)
    assert store.read(VOL, 0, 0, CSUM_BLOCK) == pattern(CSUM_BLOCK)


def test_reads_mixing_written_and_unwritten_blocks(store):
    store.write(VOL, 0, CSUM_BLOCK, pattern(CSUM_BLOCK), gen=1)
    store.write(VOL, 0, 3 * CSUM_BLOCK, pattern(CSUM_BLOCK, 2), gen=1)
    got = store.read(VOL, 0, 0, 5 * CSUM_BLOCK)
    assert got == (bytes(CSUM_BLOCK) + pattern(CSUM_BLOCK) + bytes(CSUM_BLOCK)
                   + pattern(CSUM_BLOCK, 2) + bytes(CSUM_BLOCK))


# -- generations and whole chunks ---------------------------------------------------
def test_list_chunks_filters_by_gen(store):
    stamps = {0: 5, 1: 10, 2: 7, 9: 1 << 32}
    for idx, gen in stamps.items():
        store.write(VOL, idx, 0, b"x", gen=gen)
    assert store.list_chunks(VOL) == stamps
    assert store.list_chunks(VOL, 7) == {1: 10, 2: 7, 9: 1 << 32}
    assert store.list_chunks(VOL, 11) == {9: 1 << 32}
    assert store.list_chunks(VOL, (1 << 32) + 1) == {}
    assert store.list_chunks(VOL + 1) == {}


def test_gen_only_grows(store):
    store.write(VOL, 0, 0, b"x", gen=10)
    store.write(VOL, 0, 0, b"y", gen=3)
    assert store.list_chunks(VOL) == {0: 10}


def test_list_chunks_from_disk(tmp_path):
    root = str(tmp_path / "pool")
    s = ChunkStore([root])
    s.write(VOL, 0, 0, b"x", gen=4)
    s.write(VOL, 1, 0, b"x", gen=8)
    s.close()
    s2 = ChunkStore([root])                         # nothing open: gens read from headers
    assert s2.list_chunks(VOL, 5) == {1: 8}
    s2.close()
    # a chunk whose header cannot be read is listed whatever the bound: a
    # resync must replace it, not skip it
    flip_byte(chunk_path(root, VOL, 0), 0)
    s3 = ChunkStore([root])
    assert s3.list_chunks(VOL, 5) == {0: 5, 1: 8}
    s3.close()


def test_get_put_chunk_round_trip(store, tmp_path):
    store.write(VOL, 2, 10, pattern(5000), gen=42)
    store.write(VOL, 2, CHUNK_SIZE - CSUM_BLOCK, pattern(CSUM_BLOCK, 9), gen=40)
    gen, bitmap, data = store.get_chunk(VOL, 2)
    assert gen == 42 and len(bitmap) == NBLOCKS // 8 and len(data) == CHUNK_SIZE
    assert bitmap[0] == 0b11 and bitmap[-1] == 0x80 and not any(bitmap[1:-1])

    other = ChunkStore([str(tmp_path / "other")])
    other.put_chunk(VOL, 2, gen, bitmap, data)
    assert other.get_chunk(VOL, 2) == (gen, bitmap, data)
    assert other.read(VOL, 2, 10, 5000) == pattern(5000)
    assert other.list_chunks(VOL) == {2: 42}
    # unwritten blocks stay holes in the copy
    st = os.stat(chunk_path(tmp_path / "other", VOL, 2))
    assert st.st_blocks * 512 <= 64 * 1024
    other.close()


def test_put_chunk_replaces_an_open_chunk(store):
    store.write(VOL, 0, 0, b"old" * 1000, gen=1)
    assert store.read(VOL, 0, 0, 3) == b"old"
    bitmap = bytes([1]) + bytes(NBLOCKS // 8 - 1)
    data = b"N" * CSUM_BLOCK + bytes(CHUNK_SIZE - CSUM_BLOCK)
    store.put_chunk(VOL, 0, 9, bitmap, data)
    assert store.read(VOL, 0, 0, CSUM_BLOCK) == b"N" * CSUM_BLOCK
    assert store.list_chunks(VOL) == {0: 9}


def test_put_chunk_leaves_no_descriptor_of_the_old_file(tmp_path, monkeypatch):
    """A chunk opened by another thread while put_chunk replaces it is the
    new file: no descriptor of the replaced one stays in the cache, where
    later writes would go to a file that is gone."""
    store = ChunkStore([str(tmp_path)])
    store.write(1, 0, 0, b"o" * 4096, 1)
    store.sync(1)
    store._evict(1, 0)                          # closed, as after LRU eviction
    real_rename, seen, threads = os.rename, [], []

    def racing_rename(src, dst):
        t = threading.Thread(target=lambda: seen.append(store.read(1, 0, 0, 4096)))
        threads.append(t)
        t.start()
        t.join(0.3)                              # the old file is still in place here
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", racing_rename)
    store.put_chunk(1, 0, 2, b"\xff" * (NBLOCKS // 8), b"n" * CHUNK_SIZE)
    monkeypatch.undo()
    threads[0].join()
    assert seen == [b"n" * 4096]
    store.write(1, 0, 4096, b"w" * 4096, 3)      # goes to the new file
    store.sync(1)
    store.close()
    again = ChunkStore([str(tmp_path)])
    assert again.read(1, 0, 0, 8192) == b"n" * 4096 + b"w" * 4096
    again.close()


def test_put_chunk_none_deletes(store, tmp_path):
    store.write(VOL, 4, 0, b"data", gen=3)
    store.put_chunk(VOL, 4, 0, None, None)
    assert not os.path.exists(chunk_path(tmp_path / "pool", VOL, 4))
    assert store.get_chunk(VOL, 4) is None
    assert store.read(VOL, 4, 0, 4) == bytes(4)
    assert store.list_chunks(VOL) == {}
    store.put_chunk(VOL, 4, 0, None, None)          # deleting again is fine


def test_get_chunk_absent(store):
    assert store.get_chunk(VOL, 0) is None


@pytest.mark.parametrize("bitmap, data", [(bytes(NBLOCKS // 8), bytes(10)),
                                          (None, bytes(CHUNK_SIZE)),
                                          (bytes(3), bytes(CHUNK_SIZE))])
def test_put_chunk_refuses_partial(store, bitmap, data):
    with pytest.raises(InvalidArgument, match="whole chunk"):
        store.put_chunk(VOL, 0, 1, bitmap, data)


# -- terms, volumes ------------------------------------------------------------------
def test_term_persists(tmp_path):
    root = str(tmp_path / "pool")
    s = ChunkStore([root])
    assert s.get_term(VOL) == 0
    s.set_term(VOL, 5)
    assert s.get_term(VOL) == 5
    s.close()
    s2 = ChunkStore([root])
    assert s2.get_term(VOL) == 5
    s2.set_term(VOL, 6)
    assert ChunkStore([root]).get_term(VOL) == 6
    s2.close()


def test_delete_volume(store, tmp_path):
    store.write(VOL, 0, 0, b"a", gen=1)
    store.write(VOL, 1, 0, b"b", gen=1)
    store.write(VOL + 1, 0, 0, b"keep", gen=1)
    store.set_term(VOL, 3)
    assert sorted(store.volumes()) == [VOL, VOL + 1]
    store.delete_volume(VOL)
    assert store.volumes() == [VOL + 1]
    assert not os.path.exists(os.path.join(str(tmp_path / "pool"), "vols", str(VOL)))
    assert store.read(VOL, 0, 0, 1) == b"\0"
    assert store.list_chunks(VOL) == {} and store.get_term(VOL) == 0 and store.usage(VOL) == 0
    assert store.read(VOL + 1, 0, 0, 4) == b"keep"
    # the volume id can be used again
    store.write(VOL, 0, 0, b"again", gen=1)
    assert store.read(VOL, 0, 0, 5) == b"again"
    store.delete_volume(12345)                      # unknown volume: nothing to do


def test_two_roots(tmp_path):
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    s = ChunkStore(roots)
    s.write(1, 0, 0, b"one", gen=1)
    s.write(2, 0, 0, b"two", gen=1)
    s.close()
    s2 = ChunkStore(roots)
    assert s2.read(1, 0, 0, 3) == b"one" and s2.read(2, 0, 0, 3) == b"two"
    assert sorted(s2.volumes()) == [1, 2]
    s2.close()


# -- open-file cache -----------------------------------------------------------------
def test_lru_eviction_keeps_data(tmp_path):
    root = str(tmp_path / "pool")
    s = ChunkStore([root], max_open=2)
    for idx in range(6):
        s.write(VOL, idx, idx * 100, pattern(5000, idx), gen=idx + 1)
        assert len(s._open) <= 2
    for idx in range(6):
        assert s.read(VOL, idx, idx * 100, 5000) == pattern(5000, idx)
    assert s.list_chunks(VOL) == {i: i + 1 for i in range(6)}
    # writes to an evicted chunk continue where they left off
    s.write(VOL, 0, 0, b"Z", gen=9)
    assert s.read(VOL, 0, 0, 1) == b"Z" and s.read(VOL, 0, 1, 4999) == pattern(5000, 0)[1:]
    s.sync(VOL)
    s.close()
    s2 = ChunkStore([root])
    for idx in range(1, 6):
        assert s2.read(VOL, idx, idx * 100, 5000) == pattern(5000, idx)
    s2.close()


def test_nowait_io_refuses_to_block(tmp_path):
    """Inline (trio-thread) I/O never opens files or waits for a busy chunk."""
    store = ChunkStore([str(tmp_path)])
    store.write(1, 0, 0, b"x" * 4096, 1)
    store.close()
    store = ChunkStore([str(tmp_path)])
    with pytest.raises(BlockingIOError):
        store.read(1, 0, 0, 4096, nowait=True)       # not open yet
    assert store.read(1, 0, 0, 4096) == b"x" * 4096   # opens it
    assert store.read(1, 0, 0, 4096, nowait=True) == b"x" * 4096
    ch = store._open[(1, 0)]
    with ch.lock:                                      # another thread holds it
        with pytest.raises(BlockingIOError):
            store.write(1, 0, 0, b"y" * 4096, 2, nowait=True)


def _resident(path) -> int:
    """Bytes of the file in the page cache, asked without reading it."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def test_nowait_reads_of_blocks_never_written_are_zeros(tmp_path, monkeypatch):
    """A no-wait read that comes up short because the file ends (or has a
    hole) where blocks were never written is complete: those read as zeros.
    One that is short on a written block is a miss."""
    store = ChunkStore([str(tmp_path)])
    store.write(1, 0, 0, b"x" * 4096, 1)
    store.write(1, 0, 8 * 4096, b"y" * 4096, 1)
    store.sync(1)
    assert store.read(1, 0, 16 * 4096, 8192, nowait=True) == bytes(8192)     # past the end
    assert store.read(1, 0, 4096, 4096, nowait=True) == bytes(4096)          # a hole
    real_preadv = os.preadv

    def short_at(limit):
        """preadv that finds only the pages before file offset ``limit``
        cached (the kernel's answer when the next one is not)."""
        def preadv(fd, bufs, pos, flags=0):
            n = max(0, min(len(bufs[0]), limit - pos))
            return real_preadv(fd, [memoryview(bufs[0])[:n]], pos, flags) if n else 0
        return preadv
    monkeypatch.setattr(os, "preadv", short_at(HEADER_SIZE + 8 * 4096))
    with pytest.raises(BlockingIOError):
        store.read(1, 0, 4 * 4096, 5 * 4096, nowait=True)   # the hole in, block 8 not
    monkeypatch.setattr(os, "preadv", short_at(HEADER_SIZE + 2 * 4096))
    assert store.read(1, 0, 0, 4 * 4096, nowait=True) == b"x" * 4096 + bytes(3 * 4096)
    monkeypatch.undo()
    assert store.read(1, 0, 4 * 4096, 5 * 4096) == bytes(4 * 4096) + b"y" * 4096
    store.close()


def test_nowait_reads_refused_by_the_filesystem(tmp_path, monkeypatch):
    """A pool that refuses RWF_NOWAIT reads (EOPNOTSUPP) turns them into
    misses, once and for all; plain reads go on."""
    store = ChunkStore([str(tmp_path)])
    store.write(1, 0, 0, b"x" * 4096, 1)
    calls = []

    def refusing(fd, bufs, pos, flags=0):
        calls.append(flags)
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(os, "preadv", refusing)
    with pytest.raises(BlockingIOError):
        store.read(1, 0, 0, 4096, nowait=True)
    assert not store.nowait_reads
    with pytest.raises(BlockingIOError):
        store.read(1, 0, 0, 4096, nowait=True)
    assert len(calls) == 1                               # not asked again
    monkeypatch.undo()
    assert store.read(1, 0, 0, 4096) == b"x" * 4096
    store.close()


def test_prefetch_brings_blocks_into_the_page_cache(tmp_path):
    """prefetch asks the kernel for the blocks (WILLNEED) and returns at
    once; they then arrive in the page cache without any read."""
    store = ChunkStore([str(tmp_path)])
    store.write(1, 0, 0, os.urandom(CHUNK_SIZE), 1)
    store.sync(1)
    path = chunk_path(tmp_path, 1, 0)
    drop_cache(path)
    assert _resident(path) == 0
    assert store.prefetch(1, 0, 64 * 4096, 2 * 4096)
    for _ in range(500):
        if _resident(path) >= 2 * 4096:
            break
        time.sleep(0.01)
    assert 2 * 4096 <= _resident(path) < CHUNK_SIZE
    assert not store.prefetch(1, 5, 0, 4096)               # not open: nothing asked
    with pytest.raises(InvalidArgument):
        store.prefetch(1, 0, CHUNK_SIZE - 1, 2)
    store.close()


@pytest.fixture(scope="module")
def xfs_dir(tmp_path_factory):
    """A small XFS filesystem on a loop device: the pool format, which takes
    buffered writes with RWF_NOWAIT."""
    base = tmp_path_factory.mktemp("xfs")
    img, mnt = base / "img", base / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "512M", str(img)], check=True)
    subprocess.run(["mkfs.xfs", "-q", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_nowait_writes_on_xfs(xfs_dir):
    import time
    store = ChunkStore([str(xfs_dir)])
    store.write(1, 0, 0, b"x" * 8192, 1)                 # opens (and creates) it
    store.write(1, 0, 4096, b"y" * 4096, 2, nowait=True)  # page cache takes it at once
    assert store.nowait_writes
    # chunk files are opened by XFS handle (no timestamp updates), so a
    # no-wait write is not refused just because the clock ticked
    big = os.urandom(256 * 1024)
    for i in range(10):
        time.sleep(0.01)
        store.write(1, 2, 0, big, 3, nowait=True) if i else store.write(1, 2, 0, big, 3)
    assert store.read(1, 2, 0, len(big)) == big
    with pytest.raises(BlockingIOError):                 # partial blocks need a read
        store.write(1, 0, 10, b"z", 3, nowait=True)
    with pytest.raises(BlockingIOError):                 # chunk not open
        store.write(1, 1, 0, b"z" * 4096, 3, nowait=True)
    assert store.read(1, 0, 0, 8192) == b"x" * 4096 + b"y" * 4096
    store.sync(1)
    store.close()
    again = ChunkStore([str(xfs_dir)])
    assert again.read(1, 0, 0, 8192) == b"x" * 4096 + b"y" * 4096
    assert again.list_chunks(1) == {0: 2, 2: 3}
    again.close()


def test_nowait_writes_refused_by_ext4(tmp_path):
    """ext4 refuses buffered RWF_NOWAIT writes: the store notes it once and
    the write changes nothing (the caller retries in a thread)."""
    if subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                      text=True).stdout.strip() != "ext2/ext3":
        pytest.skip("tmp_path is not on ext4")
    store = ChunkStore([str(tmp_path)])
    store.write(1, 0, 0, b"x" * 4096, 1)
    with pytest.raises(BlockingIOError):
        store.write(1, 0, 0, b"y" * 4096, 2, nowait=True)
    assert not store.nowait_writes
    assert store.read(1, 0, 0, 4096) == b"x" * 4096
    assert store.list_chunks(1) == {0: 1}


def test_given_checksums_are_stored_and_checked_on_read(tmp_path):
    """A replica stores the CRCs computed where the data entered pxfs: a
    block damaged on its way is caught by its first read."""
    store = ChunkStore([str(tmp_path)])
    good = b"a" * 4096 + b"b" * 4096
    crcs = block_crcs(good)
    damaged = b"a" * 4096 + b"B" + b"b" * 4095
    store.write(1, 0, 0, damaged, 1, crcs=crcs)
    assert store.read(1, 0, 0, 4096) == b"a" * 4096
    with pytest.raises(ChecksumError) as err:
        store.read(1, 0, 4096, 4096)
    assert err.value.blocks == [1]
    for off, data, c in [(1, good, crcs), (0, good[:100], crcs), (0, good, crcs[:4])]:
        with pytest.raises(InvalidArgument):
            store.write(1, 0, off, data, 1, crcs=c)


async def test_replica_service_falls_back_to_a_thread(tmp_path):
    from pxfs.replication.replica import ReplicaService
    store = ChunkStore([str(tmp_path)])
    svc = ReplicaService(store)
    await svc.write(7, 3, 0, b"z" * 8192, 1, 1)
    store.close()
    svc = ReplicaService(ChunkStore([str(tmp_path)]))
    assert await svc.read(7, 3, 0, 8192) == b"z" * 8192


def test_sync_covers_chunks_evicted_while_dirty(tmp_path):
    store = ChunkStore([str(tmp_path)], max_open=1)
    store.write(5, 0, 0, b"a" * 4096, 1)
    store.write(5, 1, 0, b"b" * 4096, 1)         # evicts chunk 0 while it is dirty
    assert store._unsynced.get(5)
    store.sync(5)
    assert not store._unsynced.get(5) and not store._dirty.get(5)
    assert store.read(5, 0, 0, 4096) == b"a" * 4096


def test_chunks_evicted_while_dirty_keep_few_descriptors(tmp_path, monkeypatch):
    """A long run of writes to many chunks with no sync (a mkfs of a huge
    volume) keeps at most UNSYNCED_MAX evicted descriptors: past that they
    are synced and closed, and the open files stay bounded."""
    from pxfs.chunk import store as store_mod
    monkeypatch.setattr(store_mod, "UNSYNCED_MAX", 8)
    store = ChunkStore([str(tmp_path)], max_open=4)
    before = len(os.listdir("/proc/self/fd"))
    most = 0
    for idx in range(200):
        for vol in (9, 10):                     # the cap holds for all volumes together
            store.write(vol, idx, 0, bytes([idx % 251 + 1]) * 4096, 1)
            most = max(most, len(os.listdir("/proc/self/fd")) - before)
            assert sum(map(len, store._unsynced.values())) < 8
    assert most <= 4 + 8 + 3, most
    for vol in (9, 10):
        store.sync(vol)
        assert not store._unsynced.get(vol) and not store._dirty.get(vol)
        assert all(store.read(vol, idx, 0, 4096) == bytes([idx % 251 + 1]) * 4096
                   for idx in range(200))


def test_a_sync_waits_for_a_drain_and_reports_its_failure(tmp_path, monkeypatch):
    """The evicted chunks a drain is syncing are in no list a sync looks
    at: the volume is not clean meanwhile, a sync waits for the drain, and
    a drain that failed makes the next sync fail (and every one after it,
    a resync's put_chunk notwithstanding once it was reported)."""
    from pxfs.chunk import fileio, incarnation, store as store_mod
    monkeypatch.setattr(store_mod, "UNSYNCED_MAX", 2)
    monkeypatch.setattr(incarnation, "forfeit", lambda: None)
    store = ChunkStore([str(tmp_path)], max_open=1)
    started, release = threading.Event(), threading.Event()
    real = os.fdatasync
    fail = []

    def slow_fdatasync(fd):
        if threading.current_thread().name == "drainer":
            started.set()
            assert release.wait(10)
            if fail:
                raise OSError(5, "Input/output error")
        real(fd)
    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    monkeypatch.setattr(fileio, "syncfs", None)
    store.write(4, 0, 0, b"a" * 4096, 1)
    store.write(4, 1, 0, b"b" * 4096, 1)            # evicts 0 (one kept)
    t = threading.Thread(target=store.write, args=(4, 2, 0, b"c" * 4096, 1), name="drainer")
    t.start()                                       # evicts 1: two kept, drained here
    assert started.wait(10)
    assert not store.clean(4) and not store.small_sync(4)
    done = threading.Event()
    s = threading.Thread(target=lambda: (store.sync(4), done.set()))
    s.start()
    assert not done.wait(0.3)                       # waits for the drain
    release.set()
    t.join(10)
    s.join(10)
    assert done.is_set() and not store._unsynced.get(4) and not store._draining
    store.sync(4)                                   # chunk 2, written after the drain
    assert store.clean(4)
    # a failed drain: the next sync says so, and the ones after it
    started.clear()
    release.clear()
    fail.append(1)
    store.write(4, 3, 0, b"d" * 4096, 1)            # evicts 2 (clean: closed)
    store.write(4, 4, 0, b"e" * 4096, 1)            # evicts 3 (one kept)
    t = threading.Thread(target=store.write, args=(4, 5, 0, b"f" * 4096, 1), name="drainer")
    t.start()
    assert started.wait(10)
    release.set()
    t.join(10)
    assert not store.clean(4)
    with pytest.raises(PxfsError, match="writing back chunk files failed"):
        store.sync(4)
    with pytest.raises(PxfsError, match="an earlier sync failed"):
        store.sync(4)


def test_partly_cached_nowait_read_is_not_a_checksum_error(tmp_path):
    store = ChunkStore([str(tmp_path)])
    data = os.urandom(64 * 1024)
    store.write(6, 0, 0, data, 1)
    store.sync(6)
    fd = store._open[(6, 0)].fd
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)      # drop it from the page cache
    assert store.read(6, 0, 0, 4096) == data[:4096]          # cache the first block only
    try:
        assert store.read(6, 0, 0, 64 * 1024, nowait=True) == data
    except BlockingIOError:
        pass                                                 # falls back to a thread: fine
    assert store.read(6, 0, 0, 64 * 1024) == data


def test_large_chunk_index_and_format_1_headers(tmp_path):
    """Shared volumes key file data by (inode << 24 | chunk): 64-bit indexes;
    chunk files written by format 1 (32-bit idx) are still read."""
    import struct
    from pxfs.chunk.layout import Header
    store = ChunkStore([str(tmp_path)])
    big = (123456789 << 24) | 5
    store.write(VOL, big, 0, b"q" * 4096, gen=3)
    store.close()
    again = ChunkStore([str(tmp_path)])
    assert again.read(VOL, big, 0, 4096) == b"q" * 4096
    assert again.list_chunks(VOL) == {big: 3}
    old = Header(VOL, 7, 9).pack()
    v1 = struct.pack("<4sHHQIIQ", b"PXCH", 1, 0, VOL, 7, CSUM_BLOCK, 9)
    raw = v1.ljust(64, b"\0") + old[64:]
    h = Header.unpack(raw)
    assert (h.volid, h.idx, h.gen) == (VOL, 7, 9) and Header.read_gen(raw) == 9


async def test_merged_put_keeps_blocks_written_during_a_resync(tmp_path):
    """A shared volume's live resync copies a chunk from an in-sync replica
    while writers also write to this one: blocks written here since tracking
    began are newer (or equal) and survive the copy; a chunk dropped since
    is not brought back."""
    from pxfs.replication.replica import ReplicaService
    svc = ReplicaService(ChunkStore([str(tmp_path)]))
    svc.track(VOL)
    await svc.write(VOL, 0, 3 * CSUM_BLOCK, b"L" * CSUM_BLOCK, 1, 10)      # live write
    copy = bytearray(CHUNK_SIZE)
    copy[3 * CSUM_BLOCK:4 * CSUM_BLOCK] = b"o" * CSUM_BLOCK                 # older copy
    copy[5 * CSUM_BLOCK:6 * CSUM_BLOCK] = b"C" * CSUM_BLOCK
    bitmap = bytearray(NBLOCKS // 8)
    bitmap[0] |= (1 << 3) | (1 << 5)
    await svc.put_chunk_merged(VOL, 0, 9, bytes(bitmap), bytes(copy), 1)
    assert await svc.read(VOL, 0, 3 * CSUM_BLOCK, CSUM_BLOCK) == b"L" * CSUM_BLOCK
    assert await svc.read(VOL, 0, 5 * CSUM_BLOCK, CSUM_BLOCK) == b"C" * CSUM_BLOCK
    await svc.write(VOL, 1, 0, b"x" * CSUM_BLOCK, 1, 11)
    await svc.drop_chunks(VOL, 1, 1, 1)
    await svc.put_chunk_merged(VOL, 1, 9, bytes(bitmap), bytes(copy), 1)
    assert svc.store.list_chunks(VOL).keys() == {0}
    svc.untrack(VOL)
    await svc.put_chunk_merged(VOL, 0, 12, bytes(bitmap), bytes(copy), 1)   # plain put again
    assert await svc.read(VOL, 0, 3 * CSUM_BLOCK, CSUM_BLOCK) == b"o" * CSUM_BLOCK


def test_two_file_sync_flushes_once_and_is_complete(tmp_path, monkeypatch):
    """A sync of two chunk files that only overwrote blocks they hold writes
    one back (sync_file_range) and fdatasyncs the other: one device cache
    flush instead of two.  A file with a block allocated since its last
    fdatasync (or not yet fdatasynced since it was opened) always gets its
    own fdatasync.  The pool image taken right after each sync (a crash at
    that moment, with everything the device acknowledged) holds every
    write, with checksums that match."""
    from pxfs.chunk import fileio
    img, mnt = tmp_path / "pool.img", tmp_path / "pool"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "300M", str(img)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(img)],
                         check=True, capture_output=True, text=True).stdout.strip()
    mounted = []
    try:
        subprocess.run(["mkfs.xfs", "-q", dev], check=True)
        subprocess.run(["mount", "-o", "allocsize=4k", dev, str(mnt)], check=True)
        mounted.append(str(mnt))
        store = ChunkStore([str(mnt)])
        stores = [store]
        calls = []
        real_fdatasync, real_sfr = os.fdatasync, fileio.sync_file_range
        monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append("fdatasync"),
                                                          real_fdatasync(fd))[1])
        monkeypatch.setattr(fileio, "sync_file_range",
                            lambda *a: (calls.append("sync_file_range"), real_sfr(*a))[1])

        def sync():
            calls.clear()
            store.sync(7)
            return sorted(calls)

        store.write(7, 0, 0, pattern(8192, 1), 1)
        store.write(7, 1, 4096, pattern(4096, 2), 1)
        assert sync() == ["fdatasync", "fdatasync"]        # new files: blocks allocated
        store.write(7, 0, 4096, pattern(4096, 3), 2)      # overwrites only
        store.write(7, 1, 4096, pattern(4096, 4), 2)
        assert sync() == ["fdatasync", "sync_file_range"]
        store.write(7, 0, 0, pattern(4096, 5), 3)         # overwrite
        store.write(7, 1, 65536, pattern(4096, 6), 3)     # a new block in chunk 1
        assert sync() == ["fdatasync", "sync_file_range"]
        store.write(7, 0, 65536, pattern(4096, 7), 4)     # new blocks in both
        store.write(7, 1, 131072, pattern(4096, 8), 4)
        assert sync() == ["fdatasync", "fdatasync"]
        store.write(7, 0, 4096, pattern(4096, 9), 5)
        store.write(7, 1, 65536, pattern(4096, 10), 5)
        assert sync() == ["fdatasync", "sync_file_range"]
        monkeypatch.undo()
        # the crash image: copied from the loop device's file after the sync
        crash, cmnt = tmp_path / "crash.img", tmp_path / "crash"
        cmnt.mkdir()
        subprocess.run(["cp", "--sparse=always", str(img), str(crash)], check=True)
        subprocess.run(["mount", "-o", "nouuid", str(crash), str(cmnt)], check=True)
        mounted.append(str(cmnt))
        again = ChunkStore([str(cmnt)])
        stores.append(again)
        assert again.read(7, 0, 0, 8192) == pattern(4096, 5) + pattern(4096, 9)
        assert again.read(7, 0, 65536, 4096) == pattern(4096, 7)
        assert again.read(7, 1, 4096, 4096) == pattern(4096, 4)
        assert again.read(7, 1, 65536, 4096) == pattern(4096, 10)
        assert again.read(7, 1, 131072, 4096) == pattern(4096, 8)
    finally:
        for st in locals().get("stores", []):
            st.close()                  # its open chunk files would keep the mount busy
        for m in reversed(mounted):
            if subprocess.run(["umount", m], capture_output=True).returncode:
                subprocess.run(["umount", "-l", m], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_a_failed_sync_fails_every_later_one_until_a_resync(tmp_path, monkeypatch):
    """Linux reports a write-back error once and drops the pages: the next
    fdatasync would succeed with the data gone.  The store remembers."""
    store = ChunkStore([str(tmp_path)])
    store.write(5, 0, 0, b"a" * 4096, 1)
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(PxfsError, match="EIO"):
        store.sync(5)
    monkeypatch.setattr(os, "fdatasync", real)
    assert not store.clean(5)
    with pytest.raises(PxfsError, match="an earlier sync failed"):
        store.sync(5)
    store.write(5, 1, 0, b"b" * 4096, 1)
    with pytest.raises(PxfsError, match="an earlier sync failed"):
        store.sync(5)
    store.sync(6)                                  # other volumes are not affected
    # a resync replaces the chunks: syncs work again
    store.put_chunk(5, 0, 1, *store.get_chunk(5, 0)[1:])
    store.sync(5)
    assert store.clean(5)


def _fill_up(mnt) -> None:
    """Leave no free block on the filesystem at ``mnt`` (files filler and
    filler2)."""
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    subprocess.run(["fallocate", "-l", str(free), str(mnt / "filler")], check=False)
    # take what fallocate left: a few blocks may remain
    try:
        with open(mnt / "filler2", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError:
        pass


def test_a_full_pool_refuses_cleanly_and_can_still_be_fenced(tmp_path):
    """A pool that filled up (thin volumes over-committed): new blocks fail
    with NoSpace, never a silent short write; overwrites, reads and a new
    fencing term (written in place) still work."""
    from pxfs.errors import NoSpace
    img, mnt = tmp_path / "img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "320M", str(img)], check=True)
    subprocess.run(["mkfs.xfs", "-q", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        store = ChunkStore([str(mnt)])
        store.set_term(1, 1)
        store.write(1, 0, 0, b"o" * 8192, 1)
        store.sync(1)
        _fill_up(mnt)
        with pytest.raises(NoSpace):
            store.write(1, 5, 0, os.urandom(CHUNK_SIZE // 2), 2)   # a new chunk
        store.write(1, 0, 0, b"n" * 4096, 2)                         # an overwrite
        assert store.read(1, 0, 0, 8192) == b"n" * 4096 + b"o" * 4096
        store.set_term(1, 2)
        assert store.get_term(1) == 2
        store.close()
        assert ChunkStore([str(mnt)]).get_term(1) == 2
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.parametrize("preallocate", [True, False])
def test_a_write_cut_short_by_a_full_pool_leaves_its_chunk_readable(tmp_path, preallocate):
    """A 1 MiB write over a chunk whose first blocks hold data and whose
    rest was never written, on a full pool.  The space is taken before the
    first byte goes in (fallocate), so the write fails with the chunk as it
    was.  On a pool without fallocate (``preallocate`` off) the overwrite
    goes in and the write stops at the first new block: every block of the
    chunk must still read (new data or old, never a checksum error).  Both
    also from disk in a new store after a sync, and the chunk takes writes
    again once there is room."""
    from pxfs.errors import NoSpace
    img, mnt = tmp_path / "img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "320M", str(img)], check=True)
    subprocess.run(["mkfs.xfs", "-q", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    stores = []
    try:
        store = ChunkStore([str(mnt)])
        store.preallocate = preallocate
        stores.append(store)
        old = pattern(128 * 1024, 1)
        store.write(1, 0, 0, old, 1)
        store.sync(1)
        _fill_up(mnt)
        new = pattern(CHUNK_SIZE, 9)
        with pytest.raises(NoSpace):
            store.write(1, 0, 0, new, 2)
        got = store.read(1, 0, 0, CHUNK_SIZE)               # no ChecksumError
        for b in range(NBLOCKS):
            blk = got[b * CSUM_BLOCK:(b + 1) * CSUM_BLOCK]
            was = old[b * CSUM_BLOCK:(b + 1) * CSUM_BLOCK] or bytes(CSUM_BLOCK)
            assert blk in (was, new[b * CSUM_BLOCK:(b + 1) * CSUM_BLOCK]), b
        if preallocate:
            assert got == old + bytes(CHUNK_SIZE - len(old))
        else:
            assert got[:len(old)] != old, "the overwrite did not go in: nothing was tested"
        store.sync(1)
        again = ChunkStore([str(mnt)])
        stores.append(again)
        drop_cache(chunk_path(mnt, 1, 0))
        assert again.read(1, 0, 0, CHUNK_SIZE) == got
        os.unlink(mnt / "filler")
        os.unlink(mnt / "filler2")
        again.write(1, 0, 0, new, 3)
        assert again.read(1, 0, 0, CHUNK_SIZE) == new
    finally:
        for st in stores:
            st.close()
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_failed_directory_sync_is_remembered_too(tmp_path, monkeypatch):
    store = ChunkStore([str(tmp_path)])
    store.write(5, 0, 0, b"a" * 4096, 1)             # a new chunk file: its name to sync
    monkeypatch.setattr(store, "_fsync_dir", lambda d: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(PxfsError, match="EIO"):
        store.sync(5)
    monkeypatch.undo()
    with pytest.raises(PxfsError, match="an earlier sync failed"):
        store.sync(5)


def test_incarnation_is_kept_only_when_nothing_can_have_been_lost(tmp_path):
    import json
    from pxfs.chunk import incarnation
    data, roots = tmp_path / "data", [str(tmp_path)]
    data.mkdir()
    state = data / incarnation.STATE

    def start():
        old = incarnation.begin(str(data))
        if old:
            assert json.loads(state.read_text()) == {}     # forfeited until taken
        return incarnation.take(str(data), roots, old)
    first = start()
    assert start() == first                                    # died; same boot, same mount
    rec = json.loads(state.read_text())
    rec["mounts"] = {str(tmp_path): 12345}                      # the pool was mounted again
    state.write_text(json.dumps(rec))
    second = start()
    assert second != first
    rec = json.loads(state.read_text())
    rec["boot_id"] = "another boot"                             # the host restarted
    state.write_text(json.dumps(rec))
    third = start()
    assert third != second
    incarnation.mark_clean(str(data), roots)                   # a clean stop: kept anywhere
    assert json.loads(state.read_text()) == {"inc": third, "clean": True}
    assert start() == third
    # a start that dies in its sync (a write-back error reported to it) leaves
    # nothing to reuse; nor does a sync error of a running process
    incarnation.begin(str(data))
    assert start() != third
    fourth = start()
    incarnation.forfeit()
    incarnation.mark_clean(str(data), roots)       # forfeited: not recorded as clean either
    assert json.loads(state.read_text()) == {}
    assert start() != fourth
    state.write_text("{not json")
    assert start() > 0
