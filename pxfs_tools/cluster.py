"""pxfs-cluster: start and stop a local cluster (one etcd, N pxfs nodes on
loopback) under a work directory.  Used by the README, the tests and the
benchmarks; several clusters can run on one machine at once.

    pxfs-cluster up --nodes 3 --workdir DIR      prints {"etcd", "nodes": [...]}
    pxfs-cluster stop-node ID --workdir DIR [--kill]
    pxfs-cluster start-node ID --workdir DIR
    pxfs-cluster stop-etcd --workdir DIR [--kill]
    pxfs-cluster start-etcd --workdir DIR
    pxfs-cluster down --workdir DIR
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import random
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import click
import httpx

from pxfs.chunk.pool import MIN_DEVICE
from pxfs.errors import PxfsError
from pxfs.volume import hostdev
from pxfs.volume.spec import parse_size

STATE = "cluster.json"
NODE_LOCK_WAIT = 120             # s a stop-node/start-node waits for the command before it


def _port_range() -> tuple[int, int]:
    """Where free_ports looks: ``PXFS_PORT_RANGE=LOW-HIGH`` (launchers that
    run side by side, such as the test workers, each take their own range,
    so that neither picks a port the other has just found free but whose
    node has not bound it yet), else 10000 up to the kernel's ephemeral
    range."""
    spec = os.environ.get("PXFS_PORT_RANGE")
    if spec:
        try:
            lo, hi = (int(x) for x in spec.split("-"))
        except ValueError:
            lo = hi = 0
        if not 1024 <= lo < hi <= 65535:
            raise click.ClickException(f"PXFS_PORT_RANGE {spec!r}: expected LOW-HIGH within "
                                       "1024-65535, such as 10000-20000")
        return lo, hi
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return 10000, max(low, 12000)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports from _port_range (by default below
    the kernel's ephemeral range, so that no outgoing connection, which
    takes an ephemeral port, can grab one before its server binds it); all
    are held until all are found."""
    lo, hi = _port_range()
    held, ports = [], []
    try:
        for port in random.sample(range(lo, hi), k=min(4000, hi - lo)):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            ports.append(port)
            if len(ports) == n:
                return ports
    finally:
        for s in held:
            s.close()
    raise click.ClickException("no free loopback ports below the ephemeral range")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return True
        except ChildProcessError:
            pass
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _load(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, STATE)) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise click.ClickException(f"no cluster in {workdir} (no {STATE})") from None


def _save(workdir: str, state: dict) -> None:
    tmp = os.path.join(workdir, STATE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, os.path.join(workdir, STATE))


def _public(state: dict) -> dict:
    keys = ("id", "api", "data", "pid", "fuse", "osd_root", "config", "log", "docker_socket")
    return {"etcd": state["etcd"], "clusterid": state["clusterid"], "workdir": state["workdir"],
            "nodes": [{k: n.get(k) for k in keys} for n in state["nodes"]]}


def start_etcd(workdir: str, fast: bool) -> tuple[str, int, list[str]]:
    """A new etcd for the cluster: (client URL, pid, the argv that starts
    it again on the same ports and data, see start-etcd)."""
    cport, pport = free_ports(2)
    url, peer = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    argv = ["etcd", "--name", "pxfs-etcd", "--data-dir", os.path.join(workdir, "etcd"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"pxfs-etcd={peer}", "--log-level", "warn",
            # shared volumes rewrite inodes often: keep only an hour of history
            "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1"]
    if fast:
        argv.append("--unsafe-no-fsync")
    return url, _run_etcd(workdir, argv, url), argv


def _run_etcd(workdir: str, argv: list[str], url: str) -> int:
    """Start etcd with ``argv`` and wait until it is healthy; its pid."""
    log = open(os.path.join(workdir, "etcd.log"), "ab")
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    except FileNotFoundError:
        raise click.ClickException("etcd is not installed (apt-get install etcd-server)") from None
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=1) as http:
        while time.monotonic() < deadline:
            try:
                if http.get(url + "/health").status_code == 200:
                    return proc.pid
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    if proc.poll() is None:         # not healthy in time: it must not live on unowned
        proc.kill()
        proc.wait()
    raise click.ClickException(f"etcd did not start; see {workdir}/etcd.log")


@contextlib.contextmanager
def _workdir_lock(workdir: str, wait: float = 0):
    """One launcher command at a time per workdir: two ``up``s at once
    would start two etcds on one data dir, one of them owned by nobody, and
    a ``start-node`` beside a ``down`` would leave a node nobody stops.
    ``up`` and ``down`` refuse at once; ``stop-node``/``start-node`` wait
    up to ``wait`` seconds for the command before them."""
    try:
        fd = os.open(os.path.join(workdir, ".pxfs-cluster.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise click.ClickException(f"no cluster in {workdir} (no such directory)") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise click.ClickException(
                        f"another pxfs-cluster command is working in {workdir}; "
                        "try again when it is done") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _cluster_state(workdir: str, wait: float = 0):
    """The cluster's state, read under the workdir lock (checked first, so
    that a directory with no cluster gets a clear error and no lock file)."""
    _load(workdir)
    with _workdir_lock(workdir, wait):
        yield _load(workdir)            # again: an ``up`` may have just failed


def _old_drives(workdir: str) -> list[str]:
    """Pools an earlier cluster left in ``workdir`` (``down`` keeps them)."""
    out = []
    for name in sorted(os.listdir(workdir)):
        ndir = os.path.join(workdir, name)
        if name.startswith("node") and os.path.isdir(ndir):
            out += [os.path.join(ndir, d) for d in ("drive0.img", "drive0", "data")
                    if os.path.lexists(os.path.join(ndir, d))]
    return out


def _socket_path(ndir: str) -> str:
    """The node's Docker plugin socket; unix socket paths are short."""
    path = os.path.join(ndir, "docker", "pxd.sock")
    if len(path) > 100:
        digest = hashlib.sha1(ndir.encode()).hexdigest()[:12]
        path = f"/run/pxfs/{digest}/docker/pxd.sock"
    return path


def _spawn(node: dict) -> int:
    log = open(node["log"], "ab")
    proc = subprocess.Popen([sys.executable, "-m", "pxfs.node", "--config", node["config"]],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def _wait_ready(node: dict, timeout: float = 60) -> None:
    # one client for every try: a new one each time (its TLS context)
    # cost ~30 ms of CPU, a vCPU's third while a node waited for etcd
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline:
            try:
                if http.get(node["api"] + "/v1/cluster/status").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if not _alive(node["pid"]):
                break
            time.sleep(0.1)
    tail = open(node["log"], errors="replace").read()[-2000:]
    waiting = ("; it is waiting for etcd, which does not answer"
               if _alive(node["pid"]) and "waiting for etcd" in tail else "")
    raise click.ClickException(f"node {node['id']} did not come up{waiting}; log "
                               f"{node['log']}:\n{tail}")


@click.group()
def cli():
    """Run a local pxfs cluster."""


def _drive_size(ctx, param, value) -> int:
    try:
        return parse_size(value, minimum=MIN_DEVICE)
    except PxfsError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.option("--nodes", "count", default=3, type=click.IntRange(1, 9), show_default=True)
@click.option("--workdir", required=True, type=click.Path(file_okay=False))
@click.option("--drive-size", default="16G", show_default=True, callback=_drive_size,
              help="sparse drive file per node (a bare number is GiB; at least 300M)")
@click.option("--etcd", "etcd_url", default=None, help="use this etcd instead of starting one")
@click.option("--lease-ttl", default=5, type=click.IntRange(2, 60), show_default=True)
@click.option("--fast/--durable-etcd", default=False, help="start etcd with --unsafe-no-fsync (tests)")
@click.option("--dir-drives", is_flag=True, help="use plain directories as drives (no loop mounts)")
def up(count, workdir, drive_size, etcd_url, lease_ttl, fast, dir_drives):
    """Start etcd and N nodes; print the cluster as JSON."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with _workdir_lock(workdir):
        _up(count, workdir, drive_size, etcd_url, lease_ttl, fast, dir_drives)


def _up(count, workdir, drive_size, etcd_url, lease_ttl, fast, dir_drives):
    if os.path.exists(os.path.join(workdir, STATE)):
        raise click.ClickException(f"{workdir} already holds a cluster; run down first")
    old = _old_drives(workdir)
    if old:
        raise click.ClickException(
            f"{workdir} holds the drives of an earlier cluster ({old[0]}, ...); a new cluster "
            f"would not take them over: remove them (rm -rf {workdir}) or use another workdir")
    state = {"workdir": workdir, "clusterid": "pxfs-" + secrets.token_hex(4), "nodes": [],
             "etcd_pid": None}
    if etcd_url:
        state["etcd"] = etcd_url
    else:
        state["etcd"], state["etcd_pid"], state["etcd_argv"] = start_etcd(workdir, fast)
    _save(workdir, state)
    made: list[str] = []
    try:
        ports = free_ports(2 * count)           # all at once: distinct across nodes
        for i in range(1, count + 1):
            nid = f"node{i}"
            ndir = os.path.join(workdir, nid)
            os.makedirs(ndir, exist_ok=True)
            if dir_drives:
                drive = os.path.join(ndir, "drive0")
                os.makedirs(drive, exist_ok=True)
            else:
                drive = os.path.join(ndir, "drive0.img")
                made.append(drive)
                res = subprocess.run(["truncate", "-s", str(drive_size), drive],
                                     capture_output=True, text=True)
                if res.returncode:
                    raise click.ClickException(f"cannot make the drive {drive}: "
                                               + " ".join(res.stderr.split()))
            api, data = ports[2 * i - 2:2 * i]
            cfg = {"clusterid": state["clusterid"], "kvdb": [f"etcd:{state['etcd']}"],
                   "storage": {"devices": [drive]}, "node_id": nid,
                   "api_address": f"127.0.0.1:{api}", "data_address": f"127.0.0.1:{data}",
                   "data_dir": os.path.join(ndir, "data"),
                   "fuse_mountpoint": os.path.join(ndir, "fuse"),
                   "osd_root": os.path.join(ndir, "osd"), "lease_ttl": lease_ttl,
                   "docker_socket": _socket_path(ndir),
                   "log_level": "info"}
            cpath = os.path.join(ndir, "config.json")
            with open(cpath, "w") as fh:
                json.dump(cfg, fh, indent=2)
            node = {"id": nid, "api": f"http://127.0.0.1:{api}", "data": f"127.0.0.1:{data}",
                    "pid": None, "fuse": cfg["fuse_mountpoint"], "osd_root": cfg["osd_root"],
                    "config": cpath, "log": os.path.join(ndir, "pxfsd.log"),
                    "docker_socket": cfg["docker_socket"]}
            node["pid"] = _spawn(node)
            state["nodes"].append(node)
            _save(workdir, state)
        for node in state["nodes"]:
            _wait_ready(node)
    except BaseException:
        _down(state)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(workdir, STATE))
        # a cluster that never came up holds no data: its drives would only
        # make the next `up` in this workdir refuse
        for drive in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(drive)
        raise
    click.echo(json.dumps(_public(state)))


def _find(state, nid):
    for n in state["nodes"]:
        if n["id"] == nid:
            return n
    raise click.ClickException(f"no node {nid!r} in this cluster")


def _terminate(pid: int, kill: bool, grace: float) -> None:
    """SIGTERM (or SIGKILL) ``pid``; SIGKILL it if it lives ``grace`` s on."""
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    if not _wait_exit(pid, grace):
        os.kill(pid, signal.SIGKILL)
        _wait_exit(pid, 10)


def _stop(node: dict, kill: bool) -> None:
    pid = node.get("pid")
    if _alive(pid):
        _terminate(pid, kill, 5 if kill else 60)
    node["pid"] = None


@cli.command("stop-node")
@click.argument("nid")
@click.option("--workdir", required=True)
@click.option("--kill", is_flag=True, help="SIGKILL instead of SIGTERM")
def stop_node(nid, workdir, kill):
    """Stop one node (its drives are kept)."""
    workdir = os.path.abspath(workdir)
    with _cluster_state(workdir, wait=NODE_LOCK_WAIT) as state:
        node = _find(state, nid)
        _stop(node, kill)
        _save(workdir, state)


def _own_etcd(state: dict) -> list[str]:
    argv = state.get("etcd_argv")
    if not argv:
        raise click.ClickException("this cluster uses an etcd the launcher did not start "
                                   f"({state['etcd']}): stop and start it where it runs")
    return argv


@cli.command("stop-etcd")
@click.option("--workdir", required=True)
@click.option("--kill", is_flag=True, help="SIGKILL instead of SIGTERM")
def stop_etcd(workdir, kill):
    """Stop the cluster's etcd (its data is kept; start-etcd starts it
    again), to see what the nodes do without it."""
    workdir = os.path.abspath(workdir)
    with _cluster_state(workdir, wait=NODE_LOCK_WAIT) as state:
        _own_etcd(state)
        pid = state.get("etcd_pid")
        if not _alive(pid):
            raise click.ClickException("etcd is not running; start-etcd starts it")
        _terminate(pid, kill, 10)
        state["etcd_pid"] = None
        _save(workdir, state)


@cli.command("start-etcd")
@click.option("--workdir", required=True)
def start_etcd_cmd(workdir):
    """Start the cluster's etcd again, on its old ports and data."""
    workdir = os.path.abspath(workdir)
    with _cluster_state(workdir, wait=NODE_LOCK_WAIT) as state:
        argv = _own_etcd(state)
        if _alive(state.get("etcd_pid")):
            raise click.ClickException(f"etcd is running (pid {state['etcd_pid']})")
        state["etcd_pid"] = _run_etcd(workdir, argv, state["etcd"])
        _save(workdir, state)
    click.echo(json.dumps({"etcd": state["etcd"], "pid": state["etcd_pid"]}))


@cli.command("start-node")
@click.argument("nid")
@click.option("--workdir", required=True)
def start_node(nid, workdir):
    """Start a stopped node again with its old drives."""
    workdir = os.path.abspath(workdir)
    with _cluster_state(workdir, wait=NODE_LOCK_WAIT) as state:
        node = _find(state, nid)
        if _alive(node.get("pid")):
            raise click.ClickException(f"node {nid} is running (pid {node['pid']})")
        node["pid"] = _spawn(node)
        _save(workdir, state)
        _wait_ready(node)
    click.echo(json.dumps(node))


def _stop_mount_processes(api_urls: list[str]) -> None:
    """Stop shared-volume mount processes (``pxfs``) that use this cluster's
    nodes: SIGTERM unmounts; whatever is left after 5 s is killed."""
    def ours() -> list[int]:
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "pxfs.mount" in argv and any(f"node={u}" in a for a in argv for u in api_urls):
                pids.append(int(pid))
        return pids
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = ours()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = ours()
        if not pids:
            return


def _cleanup_mounts(workdir: str) -> None:
    """Lazily unmount whatever is still mounted under the work dir, detach
    loop devices backed by files there (innermost first)."""
    prefix = workdir.rstrip("/") + "/"
    loops = []
    text = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True,
                          text=True).stdout
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(prefix):
            loops.append(parts[0])
    for _ in range(3):
        mounts = [tgt for src, tgt, _ in hostdev.mounts()
                  if tgt.startswith(prefix) or src in loops]
        if not mounts:
            break
        for tgt in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", tgt], capture_output=True)
    for dev in loops:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    if os.path.isdir("/dev/pxd"):
        for name in os.listdir("/dev/pxd"):
            link = os.path.join("/dev/pxd", name)
            if os.path.islink(link) and os.readlink(link) in loops:
                os.unlink(link)


def _down(state: dict) -> None:
    # mounts first: while their nodes are up they record their sizes and go
    _stop_mount_processes([n["api"] for n in state["nodes"] if n.get("api")])
    for node in state["nodes"]:
        try:
            _stop(node, kill=False)
        except OSError:
            pass
    _cleanup_mounts(state["workdir"])
    if state.get("etcd_pid") and _alive(state["etcd_pid"]):
        _terminate(state["etcd_pid"], False, 10)
    state["etcd_pid"] = None


@cli.command()
@click.option("--workdir", required=True)
def down(workdir):
    """Stop every process this cluster started and unmount what it mounted."""
    workdir = os.path.abspath(workdir)
    with _cluster_state(workdir) as state:
        _down(state)
        os.unlink(os.path.join(workdir, STATE))


def main():
    cli()


if __name__ == "__main__":
    main()
