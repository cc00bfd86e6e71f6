"""The Docker plugin through real dockerds, one per simulated host.

Each dockerd runs in its own mount namespace in which the node's plugin
socket directory is bound over /run/docker/plugins, so ``-d pxd`` on host N
reaches node N.  Images come from ``docker import`` of a busybox-static
rootfs; no registry and no network (``--network none``).  Skipped, with the
reason, where dockerd or busybox is missing or dockerd cannot start.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time

import pytest

from conftest import needs_mounts

pytestmark = needs_mounts
IMAGE = "pxfs-test-busybox:1"


def _busybox_tar() -> bytes:
    busybox = shutil.which("busybox")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "etc", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for applet in ("sh", "ls", "cat", "echo", "sleep", "sync", "wc", "test", "mkdir", "seq",
                       "md5sum", "dd", "tail", "grep"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    return buf.getvalue()


class Host:
    """One simulated host: a dockerd whose `pxd` is one node's plugin."""

    def __init__(self, name: str, statedir: str, plugin_dir: str):
        self.name, self.dir, self.plugin_dir = name, statedir, plugin_dir
        self.sock = os.path.join(statedir, "docker.sock")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        os.makedirs(self.dir, exist_ok=True)
        script = (f"mount --bind {self.plugin_dir} /run/docker/plugins && exec dockerd "
                  f"--data-root {self.dir}/data --exec-root {self.dir}/exec -H unix://{self.sock} "
                  f"--pidfile {self.dir}/docker.pid --iptables=false --bridge=none "
                  "--storage-driver vfs")
        log = open(os.path.join(self.dir, "dockerd.log"), "ab")
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c", script],
                                     stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("dockerd did not start: " + self.log_tail())
            time.sleep(0.3)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM: dockerd stops its containers (each Unmount reaches the plugin)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "dockerd.log"), "rb") as fh:
                return fh.read()[-3000:].decode(errors="replace")
        except OSError:
            return ""

    def docker(self, *args: str, check: bool = True, input: bytes | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess:
        res = subprocess.run(["docker", "-H", f"unix://{self.sock}", *args], input=input,
                             capture_output=True, timeout=timeout)
        if check and res.returncode:
            raise AssertionError(f"[{self.name}] docker {' '.join(args)}: {res.stderr.decode()}")
        return res

    def out(self, *args: str) -> str:
        return self.docker(*args).stdout.decode().strip()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.docker("run", "--network", "none", *args, check=check)


def _why_no_docker() -> str | None:
    for tool in ("dockerd", "docker", "busybox", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install docker.io busybox-static)"
    return None


@pytest.fixture
def hosts(make_cluster, tmp_path_factory):
    """(cluster, {node: Host}) for a 2-node cluster with a dockerd per node."""
    reason = _why_no_docker()
    if reason:
        pytest.skip(reason)
    c = make_cluster(2)
    os.makedirs("/run/docker/plugins", exist_ok=True)
    image = _busybox_tar()
    base = str(tmp_path_factory.mktemp("docker"))
    made = {}
    try:
        for nid, node in c.nodes.items():
            h = Host(nid, os.path.join(base, nid), os.path.dirname(node["docker_socket"]))
            try:
                h.start()
            except RuntimeError as exc:
                pytest.skip(f"dockerd cannot start on this machine: {exc}")
            made[nid] = h
            h.docker("import", "-", IMAGE, input=image)
        yield c, made
    finally:
        for h in made.values():
            ids = h.docker("ps", "-aq", check=False).stdout.decode().split()
            if ids:
                h.docker("rm", "-f", *ids, check=False)
            h.stop()


def test_create_with_options_and_inline_spec_then_write_and_read(hosts):
    c, h = hosts
    h1, h2 = h["node1"], h["node2"]
    h1.docker("volume", "create", "-d", "pxd", "--name", "dbvol", "--opt", "size=1G",
              "--opt", "repl=2", "--opt", "fs=ext4")
    generated = h1.out("volume", "create", "-d", "pxd", "--opt", "name=registry_volume",
                       "--opt", "size=1", "--opt", "block_size=64", "--opt", "repl=2",
                       "--opt", "fs=ext4")
    vol = c.pxctl("node2", "volume", "inspect", "dbvol")
    assert (vol["size"], vol["ha"], vol["fs"]) == (1 << 30, 2, "ext4")
    reg = c.pxctl("node1", "volume", "inspect", "registry_volume")
    assert (reg["block_size"], reg["ha"]) == (64 << 10, 2)
    assert json.loads(h2.out("volume", "inspect", generated))[0]["Status"]["name"] == "registry_volume"
    c.pxctl("node1", "volume", "create", "clivol", "--size", "1")
    for host in (h1, h2):                    # global scope: every host sees every volume
        listed = set(host.out("volume", "ls", "-q", "--filter", "driver=pxd").split())
        assert {"dbvol", "registry_volume", "clivol"} <= listed
    info = json.loads(h2.out("volume", "inspect", "dbvol"))[0]
    assert (info["Driver"], info["Scope"], info["Status"]["repl"]) == ("pxd", "global", 2)

    # bad options: the error names the problem and nothing is created
    before = {v["name"] for v in c.pxctl("node1", "volume", "list")}
    for opt, expect in (("sise=1", "unknown volume option 'sise'"), ("repl=7", "repl"),
                        ("fs=ntfs", "fs")):
        res = h1.docker("volume", "create", "-d", "pxd", "--name", "badvol", "--opt", opt, check=False)
        assert res.returncode and expect in res.stderr.decode(), res.stderr
    assert {v["name"] for v in c.pxctl("node1", "volume", "list")} == before

    # one container writes, the next reads it back, and so does a container on the other host
    h1.run("--rm", "-v", "dbvol:/data", IMAGE, "sh", "-c", "echo hello > /data/f && sync")
    assert h1.out("run", "--rm", "--network", "none", "-v", "dbvol:/data", IMAGE, "cat", "/data/f") == "hello"
    assert h2.out("run", "--rm", "--network", "none", "-v", "dbvol:/data", IMAGE, "cat", "/data/f") == "hello"

    # the inline spec: created on first use
    spec = "size=100M,repl=2,name=mysql_vol"
    h1.run("--rm", "--volume-driver", "pxd", "-v", f"{spec}:/var/lib/mysql", IMAGE, "sh", "-c",
           "echo row > /var/lib/mysql/t && sync")
    my = c.pxctl("node2", "volume", "inspect", "mysql_vol")
    assert (my["size"], my["ha"]) == (100 << 20, 2)
    assert h2.out("run", "--rm", "--network", "none", "--volume-driver", "pxd", "-v",
                  f"{spec}:/m", IMAGE, "cat", "/m/t") == "row"
    assert c.pxctl("node1", "volume", "inspect", "dbvol")["attached_on"] is None

    h2.docker("volume", "rm", "clivol", "registry_volume")
    assert "clivol" not in {v["name"] for v in c.pxctl("node1", "volume", "list")}


def test_volume_in_use_is_not_removed_or_mounted_elsewhere(hosts):
    c, h = hosts
    h1, h2 = h["node1"], h["node2"]
    h1.docker("volume", "create", "-d", "pxd", "--name", "busy", "--opt", "size=1")
    h1.run("-d", "--name", "holder", "-v", "busy:/data", IMAGE, "sleep", "600")
    res = h1.docker("volume", "rm", "busy", check=False)         # dockerd's own refusal
    assert res.returncode and "in use" in res.stderr.decode()
    res = h2.docker("volume", "rm", "busy", check=False)         # the plugin's, across hosts
    assert res.returncode and "in use" in res.stderr.decode() and "node1" in res.stderr.decode()
    res = h2.run("--rm", "-v", "busy:/data", IMAGE, "true", check=False)
    assert res.returncode and "attached on node node1" in res.stderr.decode()
    h1.docker("rm", "-f", "holder")
    c.wait_for(lambda: c.pxctl("node1", "volume", "inspect", "busy")["attached_on"] is None,
               what="last unmount detaches")
    h2.docker("volume", "rm", "busy")
    assert "busy" not in {v["name"] for v in c.pxctl("node1", "volume", "list")}


def test_shared_volume_used_by_two_hosts_at_once(hosts):
    c, h = hosts
    h1, h2 = h["node1"], h["node2"]
    h1.docker("volume", "create", "-d", "pxd", "--name", "shared1", "--opt", "shared=true",
              "--opt", "size=1", "--opt", "repl=2")
    assert c.pxctl("node2", "volume", "inspect", "shared1")["shared"] is True
    writer = ("i=0; while [ $i -lt 400 ]; do echo line$i >> /ws/log; i=$((i+1)); "
              "[ -e /ws/from2 ] && break; sleep 0.05; done; sleep 600")
    h1.run("-d", "--name", "writer", "-v", "shared1:/ws", IMAGE, "sh", "-c", writer)
    reader = ("for i in $(seq 200); do [ -s /ws/log ] && break; sleep 0.1; done; "
              "wc -l < /ws/log; echo hi > /ws/from2; sleep 600")
    h2.run("-d", "--name", "reader", "-v", "shared1:/ws", IMAGE, "sh", "-c", reader)

    def both_see():
        running = h1.out("ps", "-q", "--filter", "name=writer") and h2.out("ps", "-q", "--filter", "name=reader")
        seen = h1.docker("exec", "writer", "cat", "/ws/from2", check=False).stdout.decode().strip()
        return running and seen == "hi"
    c.wait_for(both_see, timeout=60, what="each host sees the other's writes")
    assert int(h2.out("logs", "reader").split()[0]) >= 1
    lines = h2.out("exec", "reader", "cat", "/ws/log").splitlines()
    assert lines == [f"line{i}" for i in range(len(lines))]
    assert {m["node"] for m in c.pxctl("node1", "volume", "inspect", "shared1")["mounts"]} == {"node1", "node2"}
    h1.docker("rm", "-f", "writer")
    h2.docker("rm", "-f", "reader")
    c.wait_for(lambda: c.pxctl("node1", "volume", "inspect", "shared1")["mounts"] == [],
               what="shared1 unmounted everywhere")
    h2.docker("volume", "rm", "shared1")


def test_restarts_of_dockerd_and_node_then_failover(hosts):
    c, h = hosts
    h1, h2 = h["node1"], h["node2"]
    h1.docker("volume", "create", "-d", "pxd", "--name", "app", "--opt", "size=1", "--opt", "repl=2")
    boot = "echo boot >> /data/boots && sync && sleep 600"
    h1.run("-d", "--restart", "always", "--name", "svc", "-v", "app:/data", IMAGE, "sh", "-c", boot)

    def boots() -> int:
        res = h1.docker("exec", "svc", "cat", "/data/boots", check=False)
        return res.stdout.decode().count("boot") if res.returncode == 0 else 0
    c.wait_for(lambda: boots() == 1, what="first boot")

    # dockerd restarts: its container stops (Unmount) and comes back (Mount)
    h1.stop()
    c.wait_for(lambda: c.pxctl("node1", "volume", "inspect", "app")["attached_on"] is None,
               what="detach after dockerd stopped the container")
    h1.start()
    c.wait_for(lambda: boots() == 2, timeout=60, what="container back after dockerd restart")

    # the node restarts: it mounts the volume again; a restarted container finds its data
    c.stop_node("node1")
    c.start_node("node1")
    res = h2.docker("volume", "rm", "app", check=False)
    assert res.returncode and "in use" in res.stderr.decode()
    h1.docker("restart", "-t", "1", "svc")
    c.wait_for(lambda: boots() == 3, timeout=60, what="container restarted after node restart")

    # the node dies: the container moves to the other host and finds the data there
    c.stop_node("node1", kill=True)
    deadline = time.monotonic() + 40
    while True:
        res = h2.run("--rm", "-v", "app:/data", IMAGE, "cat", "/data/boots", check=False)
        if res.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().split() == ["boot"] * 3
    c.start_node("node1")             # so that teardown finds every node up
