"""pxfsd: the node daemon.  One trio nursery holds the data-port server, the
membership keepalive, the FUSE view, the resync service and the REST API."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading

import trio

from . import __version__, codec, config as config_mod
from .chunk import incarnation, pool
from .chunk.store import ChunkStore
from .errors import Busy, ConfigError, InvalidArgument, MetaError, NotFound, PxfsError
from .meta import keys
from .meta.etcd import EtcdKV
from .meta.lease import Membership, list_nodes
from .replication.replica import ReplicaService
from .replication.targets import LocalReplica, RemoteReplica
from .rpc.client import PeerBook
from .rpc.server import RpcServer
from .volume.attach import Attachments
from .volume import hostdev
from .volume.catalog import Catalog
from .volume.haupdate import HaUpdate
from .volume.resyncer import Resyncer
from .volume.sharedmount import SharedMounts

log = logging.getLogger("pxfs.node")


class Node:
    def __init__(self, cfg: config_mod.Config, kv, roots: list[str]):
        self.cfg, self.kv, self.roots = cfg, kv, roots
        self.store = ChunkStore(roots)
        self.replica = ReplicaService(self.store)
        self.peers = PeerBook(refresh=lambda: list_nodes(self.kv, self.cfg.clusterid))
        self.membership = Membership(kv, cfg.clusterid, cfg.node_id, cfg.lease_ttl, self.info)
        self.catalog = Catalog(kv, cfg.clusterid, cfg.node_id, self.target)
        from .fuse.view import NodeView
        self.view = NodeView()
        self.attachments = Attachments(
            self.catalog, self.membership, self.view, osd_root=cfg.osd_root,
            fuse_mountpoint=cfg.fuse_mountpoint, state_path=os.path.join(cfg.data_dir, "attached.json"))
        self.resyncer = Resyncer(self.catalog, self.attachments, self.membership)
        self.ha = HaUpdate(self.catalog, self.attachments)
        self.shared_mounts = SharedMounts(self.catalog, cfg.api_url, cfg.osd_root,
                                          own_dirs=self.attachments.own_dirs,
                                          log_dir=os.path.join(cfg.data_dir, "mount-logs"))
        self.membership.on_lease_lost(self.attachments.on_lease_lost)
        self.membership.on_rejoined(self.attachments.on_rejoined)
        self.membership.on_rejoined(self._collect_garbage_on_rejoin)

    def info(self) -> dict:
        used, total = self.store.capacity()
        return {"api": self.cfg.api_url, "data": self.cfg.data_addr, "pool_used": used,
                "pool_total": total, "version": __version__, "hostname": socket.gethostname(),
                "devices": list(self.cfg.devices)}

    def target(self, node: str):
        if node == self.cfg.node_id:
            return LocalReplica(node, self.replica)
        return RemoteReplica(node, self.peers.peer(node))

    async def refresh_addresses(self) -> list[dict]:
        nodes = await list_nodes(self.kv, self.cfg.clusterid)
        self.peers.learn(nodes)
        return nodes

    async def address_service(self, *, task_status=trio.TASK_STATUS_IGNORED):
        await self.refresh_addresses()
        task_status.started()
        while True:
            await trio.sleep(2)
            with contextlib.suppress(PxfsError):
                await self.refresh_addresses()

    # -- host operations: block volumes attach, shared volumes mount ------------
    async def attach(self, ref: str) -> dict:
        rec, _ = await self.catalog.get(ref)
        if rec.get("shared"):
            raise InvalidArgument(f"volume {rec['name']!r} is shared: mount it with `pxctl host "
                                  "mount` or `mount -t fuse.pxfs`; there is no block device")
        return await self.attachments.attach(ref)

    async def detach(self, ref: str) -> dict:
        try:
            rec, _ = await self.catalog.get(ref)
        except NotFound:        # deleted while cut off: its attachment here may remain
            rec = {}
        if rec.get("shared"):
            raise InvalidArgument(f"volume {rec['name']!r} is shared: it has no block device to "
                                  "detach; unmount it with `pxctl host unmount`")
        return await self.attachments.detach(ref)

    async def mount(self, ref: str, path: str | None) -> dict:
        rec, _ = await self.catalog.get(ref)
        if rec.get("shared"):
            return await self.shared_mounts.mount(rec, path)
        return await self.attachments.mount(ref, path)

    async def unmount(self, ref: str, path: str | None = None) -> dict:
        try:
            rec, _ = await self.catalog.get(ref)
        except NotFound:
            if self.attachments.local_by_ref(ref) is None:
                raise
            return await self.attachments.unmount(ref, path)    # deleted meanwhile
        if rec.get("shared"):
            return await self.shared_mounts.unmount(rec, path)
        return await self.attachments.unmount(ref, path)

    async def refuse_docker_held(self, ref: str, path: str | None = None) -> None:
        """An operator's unmount or detach (pxctl, the API) of a volume that
        Docker's containers use here through the plugin is refused: they
        would go on writing into the bare directory under the mount.  The
        plugin's own unmounts do not come this way."""
        try:
            rec, _ = await self.catalog.get(ref)
        except NotFound:
            return
        from .docker.mounts import record_of
        cur = await record_of(self.kv, self.cfg.clusterid, self.cfg.node_id, rec["id"]) or {}
        if not cur.get("ids"):
            return
        if path is not None and rec.get("shared") and \
                cur.get("path") not in await hostdev.names_of(path):
            return                  # another mount of the shared volume
        raise Busy(f"volume {rec['name']!r} is in use by {len(cur['ids'])} Docker container "
                   f"mount(s) on this node at {cur.get('path')}; stop those containers first")

    def cluster_config(self) -> dict:
        """What a shared-volume mount process needs to join the cluster."""
        return {"clusterid": self.cfg.clusterid, "node_id": self.cfg.node_id,
                "kvdb": [f"etcd:http://{h}:{p}" for h, p in self.cfg.kvdb],
                "data": self.cfg.data_addr, "api": self.cfg.api_url}

    # -- views for the API ---------------------------------------------------
    async def status(self) -> dict:
        """This node and the cluster; with etcd not answering, this node's
        own part and why the cluster's is missing (status "etcd
        unreachable"), rather than only etcd's error."""
        problem = ""
        try:
            with trio.fail_after(5):
                nodes = await self.refresh_addresses()
        except (MetaError, trio.TooSlowError) as exc:
            nodes = []
            why = str(exc) or "no answer in 5 s"
            problem = (why if why.startswith("etcd at ")
                       else f"etcd at {self.cfg.kvdb_text} does not answer ({why})")
        used, total = self.store.capacity()
        return {"cluster_id": self.cfg.clusterid, "node_id": self.cfg.node_id,
                "status": "etcd unreachable" if problem else "operational",
                "problem": problem, "version": __version__,
                "this_node": {"id": self.cfg.node_id, "api": self.cfg.api_url,
                              "data": self.cfg.data_addr, "pools": [
                                  {"root": r, "io_priority": "LOW"} for r in self.roots],
                              "devices": list(self.cfg.devices), "pool_used": used,
                              "pool_total": total},
                "nodes": [{"id": n["id"], "api": n["api"], "data": n["data"],
                           "status": "Online" if n["online"] else "Offline",
                           "pool_used": n.get("pool_used", 0), "pool_total": n.get("pool_total", 0)}
                          for n in nodes]}

    async def _snapshot(self):
        """The catalog's snapshot, less the shared mounts of this host whose
        process is gone (their records stay until their lease runs out)."""
        vols, atts, nodes, progress = await self.catalog.snapshot()
        for key, mounts in progress.items():
            if key[0] == "mounts":
                mounts[:] = [m for m in mounts if not await self.shared_mounts.gone(m)]
        return vols, atts, nodes, progress

    async def describe_all(self) -> list[dict]:
        vols, atts, nodes, progress = await self._snapshot()
        return [Catalog.describe(v, atts.get(v["id"]), nodes, progress)
                for v in sorted(vols, key=lambda v: v["ctime"])]

    async def inspect(self, ref: str) -> dict:
        rec, _ = await self.catalog.get(ref)
        vols, atts, nodes, progress = await self._snapshot()
        desc = Catalog.describe(rec, atts.get(rec["id"]), nodes, progress)
        desc["bytes_used"] = None
        for r in rec["replicas"]:
            if nodes.get(r["node"], {}).get("online"):
                with contextlib.suppress(PxfsError):
                    desc["bytes_used"] = await self.target(r["node"]).usage(rec["id"])
                    break
        loc = self.attachments.local.get(rec["id"])
        if loc is not None:
            s = loc.vol.stats
            desc["io"] = {"reads": s.reads, "writes": s.writes, "bytes_read": s.bytes_read,
                          "bytes_written": s.bytes_written, "flushes": s.flushes,
                          "repairs": s.repairs, "discards": s.discards,
                          "bytes_discarded": s.bytes_discarded, "errors": s.errors,
                          "last_error": s.last_error, "last_error_at": s.last_error_at}
            # the attachment here fails all I/O (fenced): etcd's view of the
            # volume looks healthy, so say it where the user looks
            if loc.vol.fenced:
                desc["io_stopped"] = loc.vol.fenced
                # its own device and mount, still here (the paths above are
                # the new owner's, if any)
                desc["stopped_here"] = {"device": loc.device, "mount": loc.mount}
        desc["resyncs"] = [h for h in self.resyncer.history if h["volume"] == str(rec["id"])]
        return desc

    async def _collect_garbage_on_rejoin(self, _lease) -> None:
        try:
            await self.collect_garbage()
        except PxfsError as exc:        # the next rejoin or start tries again
            log.warning("cannot look for chunks of deleted volumes: %s", exc)

    async def collect_garbage(self, removed: bool = False) -> None:
        """Drop local chunks of volumes deleted while this node was away (at
        start, and when it has its lease again after losing it: a delete
        meanwhile did not wait for it).  The chunks are listed before etcd
        is read, so a volume made meanwhile cannot be taken for deleted.

        ``removed``: also of volumes whose replica here was removed while
        this node was away (ha-update).  Only at start, before the data
        port opens: a replica is added only on a node that answers there,
        and its copy must not be taken for what was left by a removal."""
        held = self.store.volumes()
        holders = {}
        for i in await self.kv.range(keys.vol_prefix(self.cfg.clusterid)):
            rec = codec.unpack_record(i.value)
            holders[rec["id"]] = {r["node"] for r in rec["replicas"]}
        for volid in held:
            if volid not in holders:
                log.info("removing chunks of deleted volume %d", volid)
                await self.replica.delete_volume(volid)
            elif removed and self.cfg.node_id not in holders[volid]:
                log.info("removing chunks of volume %d: its replica here was removed", volid)
                await self.replica.delete_volume(volid)


#: glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_io_buffers() -> None:
    """Keep freed I/O buffers in the heap for the next request.

    Every FUSE write and data-port payload is a fresh buffer of up to 1 MiB.
    glibc serves such sizes with mmap, or trims them off the heap top when
    freed, so the next buffer is faulted in and zeroed again page by page:
    ~30 faults per MiB written on the attached node, ~20 on a replica.
    Serving buffers up to 32 MiB from the heap and trimming it only past
    128 MiB free removes them; the cost is up to that much idle memory."""
    try:
        libc = ctypes.CDLL(None)        # this process's own C library
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)
    except (OSError, AttributeError):   # not glibc: its allocator, its defaults
        pass


async def serve_api(node: Node, *, task_status=trio.TASK_STATUS_IGNORED):
    from hypercorn.config import Config as HConfig
    from hypercorn.trio import serve
    from .api.app import build_app
    hc = HConfig()
    host = node.cfg.api_host
    hc.bind = [f"[{host}]:{node.cfg.api_port}" if ":" in host else f"{host}:{node.cfg.api_port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("pxfs.api.server")
    hc.loglevel = "WARNING"
    await serve(build_app(node), hc, task_status=task_status)


async def serve_docker(node: Node, *, task_status=trio.TASK_STATUS_IGNORED):
    """Docker's volume plugin ``pxd`` on the node's unix socket."""
    from hypercorn.config import Config as HConfig
    from hypercorn.trio import serve
    from .docker.plugin import Plugin, build_app
    path = node.cfg.docker_socket
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)                  # left by a node that died
        else:
            log.error("another process serves %s: no Docker plugin on this node", path)
            task_status.started()
            return
        finally:
            probe.close()
    plugin = Plugin(node)
    hc = HConfig()
    hc.bind = [f"unix:{path}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("pxfs.docker.server")
    hc.loglevel = "WARNING"
    try:
        async with trio.open_nursery() as n:
            await n.start(serve, build_app(plugin), hc)
            task_status.started()
            try:
                await plugin.mounts.restore()
            except PxfsError as exc:
                log.warning("restoring Docker mounts failed: %s", exc)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _clean_fuse_mountpoint(path: str) -> None:
    try:
        os.stat(path)
        stale = os.path.ismount(path)
    except FileNotFoundError:
        stale = False
    except OSError:
        stale = True          # "Transport endpoint is not connected": a dead earlier run
    if stale:
        log.warning("unmounting stale FUSE mount at %s", path)
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
        subprocess.run(["umount", "-l", path], capture_output=True)
    os.makedirs(path, exist_ok=True)


async def _wait_for_etcd(kv, cfg: config_mod.Config) -> None:
    """A node that starts while etcd is down (a power cut took both, and
    etcd comes back later) waits for it instead of exiting: nothing of the
    node is up meanwhile, and it says so every 30 s."""
    wait, said = 1.0, -1e9
    while True:
        try:
            with trio.fail_after(10):
                await kv.range(keys.node_prefix(cfg.clusterid))
            return
        except (MetaError, trio.TooSlowError) as exc:
            if trio.current_time() - said >= 30:
                said = trio.current_time()
                log.warning("waiting for etcd at %s: %s", cfg.kvdb_text,
                            str(exc) or "no answer in 10 s")
        await trio.sleep(wait)
        wait = min(5.0, wait * 2)


def _check_ports(cfg: config_mod.Config) -> None:
    """ConfigError if the API or data address cannot be listened on (held by
    another process): checked before any pool is mounted or anything is
    registered, so that a refused start leaves nothing behind."""
    for key, host, port in (("api_address", cfg.api_host, cfg.api_port),
                            ("data_address", cfg.data_host, cfg.data_port)):
        try:
            socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                 else socket.AF_INET).close()
        except OSError as exc:
            why = ("another process listens there" if exc.errno == errno.EADDRINUSE
                   else exc.strerror or str(exc))
            raise ConfigError(key, f"cannot listen on {host}:{port}: {why}") from None


#: in data_dir, flock'ed while the node runs: two nodes on one data_dir
#: would mount their pools over each other's
LOCK_FILE = "pxfsd.lock"
_held: list[int] = []


def _lock_data_dir(data_dir: str) -> None:
    try:
        os.makedirs(data_dir, exist_ok=True)
        fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
    except OSError as exc:              # (config.py checked the path; it changed since)
        raise ConfigError("data_dir", f"cannot use {data_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError("data_dir", f"{data_dir} is in use by another running pxfsd (pid "
                          f"{pid}); give each node a data_dir of its own") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held.append(fd)


def _check_fuse_mountpoint(path: str) -> None:
    """ConfigError if something live is mounted at the node's FUSE mount
    point: another pxfsd's view (starting over it would unmount that node's
    volumes as "stale") or anything else.  A FUSE mount whose process died
    ("not connected") is stale and is cleaned up at start."""
    real = os.path.realpath(path)
    fstype = next((t for _, m, t in hostdev.mounts() if m == real), None)
    if fstype is None:
        return
    if not fstype.startswith("fuse"):
        raise ConfigError("fuse_mountpoint", f"{path} is the mount point of another filesystem "
                          f"({fstype}); give the node a mount point of its own")
    box: dict = {}

    def probe():
        # statfs always asks the daemon; a stat may be answered from the
        # kernel's attribute cache for a while after the daemon died
        try:
            os.statvfs(real)
            box["live"] = True
        except OSError as exc:
            box["live"] = exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED)

    t = threading.Thread(target=probe, daemon=True)   # a paused daemon's mount hangs
    t.start()
    t.join(3)
    if t.is_alive() or box.get("live"):
        raise ConfigError("fuse_mountpoint", f"{path} is the FUSE mount of a running process "
                          "(another pxfsd's view?); give each node a mount point of its own")


async def _refuse_duplicate(kv, cfg: config_mod.Config):
    """ConfigError if another running pxfsd is this node already.  Its record
    in etcd names its API; a record whose lease still stands may also be
    this node's own last run, killed less than a lease ago: that one no
    longer answers, so ask the API whose it is.  Returns the alive key of
    such a dead run when its record names this process's own data address
    (Membership.end_previous_run may end its lease), else None."""
    nodes = {n["id"]: n for n in await list_nodes(kv, cfg.clusterid)}
    rec = nodes.get(cfg.node_id)
    if rec is None or not rec["online"]:
        return None
    alive = await kv.get(keys.alive_key(cfg.clusterid, cfg.node_id))
    previous = alive if rec.get("data") == cfg.data_addr else None
    if not rec.get("api"):
        return previous
    import httpx
    try:
        async with httpx.AsyncClient(timeout=3) as http:
            with trio.move_on_after(4):
                res = await http.get(f"{rec['api']}/v1/cluster/status")
                if res.status_code == 200 and res.json().get("node_id") == cfg.node_id \
                        and res.json().get("cluster_id") == cfg.clusterid:
                    raise ConfigError("node_id", f"node {cfg.node_id!r} is already running in "
                                      f"cluster {cfg.clusterid!r} (its API answers at "
                                      f"{rec['api']}); give each node an id of its own")
    except (httpx.HTTPError, ValueError):
        pass                    # nothing (or something else) answers there: a dead run
    return previous


async def _until_etcd(kv, cfg: config_mod.Config, sigs) -> bool:
    """Wait for etcd; False if told to stop meanwhile."""
    stopped = False
    async with trio.open_nursery() as nursery:
        async def watch():
            nonlocal stopped
            async for sig in sigs:
                log.info("signal %d while waiting for etcd: stopping", sig)
                stopped = True
                nursery.cancel_scope.cancel()
        nursery.start_soon(watch)
        await _wait_for_etcd(kv, cfg)
        nursery.cancel_scope.cancel()
    return not stopped


async def run_node(cfg: config_mod.Config, roots: list[str]) -> int:
    """The node, once etcd answers and says no other process is this node;
    the pools it mounts go into ``roots`` (main unmounts them)."""
    kv = EtcdKV(cfg.kvdb)
    # from the start: a stop while waiting for etcd (or starting) must still
    # unmount the pools (main's finally), not end the process where it is
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        try:
            started = await _until_etcd(kv, cfg, sigs)
            previous = None
            if started:
                previous = await _refuse_duplicate(kv, cfg)
                # formatted and claimed only now: a refused start leaves
                # the devices as they were
                roots += await trio.to_thread.run_sync(
                    pool.prepare, cfg.devices, cfg.data_dir, cfg.clusterid, cfg.node_id)
        except BaseException:
            await kv.close()
            raise
        if not started:
            await kv.close()
            return 0
        return await _run(cfg, kv, roots, sigs, previous)


async def _run(cfg: config_mod.Config, kv, roots: list[str], sigs, previous=None) -> int:
    from .fuse import view as fuse_view
    node = Node(cfg, kv, roots)
    prev = await trio.to_thread.run_sync(incarnation.begin, cfg.data_dir)
    await trio.to_thread.run_sync(node.store.sync_pools)
    node.replica.incarnation = await trio.to_thread.run_sync(
        incarnation.take, cfg.data_dir, roots, prev)
    node.attachments.recover_stale()
    # shared volumes' mounts whose processes died with this node, under its
    # osd root or at paths of their own (host mount --path, mount -t): a
    # dead pxfs mount is nobody's to keep (Docker's are mounted again
    # below, by the plugin's restore)
    with trio.move_on_after(10):
        await trio.to_thread.run_sync(hostdev.drop_dead_fuse_mounts, "/", True,
                                      abandon_on_cancel=True)
    _clean_fuse_mountpoint(cfg.fuse_mountpoint)
    os.makedirs(os.path.join(cfg.osd_root, "mounts"), exist_ok=True)
    try:
        hostdev.share_mounts_under(os.path.join(cfg.osd_root, "mounts"))
    except subprocess.CalledProcessError as exc:
        log.warning("cannot make %s a shared mount (%s): containers started by a dockerd in "
                    "another mount namespace may not see volumes mounted there",
                    os.path.join(cfg.osd_root, "mounts"), exc.stderr.decode(errors="replace").strip())
    fuse_view.mount(node.view, cfg.fuse_mountpoint)
    try:
        await node.collect_garbage(removed=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.replica.syncer.run)
            await nursery.start(RpcServer(cfg.data_host, cfg.data_port, node.replica.handle).run)
            with trio.move_on_after(max(2, cfg.lease_ttl)):
                try:
                    await node.membership.end_previous_run(previous)
                except MetaError as exc:
                    log.info("previous run's lease not revoked (it expires by itself): %s", exc)
            await nursery.start(node.membership.run)
            await nursery.start(node.address_service)
            await nursery.start(node.view.run)
            nursery.start_soon(fuse_view.serve)
            await nursery.start(node.resyncer.run)
            await nursery.start(node.attachments.checkpoint_service)
            if cfg.docker_socket:
                await nursery.start(serve_docker, node)
            await nursery.start(serve_api, node)
            log.info("node %s up: api %s, data %s, fuse %s", cfg.node_id, cfg.api_url,
                     cfg.data_addr, cfg.fuse_mountpoint)
            if cfg.unused:
                log.warning("config keys %s are Portworx's and not used by pxfs",
                            ", ".join(cfg.unused))
            print(f"pxfsd: node {cfg.node_id} ready", flush=True)
            async for sig in sigs:
                log.info("signal %d: stopping node", sig)
                break
            with trio.move_on_after(30):
                await node.attachments.shutdown()
            with trio.move_on_after(5):
                await node.membership.revoke()
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(Exception):
            fuse_view.unmount()
        node.store.close()
        await kv.close()
    return 0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="pxfsd", description="pxfs node daemon")
    ap.add_argument("--config", "-c", required=True, help="path of the node's config.json")
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"pxfsd: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format=f"%(asctime)s {cfg.node_id} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)    # a line per request otherwise
    if os.geteuid() != 0:
        print("pxfsd: must run as root (FUSE, loop devices, mounts)", file=sys.stderr)
        sys.exit(2)
    # many short FUSE/RPC handlers and worker threads share the GIL: switch often
    sys.setswitchinterval(0.0005)
    _keep_io_buffers()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    # every check that needs no etcd first: a refused start touches nothing
    try:
        _check_ports(cfg)
        _check_fuse_mountpoint(cfg.fuse_mountpoint)
        pool.check(cfg.devices)
    except ConfigError as exc:
        print(f"pxfsd: {exc}", file=sys.stderr)
        sys.exit(2)
    fresh = not os.path.exists(cfg.data_dir)
    roots: list[str] = []           # filled by run_node once the pools are mounted
    try:
        _lock_data_dir(cfg.data_dir)
        rc = trio.run(run_node, cfg, roots)
    except ConfigError as exc:
        print(f"pxfsd: {exc}", file=sys.stderr)
        rc = 2
    finally:
        incarnation.mark_clean(cfg.data_dir, roots)
        pool.release(roots, cfg.data_dir)
    if rc == 2 and fresh:           # a refused start leaves no data_dir behind
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(cfg.data_dir, LOCK_FILE))
        for d, _, _ in sorted(os.walk(cfg.data_dir), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(d)
    sys.exit(rc)


if __name__ == "__main__":
    main()
