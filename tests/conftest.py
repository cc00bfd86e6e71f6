"""Shared fixtures: a real etcd per test session, in-memory and etcd KVs,
and local clusters of real pxfsd processes started with pxfs-cluster."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from pxfs_tools.cluster import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each xdist worker picks its clusters' ports from a range of its own (the
# launchers inherit it): a port found free by one worker's launcher stays
# unbound until its node starts, and the other worker could pick it meanwhile.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    _nth = int(os.environ["PYTEST_XDIST_WORKER"][2:])
    _span = 22000 // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["PXFS_PORT_RANGE"] = f"{10000 + _nth * _span}-{10000 + (_nth + 1) * _span}"


#: Machine-wide: a test marked ``alone`` runs while no other test of any
#: xdist worker runs; every other test holds this lock shared.  For tests
#: whose machine-wide state another worker's test would change: the next
#: free loop device, or a dead FUSE mount (any node's start unmounts those).
ALONE_LOCK = "/tmp/pxfs-tests-alone.lock"


@pytest.fixture(autouse=True)
def _alone_or_together(request):
    alone = request.node.get_closest_marker("alone") is not None
    main = os.open(ALONE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    turn = os.open(ALONE_LOCK + ".turn", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # the turnstile: a test waiting to run alone lets no new test in
        # while it waits for those running to end
        fcntl.flock(turn, fcntl.LOCK_EX)
        try:
            fcntl.flock(main, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(turn, fcntl.LOCK_UN)
        yield
    finally:
        os.close(main)
        os.close(turn)


@pytest.fixture(scope="session")
def etcd_server():
    """(host, port) of a throw-away etcd (Debian's etcd-server)."""
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("etcd binary not installed (apt-get install etcd-server)")
    tmp = tempfile.mkdtemp(prefix="pxfs-etcd-")
    cport, pport = free_ports(2)
    url, peer = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    log = open(os.path.join(tmp, "etcd.log"), "wb")
    proc = subprocess.Popen(
        [binary, "--name", "t", "--data-dir", os.path.join(tmp, "data"), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", peer,
         "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}",
         "--unsafe-no-fsync", "--log-level", "warn"], stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    import httpx
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("etcd did not start: " + open(os.path.join(tmp, "etcd.log")).read()[-2000:])
        time.sleep(0.1)
    yield "127.0.0.1", cport
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def etcd_url(etcd_server):
    return f"http://{etcd_server[0]}:{etcd_server[1]}"


@pytest.fixture(params=["memkv", "etcd"])
async def kv(request):
    """The KV interface, once in memory and once over the real etcd."""
    if request.param == "memkv":
        from pxfs.meta.kv import MemKV
        store = MemKV()
    else:
        from pxfs.meta.etcd import EtcdKV
        host, port = request.getfixturevalue("etcd_server")
        store = EtcdKV([(host, port)])
    yield store
    await store.close()


@pytest.fixture
def cid():
    return "t-" + uuid.uuid4().hex[:10]


# -- real clusters ----------------------------------------------------------------
def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE, loop devices, mounts)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fuse3 not installed"
    return None


needs_mounts = pytest.mark.skipif(_can_mount() is not None, reason=_can_mount() or "")


class Cluster:
    """A running local cluster (pxfs-cluster up) and helpers to drive it."""

    def __init__(self, workdir: str, info: dict):
        self.workdir = workdir
        self.info = info
        self.nodes = {n["id"]: n for n in info["nodes"]}

    def api(self, node: str) -> str:
        return self.nodes[node]["api"]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pxfs_tools.cluster", *args,
                               "--workdir", self.workdir], capture_output=True, text=True,
                              cwd=ROOT, timeout=180)

    def pxctl(self, node: str, *args: str, check: bool = True, as_json: bool = True):
        argv = [sys.executable, os.path.join(ROOT, "pxctl"), "--host", self.api(node)]
        if as_json:
            argv.append("-j")
        res = subprocess.run(argv + list(args), capture_output=True, text=True, cwd=ROOT,
                             timeout=180)
        if check and res.returncode:
            raise AssertionError(f"pxctl {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        if not check:
            return res
        return json.loads(res.stdout) if as_json else res.stdout

    def stop_node(self, node: str, kill: bool = False) -> None:
        res = self.cli("stop-node", node, *(["--kill"] if kill else []))
        assert res.returncode == 0, res.stderr

    def start_node(self, node: str) -> None:
        res = self.cli("start-node", node)
        assert res.returncode == 0, res.stderr
        self.nodes[node].update(json.loads(res.stdout))

    def pid(self, node: str) -> int:
        with open(os.path.join(self.workdir, "cluster.json")) as fh:
            state = json.load(fh)
        return next(n["pid"] for n in state["nodes"] if n["id"] == node)

    def signal(self, node: str, sig: int) -> None:
        os.kill(self.pid(node), sig)

    def wait_for(self, fn, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = fn()
                if last:
                    return last
            except AssertionError as exc:
                last = exc
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}: {last}")

    def logs(self) -> str:
        out = []
        for n in self.nodes.values():
            try:
                out.append(f"--- {n['id']} ---\n" + open(n["log"], errors="replace").read()[-4000:])
            except OSError:
                pass
        return "\n".join(out)


@pytest.fixture
def make_cluster(etcd_url, tmp_path_factory, request):
    """Factory: make_cluster(nodes=3, dir_drives=True) -> Cluster; always torn down."""
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    made: list[Cluster] = []

    def make(nodes: int = 3, dir_drives: bool = True, lease_ttl: int = 3,
             own_etcd: bool = False) -> Cluster:
        """``own_etcd``: the launcher starts an etcd for this cluster alone
        (a test may then pause or stop it)."""
        workdir = str(tmp_path_factory.mktemp("cluster"))
        argv = [sys.executable, "-m", "pxfs_tools.cluster", "up", "--nodes", str(nodes),
                "--workdir", workdir, "--lease-ttl", str(lease_ttl), "--drive-size", "8G"]
        if not own_etcd:
            argv += ["--etcd", etcd_url]
        if dir_drives:
            argv.append("--dir-drives")
        res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=180)
        if res.returncode:
            subprocess.run([sys.executable, "-m", "pxfs_tools.cluster", "down", "--workdir", workdir],
                           cwd=ROOT, capture_output=True)
            raise AssertionError(f"pxfs-cluster up failed: {res.stderr}")
        c = Cluster(workdir, json.loads(res.stdout))
        made.append(c)
        return c

    yield make
    for c in made:
        # wake paused nodes so they can stop
        for n in c.nodes:
            try:
                pid = c.pid(n)
                if pid:
                    os.kill(pid, signal.SIGCONT)
            except (OSError, StopIteration, FileNotFoundError):
                pass
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(c.logs())
        subprocess.run([sys.executable, "-m", "pxfs_tools.cluster", "down", "--workdir", c.workdir],
                       cwd=ROOT, capture_output=True, timeout=240)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def drop_cache(path) -> None:
    """Take a file out of the page cache (written back first: DONTNEED keeps
    dirty pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def shared(make_cluster):
    """(cluster, mount(node, vol, path, *opts) -> path); every mount made is
    undone at the end, also when the test fails."""
    c = make_cluster(3)
    made = []

    def mount(node: str, vol: str, path: str, *opts: str, check: bool = True):
        os.makedirs(path, exist_ok=True)
        o = ",".join((f"node={c.api(node)}",) + opts)
        res = subprocess.run(["mount", "-t", "fuse.pxfs", vol, path, "-o", o],
                             capture_output=True, text=True, timeout=120)
        if not check:
            if res.returncode == 0:
                made.append(path)
            return res
        assert res.returncode == 0, res.stderr
        made.append(path)
        return path

    yield c, mount
    for path in reversed(made):
        subprocess.run(["umount", path], capture_output=True)
        subprocess.run(["umount", "-l", path], capture_output=True)


def mounts_of(c, vol):
    return c.pxctl("node1", "volume", "inspect", vol)["mounts"]
