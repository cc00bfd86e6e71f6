"""``pxfs SOURCE MOUNTPOINT [-o OPTIONS] [-f]``: mount a shared volume.

This is the program ``mount -t fuse.pxfs`` (through mount.fuse3) and
/etc/fstab lines run.  It asks the node named by ``-o node=URL`` (default
http://127.0.0.1:9001) for the cluster's etcd and the volume, then serves
the volume's namespace with its own FUSE mount: metadata straight from etcd,
file data straight from the replicas' data ports.  One process per mount
(pyfuse3 serves one mount per process, and statfs must answer for this
volume alone).  Without ``-f`` it goes to the background once the mount is
up, so mount(8) returns when the filesystem can be used.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import trio

from . import codec
from .config import parse_kvdb_url
from .errors import ConfigError, InvalidArgument, PxfsError
from .meta import keys
from .meta.etcd import EtcdKV
from .meta.kv import Delete, Put
from .meta.lease import list_nodes
from .namespace.meta import NsMeta
from .namespace.shared import SPAN, SharedVolume
from .replication.targets import RemoteReplica
from .replication.volume_io import ReplicatedVolume
from .rpc.client import PeerBook
from .volume import hostdev

log = logging.getLogger("pxfs.mount")
DEFAULT_NODE = "http://127.0.0.1:9001"
#: options handled here; everything else is refused with a clear error
FUSE_FLAGS = {"allow_other", "default_permissions", "ro", "rw"}
IGNORED = {"_netdev", "defaults", "auto", "noauto", "nofail", "user", "nouser", "users",
           "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "atime", "noatime",
           "relatime", "norelatime", "strictatime", "lazytime"}
MOUNT_TTL = 10
#: marks a mount a node made for `pxctl host mount` (x-: userspace-only, as util-linux has it)
HOST_MOUNT = "x-pxfs-host-mount"


def parse_options(text: str) -> dict:
    opts = {"node": DEFAULT_NODE, "flags": set(), "log": None, "host_mount": False}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, value = part.partition("=")
        if key == "node" and eq:
            if not value.startswith(("http://", "https://")):
                raise InvalidArgument(f"node={value!r}: expected a node's API URL such as {DEFAULT_NODE}")
            opts["node"] = value.rstrip("/")
        elif key == "log" and eq:
            opts["log"] = value
        elif key in FUSE_FLAGS and not eq:
            opts["flags"].add(key)
        elif key == HOST_MOUNT and not eq:
            opts["host_mount"] = True         # made by `pxctl host mount`; undone by it
        elif key in IGNORED or key.startswith("x-") or key.startswith("comment="):
            continue
        else:
            raise InvalidArgument(f"unknown mount option {part!r} (known: node=URL, log=FILE, "
                                  + ", ".join(sorted(FUSE_FLAGS)) + ")")
    if {"ro", "rw"} <= opts["flags"]:
        raise InvalidArgument("options ro and rw contradict each other")
    return opts


def node_info(node_url: str, source: str) -> tuple[dict, dict]:
    """(cluster config, volume record) from the node's REST API."""
    import httpx
    try:
        with httpx.Client(timeout=30) as http:
            cfg = http.get(f"{node_url}/v1/cluster/config")
            vol = http.get(f"{node_url}/v1/volumes/{urllib.parse.quote(source, safe='')}")
    except httpx.HTTPError as exc:
        raise PxfsError(f"cannot reach pxfs node at {node_url}: {exc}") from None
    if cfg.status_code != 200:
        raise PxfsError(f"{node_url}: cannot read the cluster config (HTTP {cfg.status_code})")
    if vol.status_code != 200:
        raise PxfsError(vol.json().get("error") or f"volume {source!r}: HTTP {vol.status_code}")
    return cfg.json(), vol.json()


class MountClient:
    """Everything one mount needs: etcd, the replicas, the volume."""

    def __init__(self, kv, cid: str, node: str, volid: int, name: str, mountpoint: str,
                 host_mount: bool = False):
        self.kv, self.cid, self.node, self.volid = kv, cid, node, volid
        self.host_mount = host_mount
        self.name, self.mountpoint = name, mountpoint
        self.client = f"{node}.{socket.gethostname()}.{os.getpid()}"
        self.peers = PeerBook(refresh=lambda: list_nodes(self.kv, self.cid))
        self.rec: dict = {}
        self.rev = 0
        self.lease = 0
        self.since = time.time()
        self.alive_at = time.monotonic()
        self.on_stale = None
        #: this mount dropped out of the cluster's view and serves ESTALE for
        #: good; its record says so, so that list/inspect show it and a
        #: `host mount` of the path mounts it again instead of answering with it
        self.stale = False
        self.fenced = None                    # () -> whether the volume fenced this mount

    def alive(self) -> bool:
        """False once this mount may have dropped out of the cluster's view:
        its record lives MOUNT_TTL seconds after the last refresh, and a
        resync of a replica waits only for the mounts it can see, so a mount
        that went this long without one stops writing (EIO) for good."""
        return time.monotonic() - self.alive_at < MOUNT_TTL * 0.6

    def target(self, node: str) -> RemoteReplica:
        return RemoteReplica(node, self.peers.peer(node))

    async def load(self) -> bool:
        """Read the volume record and node addresses; True if the record changed."""
        self.peers.learn(await list_nodes(self.kv, self.cid))
        item = await self.kv.get(keys.vol_key(self.cid, self.volid))
        if item is None:
            raise PxfsError(f"volume {self.name} was deleted")
        changed = item.mod_rev != self.rev
        self.rec, self.rev = codec.unpack_record(item.value), item.mod_rev
        return changed

    def states(self) -> dict[str, str]:
        return {r["node"]: r["state"] for r in self.rec["replicas"]}

    async def on_failure(self, nodes: list[str], missed_from: int) -> int:
        """Mark replicas that failed a write out of sync (before the write is
        acknowledged on the rest); the new generation."""
        from .volume.catalog import Catalog
        cat = Catalog(self.kv, self.cid, self.client, self.target)
        rec = await cat.mark_out_of_sync(self.volid, nodes, self.rec["term"], missed_from)
        self.rec = rec
        self.rev = 0                     # read it again (and publish it) on the next refresh
        return rec["gen"]

    async def refresh_service(self, vol: ReplicatedVolume, *, task_status=trio.TASK_STATUS_IGNORED):
        """Follow replica-state changes made by other nodes (within 1 s) and
        say so in the mount record: a resync of a replica starts copying
        only once every mount writes to it (ARCHITECTURE.md)."""
        task_status.started()
        while True:
            await trio.sleep(0.5)
            try:
                await self.follow(vol)
            except PxfsError as exc:
                log.info("volume record not refreshed: %s", exc)

    async def follow(self, vol: ReplicatedVolume) -> None:
        """Read the volume record; apply and announce a change."""
        if await self.load():
            vol.states = self.states()
            vol.set_gen(self.rec["gen"])
            await self.publish()

    async def publish(self) -> None:
        if self.lease:
            rec = codec.pack_record({"node": self.node, "path": self.mountpoint,
                                     "host": socket.gethostname(), "pid": os.getpid(),
                                     "where": hostdev.process_place(),
                                     "since": self.since, "seen_rev": self.rev,
                                     "host_mount": self.host_mount, "stale": self.stale})
            await self.kv.txn([], [Put(keys.nsmount_key(self.cid, self.volid, self.client), rec,
                                       self.lease)])

    async def registration(self, *, task_status=trio.TASK_STATUS_IGNORED):
        """Keep this mount's record alive under its own lease, so that
        ``pxctl volume list`` shows it and delete refuses while it exists."""
        started = False
        while True:
            told = self.stale
            if not self.alive() and self.on_stale is not None:
                self.on_stale()               # latched: a late refresh must not undo it
                self.stale = True
            if self.fenced is not None and self.fenced():
                self.stale = True             # fenced for good, whatever the reason
            try:
                # etcd counts the lease's TTL from when it takes the request:
                # the time before the call, so that alive() never outlasts it
                asked = time.monotonic()
                if not self.lease or not await self.kv.lease_refresh(self.lease):
                    asked = time.monotonic()
                    self.lease = await self.kv.lease_grant(MOUNT_TTL)
                    await self.publish()
                elif self.stale and not told:
                    await self.publish()
                self.alive_at = asked
            except PxfsError as exc:
                log.warning("mount record not kept alive: %s", exc)
                self.lease = 0
            if not started:
                task_status.started(lambda: self.lease)
                started = True
            await trio.sleep(MOUNT_TTL / 3)

    async def unregister(self, lease_fn) -> None:
        with contextlib.suppress(PxfsError):
            await self.kv.txn([], [Delete(keys.nsmount_key(self.cid, self.volid, self.client))])
            if lease_fn():
                await self.kv.lease_revoke(lease_fn())


async def serve(source: str, mountpoint: str, opts: dict, ready_fd: int | None,
                cluster: dict, vol_desc: dict) -> int:
    from .fuse import shared as fuse_shared
    from .fuse.locks import LockService
    from .namespace.locks import NsLocks

    if not vol_desc.get("shared"):
        raise InvalidArgument(f"volume {source!r} is a block volume: attach and mount it with "
                              "`pxctl host attach` / `pxctl host mount`")
    kv = EtcdKV([parse_kvdb_url(u) for u in cluster["kvdb"]])
    mc = MountClient(kv, cluster["clusterid"], cluster["node_id"], int(vol_desc["id"]),
                     vol_desc["name"], mountpoint, opts["host_mount"])
    await mc.load()
    async def refresh():
        with contextlib.suppress(PxfsError):
            await mc.follow(vol)
    vol = ReplicatedVolume(mc.volid, SPAN, mc.rec["term"], mc.rec["gen"], mc.states(), mc.target,
                           mc.on_failure, local_node=mc.node, refresh=refresh)
    meta = NsMeta(kv, mc.cid, mc.volid, mc.client)
    sv = SharedVolume(mc.name, mc.volid, mc.rec["size"], meta, vol, alive=mc.alive)

    def stale() -> None:
        with contextlib.suppress(PxfsError):
            sv.check_alive()
    mc.on_stale = stale
    mc.fenced = lambda: bool(vol.fenced)
    locks = LockService(NsLocks(kv, mc.cid, mc.volid, mc.client, lambda: mc.lease,
                                lambda: mc.alive() and not vol.fenced), sv)
    fs = fuse_shared.SharedFS(sv, locks)
    fuse_opts = {f"fsname={source}", "subtype=pxfs"} | (opts["flags"] - {"rw"})
    fuse_shared.mount(fs, mountpoint, fuse_opts)
    if not locks.active():
        log.warning("flock/fcntl locks on %s hold on this node only", mountpoint)
    try:
        async with trio.open_nursery() as nursery:
            lease_fn = await nursery.start(mc.registration)
            await nursery.start(locks.run)
            await nursery.start(sv.service)
            await nursery.start(mc.refresh_service, vol)
            if ready_fd is not None:
                os.write(ready_fd, b"ok\n")
                os.close(ready_fd)
                if not opts["log"]:          # the parent stopped listening
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 2)
                    os.close(devnull)
            log.info("mounted %s at %s through node %s", source, mountpoint, mc.node)

            async def signals():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        log.info("signal: unmounting %s", mountpoint)
                        fuse_shared.terminate()
                        return
            nursery.start_soon(signals)
            await fuse_shared.serve()
            with trio.move_on_after(10):
                with contextlib.suppress(PxfsError):
                    await sv.finish()
                await sv.usage.record()
                await mc.unregister(lease_fn)
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(Exception):
            fuse_shared.unmount()
        await kv.close()
    return 0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="pxfs", description="mount a pxfs shared volume")
    ap.add_argument("source", help="volume name or id")
    ap.add_argument("mountpoint")
    ap.add_argument("-o", dest="options", default="", help="node=URL, ro, allow_other, "
                    "default_permissions, log=FILE (and the usual mount options)")
    ap.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    ap.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        opts = parse_options(args.options)
    except PxfsError as exc:
        print(f"pxfs: {exc}", file=sys.stderr)
        sys.exit(2)
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        why = "is not a directory" if os.path.lexists(mountpoint) else "does not exist"
        print(f"pxfs: mount point {mountpoint} {why}", file=sys.stderr)
        sys.exit(2)
    # FUSE mounts stack; a second pxfs mount on one path only hides the first
    real = os.path.realpath(mountpoint)
    held = [src for src, tgt, fstype in hostdev.mounts() if tgt == real and fstype == "fuse.pxfs"]
    if held:
        print(f"pxfs: {mountpoint} is already a pxfs mount (of {held[-1]}); unmount it first",
              file=sys.stderr)
        sys.exit(1)
    if not args.foreground:
        sys.exit(_background(args, mountpoint))
    logging.basicConfig(level=logging.INFO, filename=opts["log"],
                        format=f"%(asctime)s pxfs[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore"):      # a line per request: not for a mount's errors
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        cluster, vol_desc = node_info(opts["node"], args.source)
        sys.exit(trio.run(serve, args.source, mountpoint, opts, args.ready_fd, cluster, vol_desc))
    except (PxfsError, ConfigError, RuntimeError, OSError) as exc:
        print(f"pxfs: {exc}", file=sys.stderr)
        sys.exit(1)


def _background(args, mountpoint: str) -> int:
    """Start the foreground server in its own session and wait until it
    says the mount is up (or failed)."""
    r, w = os.pipe()
    argv = [sys.executable, "-m", "pxfs.mount", args.source, mountpoint, "-o", args.options,
            "-f", "--ready-fd", str(w)]
    proc = subprocess.Popen(argv, pass_fds=(w,), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        line = ready.readline()
    if line.strip() == b"ok":
        proc.stderr.close()
        return 0
    err = proc.stderr.read().decode(errors="replace").strip()
    proc.wait()
    print(err or "pxfs: the mount process exited before the mount was up", file=sys.stderr)
    return proc.returncode or 1


if __name__ == "__main__":
    main()
