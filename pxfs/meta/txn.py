"""Optimistic transactions: the body reads through ``Txn`` (recording each
key's revision) and buffers writes; commit compares every revision read and
applies the writes, or the body runs again after a jittered pause.
"""

from __future__ import annotations

import logging
import random

import trio

from ..errors import TxnConflict
from .kv import KV, Compare, Delete, DeletePrefix, Item, Put

log = logging.getLogger(__name__)


class Txn:
    def __init__(self, kv: KV):
        self.kv = kv
        self._reads: dict[str, int] = {}
        self._ops: list[Put | Delete] = []

    async def get(self, key: str) -> Item | None:
        item = await self.kv.get(key)
        self._reads[key] = item.mod_rev if item else 0
        return item

    def expect(self, key: str, mod_rev: int) -> None:
        """Add a compare for a key read elsewhere."""
        self._reads[key] = mod_rev

    def put(self, key: str, value: bytes, lease: int = 0) -> None:
        self._ops.append(Put(key, value, lease))

    def delete(self, key: str) -> None:
        self._ops.append(Delete(key))

    def delete_prefix(self, prefix: str) -> None:
        self._ops.append(DeletePrefix(prefix))

    async def commit(self) -> bool:
        return await self.kv.txn([Compare(k, r) for k, r in self._reads.items()], self._ops)

    async def commit_rev(self) -> int:
        """Commit; the revision the writes got, or 0 if a compare failed."""
        return await self.kv.commit([Compare(k, r) for k, r in self._reads.items()], self._ops)


async def run_txn(kv: KV, body, *, tries: int = 20, what: str = "transaction"):
    """Run ``await body(txn)`` until its commit succeeds; return its result."""
    for attempt in range(1, tries + 1):
        txn = Txn(kv)
        result = await body(txn)
        if await txn.commit():
            if attempt > 2:
                log.info("%s committed after %d tries", what, attempt)
            return result
        await trio.sleep(random.uniform(0.005, 0.02 * attempt))
    raise TxnConflict(f"{what} lost its race {tries} times")
