"""msgpack encoding of records kept in etcd and sent between nodes.

Every record is a map with a ``v`` (schema version) field so that later
versions can read old records.
"""

from __future__ import annotations

import msgpack

from .errors import InvalidArgument

RECORD_VERSION = 1


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidArgument(f"undecodable record: {exc}") from exc


def pack_record(rec: dict) -> bytes:
    return pack({"v": RECORD_VERSION, **rec})


def unpack_record(data: bytes) -> dict:
    rec = unpack(data)
    if not isinstance(rec, dict) or "v" not in rec:
        raise InvalidArgument("record without a version")
    rec.pop("v")
    return rec
