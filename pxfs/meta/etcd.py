"""The KV interface over a real etcd (python3-etcd3).  The only module that
imports etcd3 or grpc; their exceptions become MetaError here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import types

import trio

import etcd3
import etcd3.exceptions
import etcd3.utils
import etcd3.watch
from etcd3 import etcdrpc
import grpc

from ..errors import MetaError
from .kv import Changes, Compare, Delete, DeletePrefix, Item, Put

log = logging.getLogger(__name__)

if not hasattr(etcd3.watch, "six"):
    # python3-etcd3 0.13.0's watch thread ends with six.itervalues() but no
    # longer imports six: the NameError kills it before it tells the
    # remaining callbacks that the stream ended (at every client close)
    etcd3.watch.six = types.SimpleNamespace(itervalues=lambda d: iter(list(d.values())))


@contextlib.contextmanager
def map_etcd_errors(what: str, where: str = "etcd"):
    try:
        yield
    except (etcd3.exceptions.ConnectionFailedError,
            etcd3.exceptions.ConnectionTimeoutError) as exc:
        # the usual case, said as a user reads it: etcd is down or cut off
        why = "timed out" if isinstance(exc, etcd3.exceptions.ConnectionTimeoutError) \
            else "connection failed"
        raise MetaError(f"etcd at {where} does not answer ({what}: {why})") from exc
    except etcd3.exceptions.Etcd3Exception as exc:
        raise MetaError(f"etcd {what} failed: {exc.__class__.__name__} {exc}") from exc
    except grpc.RpcError as exc:
        raise MetaError(f"etcd {what} failed: {exc}") from exc
    except ValueError as exc:       # an endpoint etcd3 marked failed, a closed channel
        raise MetaError(f"etcd {what} failed: {exc}") from exc


#: errors after which a client is replaced: python3-etcd3 marks its endpoint
#: failed for 300 s at the first one and then refuses it ("Trying to use a
#: failed node"), long after etcd is back
_CONN_ERRORS = (etcd3.exceptions.ConnectionFailedError, etcd3.exceptions.ConnectionTimeoutError,
                ValueError)
#: a replaced client is closed this much later: other worker threads may
#: still be in calls on it, which closing it would cancel
_CLOSE_AFTER = 60.0


def _connection_error(exc: Exception) -> bool:
    if isinstance(exc, ValueError):
        return "failed node" in str(exc) or "closed channel" in str(exc)
    return True


class EtcdKV:
    """Async KV over etcd; every blocking call runs in a worker thread."""

    def __init__(self, endpoints, timeout: float = 5.0):
        self._endpoints = list(endpoints)
        self._where = ", ".join(f"{h}:{p}" for h, p in self._endpoints)
        self._timeout = timeout
        self._limiter = trio.CapacityLimiter(8)
        # creating a watch can take the client's whole timeout, one at a
        # time: not on the limiter that lease refreshes need
        self._watch_limiter = trio.CapacityLimiter(2)
        # lease refreshes never queue behind other calls' threads
        self._lease_limiter = trio.CapacityLimiter(1)
        self._client = None
        self._pick = 0
        self._lock = threading.Lock()      # worker threads share the client
        self._dropped: list = []           # (when, client) to close later

    def _connect(self):
        with self._lock:
            if self._client is None:
                host, port = self._endpoints[self._pick % len(self._endpoints)]
                self._client = etcd3.client(host=host, port=port, timeout=self._timeout)
            return self._client

    async def _call(self, what, fn, limiter=None):
        def run():
            with map_etcd_errors(what, self._where):
                client = self._connect()
                try:
                    return fn(client)
                except _CONN_ERRORS as exc:
                    if not _connection_error(exc):
                        raise
                    self._drop(client, next_endpoint=True)
                # once more, on a new client of the next endpoint; if that
                # fails too, the next call starts with a new client as well
                client = self._connect()
                try:
                    return fn(client)
                except _CONN_ERRORS as exc:
                    if _connection_error(exc):
                        self._drop(client)
                    raise
        return await trio.to_thread.run_sync(run, limiter=limiter or self._limiter)

    def _drop(self, client, next_endpoint: bool = False) -> None:
        """Forget a client whose endpoint failed (worker thread), and close
        those forgotten a while ago.  Closing one ends its watches too: their
        waiters see a broken watch and look again."""
        now = time.monotonic()
        with self._lock:
            if self._client is client:
                self._client = None
                self._pick += next_endpoint
                self._dropped.append((now, client))
            old = [c for t, c in self._dropped if now - t > _CLOSE_AFTER]
            self._dropped = [(t, c) for t, c in self._dropped if now - t <= _CLOSE_AFTER]
        for c in old:
            with contextlib.suppress(Exception):
                c.close()

    @staticmethod
    def _item(key, value, meta) -> Item:
        return Item(key if isinstance(key, str) else key.decode(), value,
                    meta.mod_revision, meta.create_revision, meta.lease_id)

    async def get(self, key: str) -> Item | None:
        def fn(c):
            value, meta = c.get(key)
            return None if meta is None else self._item(key, value, meta)
        return await self._call("get", fn)

    async def range(self, prefix: str, limit: int = 0) -> list[Item]:
        def fn(c):
            return [self._item(meta.key, value, meta)
                    for value, meta in c.get_prefix(prefix, limit=limit or None)]
        return await self._call("range", fn)

    async def get_many(self, keys: list[str]) -> list[Item | None]:
        if not keys:
            return []

        def fn(c):
            _, responses = c.transaction(compare=[], success=[c.transactions.get(k) for k in keys],
                                         failure=[])
            return [self._item(k, r[0][0], r[0][1]) if r else None for k, r in zip(keys, responses)]
        return await self._call("get_many", fn)

    async def txn(self, compares: list[Compare], ops: list) -> bool:
        return bool(await self.commit(compares, ops))

    @staticmethod
    def _op(c, o):
        if isinstance(o, Put):
            return c.transactions.put(o.key, o.value, lease=o.lease or None)
        if isinstance(o, DeletePrefix):
            return c.transactions.delete(o.prefix, range_end=etcd3.utils.prefix_range_end(
                etcd3.utils.to_bytes(o.prefix)))
        return c.transactions.delete(o.key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self._call("delete_prefix", lambda c: c.delete_prefix(prefix).deleted)

    async def commit(self, compares: list[Compare], ops: list[Put | Delete]) -> int:
        """A transaction; the revision its writes got, or 0 if a compare failed."""
        def fn(c):
            cmp = [(c.transactions.mod(x.key) == x.mod_rev).build_message() for x in compares]
            success = c._ops_to_requests([self._op(c, o) for o in ops])
            resp = c.kvstub.Txn(etcdrpc.TxnRequest(compare=cmp, success=success, failure=[]),
                                c.timeout, credentials=c.call_credentials, metadata=c.metadata)
            return resp.header.revision if resp.succeeded else 0
        return await self._call("txn", fn)

    async def lease_grant(self, ttl: int) -> int:
        return await self._call("lease grant", lambda c: c.lease(ttl).id)

    async def lease_refresh(self, lease: int) -> bool:
        def fn(c):
            resp = list(c.refresh_lease(lease))
            return bool(resp) and resp[0].TTL > 0
        return await self._call("lease refresh", fn, limiter=self._lease_limiter)

    async def lease_revoke(self, lease: int) -> None:
        def fn(c):
            try:
                c.revoke_lease(lease)
            except etcd3.exceptions.Etcd3Exception:
                pass
            except grpc.RpcError as exc:      # already expired or revoked
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        await self._call("lease revoke", fn)

    @contextlib.asynccontextmanager
    async def watch(self, prefix: str):
        """etcd's watch on ``prefix``; its callback (on the client's watch
        thread) fires the Changes, errors included: a waiter then looks
        again."""
        changes = Changes()

        def on_event(resp):
            if isinstance(resp, Exception):   # the stream ended; python3-etcd3 drops the watch
                changes.broken = True
            changes.fire_threadsafe()

        def start(c):
            return c, c.add_watch_prefix_callback(prefix, on_event)
        client, wid = await self._call("watch", start, limiter=self._watch_limiter)
        try:
            yield changes
        finally:
            # on the client that made it (ids are per client and per stream);
            # after the stream ended the id may be another watch's already
            if not changes.broken:
                with trio.CancelScope(shield=True), contextlib.suppress(MetaError):
                    await self._call("cancel watch", lambda _c: client.cancel_watch(wid),
                                     limiter=self._watch_limiter)

    async def close(self) -> None:
        with self._lock:
            clients = [c for _, c in self._dropped] + [self._client] * (self._client is not None)
            self._client, self._dropped = None, []
        for client in clients:
            await trio.to_thread.run_sync(client.close)
