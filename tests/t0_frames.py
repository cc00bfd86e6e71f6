"""Data-port framing (pxfs/rpc/frames.py) and the msgpack codec
(pxfs/codec.py), over in-memory trio streams."""

import random
import struct

import msgpack
import pytest
import trio
import trio.testing

from pxfs import CHUNK_SIZE, MAX_FRAME, codec
from pxfs.errors import FrameError, InvalidArgument
from pxfs.rpc.frames import FrameReader, encode, send


def pair():
    a, b = trio.testing.memory_stream_pair()
    return a, FrameReader(b)


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# -- codec -------------------------------------------------------------------------
def test_codec_round_trip():
    obj = {"op": "write", "data": b"\x00\xff" * 10, "n": 2**63, "neg": -1, "s": "h\u00e9",
           "l": [1, 2.5, None, True], "m": {1: "int key"}}
    assert codec.unpack(codec.pack(obj)) == obj


def test_codec_bytes_and_str_stay_distinct():
    out = codec.unpack(codec.pack({"b": b"abc", "s": "abc"}))
    assert isinstance(out["b"], bytes) and isinstance(out["s"], str)


def test_codec_record_round_trip():
    raw = codec.pack_record({"name": "v", "size": 5})
    assert codec.unpack(raw)["v"] == codec.RECORD_VERSION
    assert codec.unpack_record(raw) == {"name": "v", "size": 5}


@pytest.mark.parametrize("data", [codec.pack({"name": "v"}), codec.pack([1]), codec.pack(3)])
def test_codec_record_without_version(data):
    with pytest.raises(InvalidArgument):
        codec.unpack_record(data)


@pytest.mark.parametrize("data", [b"", b"\xc1", codec.pack(1) + b"\x01", b"\x92\x01",
                                  b"\xa2\xff\xfe", b"\x81\x91\x01\x01"])
def test_codec_garbage_is_invalid_argument(data):
    with pytest.raises(InvalidArgument, match="undecodable record"):
        codec.unpack(data)


def test_codec_random_garbage_only_raises_invalid_argument():
    rng = random.Random(4)
    for _ in range(20000):
        data = rng.randbytes(rng.randint(1, 32))
        try:
            codec.unpack(data)
        except InvalidArgument:
            pass


# -- frames ------------------------------------------------------------------------
async def test_round_trip():
    a, reader = pair()
    msg = {"op": "write", "id": 7, "vol": 3, "data": bytes(range(256)) * 4}
    await a.send_all(encode(msg))
    assert await reader.receive() == msg


async def test_several_frames_in_one_send():
    a, reader = pair()
    msgs = [{"id": i, "op": "ping"} for i in range(5)]
    await a.send_all(b"".join(encode(m) for m in msgs))
    for m in msgs:
        assert await reader.receive() == m


async def test_frame_split_into_single_bytes():
    a, reader = pair()
    msg = {"id": 1, "op": "read", "size": 4096}
    frame = encode(msg)

    async def dribble():
        for i in range(len(frame)):
            await a.send_all(frame[i:i + 1])
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        assert await reader.receive() == msg


async def test_whole_chunk_fits_in_a_frame():
    a, reader = pair()
    msg = {"op": "put_chunk", "id": 1, "vol": 1, "idx": 2**32 - 1, "gen": 2**63,
           "bitmap": b"\xff" * 32, "data": b"\xa5" * CHUNK_SIZE, "term": 9, "present": True}
    frame = encode(msg)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, frame)
        assert await reader.receive() == msg


def test_encode_refuses_oversized():
    with pytest.raises(FrameError, match="exceeds"):
        encode({"data": bytes(MAX_FRAME)})


def test_encode_length_prefix():
    frame = encode({"id": 1})
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"id": 1}


async def test_clean_eof_is_none():
    a, reader = pair()
    await a.send_eof()
    assert await reader.receive() is None


async def test_clean_eof_after_a_frame():
    a, reader = pair()
    await a.send_all(encode({"id": 1}))
    await a.send_eof()
    assert await reader.receive() == {"id": 1}
    assert await reader.receive() is None


@pytest.mark.parametrize("n", [MAX_FRAME + 1, 2**32 - 1])
async def test_oversized_length_prefix(n):
    a, reader = pair()
    await a.send_all(struct.pack(">I", n))        # no body follows: refused on the prefix
    with pytest.raises(FrameError, match="exceeds"):
        await reader.receive()


async def test_frame_of_exactly_max_frame_is_allowed():
    a, reader = pair()
    overhead = len(codec.pack({"pad": bytes(70000)})) - 70000
    body = codec.pack({"pad": bytes(MAX_FRAME - overhead)})
    assert len(body) == MAX_FRAME
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, raw_frame(body))
        assert len((await reader.receive())["pad"]) == MAX_FRAME - overhead


@pytest.mark.parametrize("body", [codec.pack([1, 2, 3]), codec.pack("op"), codec.pack(5),
                                  codec.pack(None), codec.pack(b"\x80")])
async def test_non_map_body(body):
    a, reader = pair()
    await a.send_all(raw_frame(body))
    with pytest.raises(FrameError, match="not a map"):
        await reader.receive()


@pytest.mark.parametrize("body", [b"\xc1", b"", codec.pack({"id": 1}) + b"\x00", b"\x82\x01"])
async def test_undecodable_body(body):
    a, reader = pair()
    await a.send_all(raw_frame(body))
    with pytest.raises(FrameError):
        await reader.receive()


async def test_truncated_body():
    a, reader = pair()
    frame = encode({"id": 1, "data": b"x" * 100})
    await a.send_all(frame[:50])
    await a.send_eof()
    with pytest.raises(FrameError, match="closed inside a frame"):
        await reader.receive()


async def test_truncated_length_prefix():
    a, reader = pair()
    await a.send_all(b"\x00\x00")
    await a.send_eof()
    with pytest.raises(FrameError, match="closed inside a frame"):
        await reader.receive()


async def test_truncated_after_good_frame():
    a, reader = pair()
    await a.send_all(encode({"id": 1}) + encode({"id": 2})[:-1])
    await a.send_eof()
    assert await reader.receive() == {"id": 1}
    with pytest.raises(FrameError):
        await reader.receive()


# -- Wire: the same frames over a real socket (system call first, wait when it would block)
async def socket_pair():
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_wire_carries_frames_larger_than_the_socket_buffers():
    a, b = await socket_pair()
    tx, reader = FrameReader(a).wire, FrameReader(b)
    assert tx.fd is not None and reader.wire.fd is not None
    payload = random.Random(3).randbytes(CHUNK_SIZE)
    got = []

    async def receive_all():
        for _ in range(3):
            got.append(await reader.receive())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_all)          # the sender must wait for it to drain
        for i in range(3):
            await send(tx, {"id": i, "op": "write", "data": payload})
    assert [m["id"] for m in got] == [0, 1, 2]
    assert all(bytes(m["data"]) == payload for m in got)


async def test_header_and_raw_payload_go_out_in_order_over_any_stream():
    """send_parts: one writev on a socket, the stream API otherwise."""
    payload = random.Random(4).randbytes(3 * 65536 + 7)
    left, right = trio.testing.memory_stream_pair()
    a, b = await socket_pair()
    for tx, rx in ((left, right), (a, b)):
        reader = FrameReader(rx)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, FrameReader(tx).wire, {"id": 7, "data": payload})
            with trio.fail_after(5):
                msg = await reader.receive()
        assert msg["id"] == 7 and bytes(msg["data"]) == payload


async def test_has_frame_only_when_a_whole_frame_is_there():
    a, b = await socket_pair()
    reader = FrameReader(b)
    assert not reader.has_frame()                        # nothing sent yet: no waiting either
    small, big = encode({"id": 1, "durable": True}), encode({"id": 2, "data": b"y" * 70000})
    await a.send_all(small[:3])
    assert not reader.has_frame()                        # not even the length
    await a.send_all(small[3:] + big[:5000])
    assert reader.has_frame()
    assert await reader.receive() == {"id": 1, "durable": True}
    assert not reader.has_frame()                        # the next one is partial
    await a.send_all(big[5000:])
    with trio.fail_after(5):
        assert bytes((await reader.receive())["data"]) == b"y" * 70000
    await a.aclose()
    assert not reader.has_frame()                        # end of stream: receive reports it
    assert await reader.receive() is None
    l, r = trio.testing.memory_stream_pair()
    assert not FrameReader(r).has_frame()                # not a socket: always waits


async def test_wire_reports_a_peer_gone_inside_a_frame():
    a, b = await socket_pair()
    reader = FrameReader(b)
    frame = encode({"id": 1, "data": b"x" * 100000})
    await a.send_all(frame[:70000])
    await a.aclose()
    with pytest.raises(FrameError, match="closed inside a frame"):
        await reader.receive()


async def test_wire_yields_to_other_tasks_while_data_keeps_coming():
    """A reader that never has to wait still lets the other tasks run."""
    a, b = await socket_pair()
    reader = FrameReader(b)
    small = encode({"id": 1})
    await a.send_all(small * 200)               # all there before the first receive
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0)
        before = ticks
        for _ in range(200):
            assert await reader.receive() == {"id": 1}
        assert ticks > before
        nursery.cancel_scope.cancel()
