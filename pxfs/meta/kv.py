"""The key-value interface the rest of pxfs uses, and MemKV, an in-memory
implementation with etcd's semantics (revisions, leases, compare-and-swap
transactions) for unit tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from typing import AsyncContextManager, Protocol

import trio

from ..errors import MetaError


@dataclasses.dataclass(frozen=True)
class Item:
    key: str
    value: bytes
    mod_rev: int
    create_rev: int
    lease: int = 0


@dataclasses.dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclasses.dataclass(frozen=True)
class Delete:
    key: str


@dataclasses.dataclass(frozen=True)
class DeletePrefix:
    """Delete every key under ``prefix`` (inside a transaction)."""
    prefix: str


@dataclasses.dataclass(frozen=True)
class Compare:
    """True when ``key``'s mod revision equals ``mod_rev`` (0: key absent)."""

    key: str
    mod_rev: int


class Changes:
    """What ``KV.watch`` gives: ``await wait()`` returns once a key under the
    watched prefix changed since the watch began or the last wait returned.
    Watch callbacks may come from another thread (``fire_threadsafe``)."""

    def __init__(self):
        self._event = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self.broken = False          # the watch ended (etcd's stream failed): poll instead

    def fire(self) -> None:
        self._event.set()

    def fire_threadsafe(self) -> None:
        try:
            self._token.run_sync_soon(self.fire)
        except trio.RunFinishedError:
            pass

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class KV(Protocol):
    async def get(self, key: str) -> Item | None: ...
    async def range(self, prefix: str, limit: int = 0) -> list[Item]: ...
    async def get_many(self, keys: list[str]) -> list[Item | None]: ...
    async def delete_prefix(self, prefix: str) -> int: ...
    async def txn(self, compares: list[Compare], ops: list[Put | Delete]) -> bool: ...
    async def commit(self, compares: list[Compare], ops: list[Put | Delete]) -> int: ...
    async def lease_grant(self, ttl: int) -> int: ...
    async def lease_refresh(self, lease: int) -> bool: ...
    async def lease_revoke(self, lease: int) -> None: ...
    def watch(self, prefix: str) -> AsyncContextManager[Changes]: ...
    async def close(self) -> None: ...


class MemKV:
    """In-memory KV with etcd's semantics; leases expire on the wall clock."""

    def __init__(self, clock=time.monotonic):
        self._data: dict[str, Item] = {}
        self._rev = 0
        self._leases: dict[int, tuple[int, float]] = {}
        self._ids = itertools.count(1000)
        self._clock = clock
        self._watches: list[tuple[str, Changes]] = []

    def _changed(self, key_or_prefix: str, *, prefix: bool = False) -> None:
        for wp, changes in self._watches:
            if key_or_prefix.startswith(wp) or (prefix and wp.startswith(key_or_prefix)):
                changes.fire()

    @contextlib.asynccontextmanager
    async def watch(self, prefix: str):
        entry = (prefix, Changes())
        self._watches.append(entry)
        try:
            yield entry[1]
        finally:
            self._watches.remove(entry)

    def _expire(self) -> None:
        now = self._clock()
        dead = [lid for lid, (_, exp) in self._leases.items() if exp <= now]
        for lid in dead:
            del self._leases[lid]
            for k in [k for k, it in self._data.items() if it.lease == lid]:
                del self._data[k]
                self._changed(k)
            self._rev += 1

    async def get(self, key: str) -> Item | None:
        self._expire()
        return self._data.get(key)

    async def range(self, prefix: str, limit: int = 0) -> list[Item]:
        """Items under ``prefix`` in key order; at most ``limit`` if given."""
        self._expire()
        out = [self._data[k] for k in sorted(self._data) if k.startswith(prefix)]
        return out[:limit] if limit else out

    async def get_many(self, keys: list[str]) -> list[Item | None]:
        """Several keys read at one revision (one round trip on etcd)."""
        self._expire()
        return [self._data.get(k) for k in keys]

    async def txn(self, compares, ops) -> bool:
        return bool(await self.commit(compares, ops))

    async def commit(self, compares, ops) -> int:
        """Like txn, but the revision the writes got (0: a compare failed)."""
        self._expire()
        for c in compares:
            it = self._data.get(c.key)
            if (it.mod_rev if it else 0) != c.mod_rev:
                return 0
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise MetaError(f"etcd txn failed: lease {op.lease} not found")
        self._rev += 1
        for op in ops:
            if isinstance(op, Put):
                old = self._data.get(op.key)
                self._data[op.key] = Item(op.key, op.value, self._rev,
                                          old.create_rev if old else self._rev, op.lease)
                self._changed(op.key)
            elif isinstance(op, DeletePrefix):
                for k in [k for k in self._data if k.startswith(op.prefix)]:
                    del self._data[k]
                self._changed(op.prefix, prefix=True)
            elif self._data.pop(op.key, None) is not None:
                self._changed(op.key)
        return self._rev

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` in one revision; the count."""
        self._expire()
        doomed = [k for k in self._data if k.startswith(prefix)]
        if doomed:
            self._rev += 1
            for k in doomed:
                del self._data[k]
            self._changed(prefix, prefix=True)
        return len(doomed)

    async def lease_grant(self, ttl: int) -> int:
        lid = next(self._ids)
        self._leases[lid] = (ttl, self._clock() + ttl)
        return lid

    async def lease_refresh(self, lease: int) -> bool:
        self._expire()
        if lease not in self._leases:
            return False
        ttl = self._leases[lease][0]
        self._leases[lease] = (ttl, self._clock() + ttl)
        return True

    async def lease_revoke(self, lease: int) -> None:
        if lease in self._leases:
            self._leases[lease] = (0, 0.0)
            self._expire()

    async def close(self) -> None:
        pass
