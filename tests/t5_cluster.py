"""End-to-end: real etcd, real pxfsd processes, FUSE, loop devices, mkfs and
mount, driven through pxctl as a user would."""

from __future__ import annotations

import errno
import hashlib
import fcntl
import json
import mmap
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, drop_cache, needs_mounts

pytestmark = needs_mounts
MiB = 1 << 20


def dd_write(dev: str, pattern: bytes, offset_mib: int, count_mib: int) -> None:
    """Write ``count_mib`` MiB of a repeated pattern (buffered), then fsync."""
    block = (pattern * (MiB // len(pattern) + 1))[:MiB]
    fd = os.open(dev, os.O_WRONLY)
    try:
        for i in range(count_mib):
            os.pwrite(fd, block, (offset_mib + i) * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


def dd_read(dev: str, offset_mib: int, count_mib: int) -> bytes:
    res = subprocess.run(["dd", f"if={dev}", "bs=1M", f"skip={offset_mib}", f"count={count_mib}",
                          "iflag=direct", "status=none"], capture_output=True, check=True)
    return res.stdout


def attach_after_failover(c, node: str, vol: str, timeout: float) -> None:
    """Attach ``vol`` on ``node`` as soon as the old attachment's lease is gone."""
    c.wait_for(lambda: c.pxctl(node, "host", "attach", vol, check=False).returncode == 0,
               timeout=timeout, what=f"attach of {vol} on {node}")


def replica_states(c, node, vol):
    return {r["node"]: r["state"] for r in c.pxctl(node, "volume", "inspect", vol)["replicas"]}


def test_status_create_list_inspect(make_cluster):
    c = make_cluster(3)
    st = c.pxctl("node1", "status")
    assert st["node_id"] == "node1"
    assert sorted(n["id"] for n in st["nodes"]) == ["node1", "node2", "node3"]
    assert all(n["status"] == "Online" and n["pool_total"] > 0 for n in st["nodes"])
    text = c.pxctl("node1", "status", as_json=False)
    assert "Status: PX is operational" in text and st["cluster_id"] in text

    v = c.pxctl("node1", "volume", "create", "dbvol", "--size", "2", "--repl", "2", "--fs", "ext4",
                "--label", "app=db")
    assert len(v["id"]) == 18 and v["id"].isdigit()
    assert v["size"] == 2 << 30 and v["ha"] == 2 and v["labels"] == {"app": "db"}
    assert v["block_size"] == 32 * 1024 and v["io_priority"] == "LOW"
    assert v["status_text"] == "up - detached"
    out = c.pxctl("node2", "volume", "list", as_json=False)
    header = out.splitlines()[0].split()
    assert header == ["ID", "NAME", "SIZE", "HA", "SHARED", "ENCRYPTED", "IO_PRIORITY", "SCALE", "STATUS"]
    assert "dbvol" in out and "up - detached" in out
    # thin: nothing used until written
    ins = c.pxctl("node3", "volume", "inspect", v["id"])
    assert ins["name"] == "dbvol" and ins["bytes_used"] == 0
    assert len(ins["replicas"]) == 2 and all(r["state"] == "in_sync" for r in ins["replicas"])
    # defaults
    d = c.pxctl("node1", "volume", "create", "defaults")
    assert (d["size"], d["fs"], d["ha"], d["block_size"]) == (1 << 30, "ext4", 1, 32 * 1024)
    # inline spec through the REST API
    import httpx
    r = httpx.post(c.api("node1") + "/v1/volumes", json={"spec": "size=100M,ha=2,name=mysql_vol,bs=64"})
    assert r.status_code == 200, r.text
    assert r.json()["block_size"] == 64 * 1024 and r.json()["ha"] == 2


def test_repl_limited_by_online_nodes(make_cluster):
    c = make_cluster(3)
    # node3 was killed a moment ago: etcd shows it Online until its lease
    # runs out, but no replica is placed on it
    c.stop_node("node3", kill=True)
    assert [n["status"] for n in c.pxctl("node1", "status")["nodes"] if n["id"] == "node3"] \
        == ["Online"], "the lease ran out already: the test checks nothing"
    res = c.pxctl("node1", "volume", "create", "v1", "--nodes", "node3", check=False)
    assert res.returncode == 1 and "node 'node3' does not answer" in res.stderr, res.stderr
    res = c.pxctl("node1", "volume", "create", "v3", "--repl", "3", check=False)
    assert res.returncode == 1
    assert "only 2 node(s) online" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    c.pxctl("node1", "volume", "create", "v2", "--repl", "2")
    assert sorted(r["node"] for r in c.pxctl("node1", "volume", "inspect", "v2")["replicas"]) \
        == ["node1", "node2"]
    c.pxctl("node1", "volume", "delete", "v2")
    c.stop_node("node2")
    res = c.pxctl("node1", "volume", "create", "v2", "--repl", "2", check=False)
    assert res.returncode == 1 and "only 1 node(s) online" in res.stderr
    assert c.pxctl("node1", "volume", "list") == []


BAD_CREATES = [
    (["--size", "abc"], "size"), (["--size", "0"], "minimum"), (["--size", "100T"], "maximum"),
    (["--size", "5X"], "size"), (["--fs", "btrfs"], "fs"), (["--block_size", "3"], "block_size"),
    (["--block_size", "48"], "power of two"), (["--repl", "0"], "repl"), (["--repl", "4"], "repl"),
    (["--repl", "two"], "repl"), (["--cos", "10"], "cos"), (["--cos", "urgent"], "cos"),
    (["--label", "novalue"], "label"), (["--nodes", "nodeX"], "nodeX"),
    (["--nodes", "node1,node1"], "twice"), (["--repl", "1", "--nodes", "node1,node2"], "repl"),
    (["--bogus", "1"], "No such option '--bogus'"), (["--size"], "requires an argument"),
]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "bad\x01name", "x" * 200, "123456", ".hidden"])
def test_bad_names_rejected(make_cluster, name):
    c = make_cluster(1)
    res = c.pxctl("node1", "volume", "create", name, check=False)
    assert res.returncode == 1 and res.stderr.startswith("pxctl: ") and "name" in res.stderr
    assert c.pxctl("node1", "volume", "list") == []


def test_bad_create_flags_rejected(make_cluster):
    c = make_cluster(2)
    for args, word in BAD_CREATES:
        res = c.pxctl("node1", "volume", "create", "v", *args, check=False)
        assert res.returncode != 0, args
        assert word in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    import httpx
    for body in ({"spec": "size=1,name=a,colour=red"}, {"spec": "size=big,name=a"},
                 {"spec": "repl=2"}, {"name": "a", "size": [1]}, {"name": "a", "bogus": 1},
                 {"name": "a", "labels": ["x"]}):
        r = httpx.post(c.api("node1") + "/v1/volumes", json=body)
        assert r.status_code == 400 and r.json()["error"], body
    r = httpx.post(c.api("node1") + "/v1/volumes", content=b"{not json")
    assert r.status_code == 400
    r = httpx.post(c.api("node1") + "/v1/volumes", content=b"[" * 100000)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text
    r = httpx.post(c.api("node1") + "/v1/volumes", content=b" " * (2 << 20))
    assert r.status_code == 413 and "larger than" in r.json()["error"], r.text
    r = httpx.post(c.api("node1") + "/v1/volumes", json={
        "name": "a", "labels": {f"k{i}": "v" for i in range(65)}})
    assert r.status_code == 400 and "65 labels given" in r.json()["error"], r.text
    for body, said in (({"name": True}, "name must be a string"),
                       ({"name": 123}, "name must be a string"),
                       ({"name": "a", "fs": None}, "fs must be a string"),
                       ({"name": "a", "repl": True}, "repl must be a whole number"),
                       ({"name": "a", "size": -1.5}, "expected a number of GiB"),
                       ({"name": "a", "size": 1e300}, "above the maximum"),
                       ({"name": "a", "shared": 1}, "shared must be true or false")):
        r = httpx.post(c.api("node1") + "/v1/volumes", json=body)
        assert r.status_code == 400 and said in r.json()["error"], (body, r.text)
    r = httpx.post(c.api("node1") + "/v1/volumes", content=b'{"name": "a", "size": 1e400}')
    assert r.status_code == 400 and "above the maximum" in r.json()["error"], r.text
    r = httpx.post(c.api("node1") + "/v1/volumes", content=b'{"name": "a", "size": NaN}')
    assert r.status_code == 400 and "size must be a number" in r.json()["error"], r.text
    r = httpx.post(c.api("node1") + "/v1/volumes", json={"name": "half", "size": 1.5})
    assert r.status_code == 200 and r.json()["size"] == 3 << 29, r.text      # as --size 1.5
    c.pxctl("node1", "volume", "delete", "half")
    r = httpx.post(c.api("node1") + "/v1/volumes", content=b'{"name": "a", "size": 1, "size": 2}')
    assert r.status_code == 400 and "gives 'size' twice" in r.json()["error"], r.text
    r = httpx.post(c.api("node1") + "/v1/volumes/nope/attach", json={"force": True})
    assert r.status_code == 400 and "takes no fields" in r.json()["error"], r.text
    for body in ({"name": "a", "labels": {"x": "1,y=2"}}, {"name": "a", "repl": 2,
                                                          "nodes": ["node1;node2"]},
                 {"name": "a", "fs": "xfs", "shared": True}):
        r = httpx.post(c.api("node1") + "/v1/volumes", json=body)
        assert r.status_code == 400 and r.json()["error"], body
    # repeated -l, or one key twice
    for args in (["-l", "a=b", "-l", "a=c"], ["-l", "a=b,a=c"], ["-l", ""]):
        res = c.pxctl("node1", "volume", "create", "v", *args, check=False)
        assert res.returncode == 1 and "label" in res.stderr, (args, res.stderr)
    # inline spec and flags together
    res = c.pxctl("node1", "volume", "create", "size=1,name=v", "--repl", "2", check=False)
    assert res.returncode == 2 and "either an inline spec or flags" in res.stderr
    # unknown endpoints and methods answer in the API's error form
    r = httpx.get(c.api("node1") + "/v1/nope")
    assert r.status_code == 404 and "no such API endpoint" in r.json()["error"]
    r = httpx.put(c.api("node1") + "/v1/volumes")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]
    for r in (httpx.get(c.api("node1") + "/v1/volumes/v/attach"),
              httpx.delete(c.api("node1") + "/v1/volumes/v/mount")):
        assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
        assert "not allowed" in r.json()["error"]
    res = c.pxctl("node1", "volume", "inspect", check=False)        # a usage error: one line too
    assert res.returncode == 2 and res.stderr.startswith("pxctl: Missing argument"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = c.pxctl("node1", "volume", "inspect", "../v1", check=False)
    assert res.returncode == 1 and "volume '../v1' not found" in res.stderr
    assert c.pxctl("node1", "volume", "list") == []
    # the flags' good forms: labels repeated, inline spec
    c.pxctl("node1", "volume", "create", "lv", "-l", "a=b", "-l", "c=d")
    assert c.pxctl("node1", "volume", "inspect", "lv")["labels"] == {"a": "b", "c": "d"}
    c.pxctl("node1", "volume", "create", "size=1,repl=2,name=sv,label=x=y")
    sv = c.pxctl("node1", "volume", "inspect", "sv")
    assert sv["ha"] == 2 and sv["labels"] == {"x": "y"}
    res = c.pxctl("node1", "volume", "inspect", "lv", "nope", as_json=False, check=False)
    assert res.returncode == 1 and "Name" in res.stdout and "'nope' not found" in res.stderr
    # -j: several asked, a list (of those found) whatever how many were found
    res = c.pxctl("node1", "volume", "inspect", "nope", "lv", check=False)
    assert res.returncode == 1 and [v["name"] for v in json.loads(res.stdout)] == ["lv"]


def _traces(c, etcd_server) -> tuple[dict, dict]:
    """What a create leaves: the cluster's etcd keys (but the node records,
    which the nodes refresh) and every node's pool directories."""
    import trio

    from pxfs.meta import keys
    from pxfs.meta.etcd import EtcdKV
    cid = c.pxctl("node1", "status")["cluster_id"]

    async def get():
        kv = EtcdKV([etcd_server])
        try:
            return {i.key: i.value for i in await kv.range(keys.cluster_prefix(cid))
                    if not i.key.startswith((keys.node_prefix(cid), keys.alive_prefix(cid)))}
        finally:
            await kv.close()
    pools = {}
    for n in c.nodes.values():
        drive = json.load(open(n["config"]))["storage"]["devices"][0]
        for top, dirs, files in os.walk(drive):
            pools[top] = sorted(dirs + files)
    return trio.run(get), pools


#: each inline-spec key with a wrong value, and what the error says
BAD_SPECS = [
    ("name=a/b,size=1", "'/'"), ("name=v,size=ten", "size 'ten'"),
    ("name=v,size=1M", "below the minimum"), ("name=v,fs=btrfs", "fs 'btrfs'"),
    ("name=v,block_size=48", "power of two"), ("name=v,bs=3", "'3'"),
    ("name=v,repl=4", "repl '4'"), ("name=v,ha=two", "'two'"), ("name=v,cos=10", "cos '10'"),
    ("name=v,io_priority=urgent", "'urgent'"), ("name=v,label=novalue", "label 'novalue'"),
    ("name=v,nodes=node1;node1", "named twice"), ("name=v,repl=1,nodes=node1;node2", "repl"),
    ("name=v,shared=maybe", "shared 'maybe'"), ("name=v,colour=red", "unknown volume option"),
    ("name=v,size=1,size=2", "twice"), ("size=1,repl=2", "name"),
]


def test_bad_inline_specs_leave_no_trace(make_cluster, etcd_server):
    """Every inline-spec key with a wrong value, through pxctl and the REST
    API: a one-line error that says what is wrong, and nothing created in
    etcd or on any pool; then the same for bad flags and names."""
    import httpx
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "keep", "--size", "64M", "--repl", "2")
    before = _traces(c, etcd_server)
    for text, fragment in BAD_SPECS:
        res = c.pxctl("node1", "volume", "create", text, check=False)
        assert res.returncode == 1 and fragment in res.stderr, (text, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        r = httpx.post(c.api("node2") + "/v1/volumes", json={"spec": text})
        assert r.status_code == 400 and fragment in r.json()["error"], (text, r.text)
    for args, word in BAD_CREATES:
        res = c.pxctl("node2", "volume", "create", "v", *args, check=False)
        assert res.returncode != 0 and word in res.stderr, (args, res.stderr)
    for name in ("../x", "a/b", "bad\x01name", "x" * 200):
        res = c.pxctl("node1", "volume", "create", name, check=False)
        assert res.returncode == 1 and "name" in res.stderr, (name, res.stderr)
    assert _traces(c, etcd_server) == before
    assert [v["name"] for v in c.pxctl("node1", "volume", "list")] == ["keep"]


def test_concurrent_create_same_name(make_cluster):
    c = make_cluster(2)
    results = []

    def create(node):
        results.append(c.pxctl(node, "volume", "create", "race", "--repl", "2", check=False))

    for _ in range(3):
        threads = [threading.Thread(target=create, args=(n,)) for n in ("node1", "node2") * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for r in results if r.returncode == 0]
        assert len(ok) == 1, [r.stderr for r in results]
        assert all("already exists" in r.stderr for r in results if r.returncode)
        assert len(c.pxctl("node1", "volume", "list")) == 1
        c.pxctl("node1", "volume", "delete", "race")
        results.clear()


def test_attach_mount_detach_delete(make_cluster):
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "v", "--size", "512M", "--repl", "2")
    # a mount that fails undoes the attach it made (the node's osd_root/mounts
    # is a mount point of its own: a shared bind mount)
    res = c.pxctl("node1", "host", "mount", "v", "--path",
                  os.path.join(c.nodes["node1"]["osd_root"], "mounts"), check=False)
    assert res.returncode == 1 and "already a mount point" in res.stderr, res.stderr
    assert c.pxctl("node1", "volume", "inspect", "v")["attached_on"] is None
    res = c.pxctl("node1", "host", "mount", "v", "--path", "/proc", check=False)
    assert res.returncode == 1 and "kernel's process tree" in res.stderr, res.stderr
    afile = os.path.join(c.workdir, "afile")
    open(afile, "w").close()
    full = os.path.join(c.workdir, "full")
    os.mkdir(full)
    open(os.path.join(full, "keep"), "w").close()
    fuse = c.nodes["node1"]["fuse"]
    data_dir = json.load(open(c.nodes["node1"]["config"]))["data_dir"]
    os.mkdir(data_dir + "/evil")
    sneaky = os.path.join(c.workdir, "sneaky")          # a symlink into the data directory
    os.symlink(data_dir + "/evil", sneaky)
    for path, said in ((afile, "is not a directory"), (sneaky, "data directory"), (afile + "/sub", "cannot make the mount"),
                       (full, "is not empty"), (full + "/new\nline", "control character"),
                       (c.workdir + "/" + "d" * 256 + "/x", "longer than 255 bytes"),
                       # the node's own FUSE view (looking at it on the node's
                       # event loop once hung the node), its data, a parent
                       (fuse, "FUSE view"), (fuse + "/v", "FUSE view"),
                       (data_dir + "/pools", "data directory"),
                       (os.path.dirname(fuse), "FUSE view")):
        res = c.pxctl("node1", "host", "mount", "v", "--path", path, check=False)
        assert res.returncode == 1 and said in res.stderr, res.stderr
        assert c.pxctl("node1", "volume", "inspect", "v")["attached_on"] is None
    assert os.listdir(full) == ["keep"]
    import httpx
    r = httpx.post(c.api("node1") + "/v1/volumes/v/mount", json={"path": full + "/a\x00b"})
    assert r.status_code == 400 and "control character" in r.json()["error"], r.text
    ins = c.pxctl("node1", "volume", "inspect", "v")
    assert ins["attached_on"] is None and ins["bytes_used"] == 0, ins      # not formatted
    c.pxctl("node1", "volume", "create", "sv", "--shared", "--size", "64M")
    r = httpx.post(c.api("node1") + "/v1/volumes/sv/mount", json={"path": full + "/a\x00b"})
    assert r.status_code == 400 and "control character" in r.json()["error"], r.text
    res = c.pxctl("node1", "host", "mount", "sv", "--path", fuse + "/x", check=False)
    assert res.returncode == 1 and "FUSE view" in res.stderr, res.stderr
    res = c.pxctl("node1", "host", "mount", "sv", "--path", full, check=False)
    assert res.returncode == 1 and "is not empty" in res.stderr, res.stderr
    res = c.pxctl("node1", "host", "mount", "sv", "--path", sneaky, check=False)
    assert res.returncode == 1 and "data directory" in res.stderr, res.stderr
    assert not os.path.ismount(data_dir + "/evil")
    assert os.listdir(full) == ["keep"] and not os.path.ismount(full)
    c.pxctl("node1", "volume", "delete", "sv")
    a = c.pxctl("node1", "host", "attach", "v")
    assert a["device"].startswith("/dev/loop") and os.path.realpath(a["pxd"]) == a["device"]
    # the FUSE view's files are pxfs's: changing them by hand is refused plainly
    for change in (lambda: os.symlink("/etc/passwd", fuse + "/x"), lambda: os.mkdir(fuse + "/d"),
                   lambda: open(fuse + "/new", "w"), lambda: os.unlink(fuse + "/v"),
                   lambda: os.rename(fuse + "/v", fuse + "/w"), lambda: os.mknod(fuse + "/n")):
        with pytest.raises(PermissionError):
            change()
    assert os.listdir(fuse) == ["v"]
    # a volume is attached on at most one node
    res = c.pxctl("node2", "host", "attach", "v", check=False)
    assert res.returncode == 1 and "attached on node node1" in res.stderr
    m = c.pxctl("node1", "host", "mount", "v")
    assert m["mount"] == os.path.join(c.nodes["node1"]["osd_root"], "mounts", "v")
    with open(os.path.join(m["mount"], "hello"), "w") as fh:
        fh.write("hello pxfs")
        fh.flush()
        os.fsync(fh.fileno())
    assert "attached on node1" in c.pxctl("node2", "volume", "inspect", "v")["status_text"]
    res = c.pxctl("node1", "volume", "delete", "v", check=False)
    assert res.returncode == 1 and "attached" in res.stderr
    res = c.pxctl("node1", "host", "detach", "v", check=False)
    assert res.returncode == 1 and "unmount it first" in res.stderr
    res = c.pxctl("node1", "host", "unmount", "v", "--path", "/mnt/elsewhere", check=False)
    assert res.returncode == 1 and "not at /mnt/elsewhere" in res.stderr
    assert os.path.ismount(m["mount"])
    c.pxctl("node1", "host", "unmount", "v", "--path", m["mount"])
    assert not os.path.exists(m["mount"])       # the default mount point is pxfs's
    c.pxctl("node1", "host", "detach", "v")
    res = c.pxctl("node1", "host", "detach", "v", check=False)
    assert res.returncode == 1 and "volume 'v' is not attached" in res.stderr
    assert not os.path.exists(a["pxd"])
    # the data is there on another node
    # mounted through a symlink: recorded where it really is, unmounted by either name
    real = os.path.join(c.workdir, "real")
    os.mkdir(real)
    os.symlink(real, os.path.join(c.workdir, "link"))
    m2 = c.pxctl("node2", "host", "mount", "v", "--path", os.path.join(c.workdir, "link"))
    assert m2["mount"] == real and os.path.ismount(real)
    assert open(os.path.join(c.workdir, "link", "hello")).read() == "hello pxfs"
    ins = c.pxctl("node1", "volume", "inspect", "v")
    assert ins["bytes_used"] > 0 and ins["attached_on"] == "node2"
    c.pxctl("node2", "host", "unmount", "v", "--path", os.path.join(c.workdir, "link"))
    assert not os.path.ismount(real)
    c.pxctl("node2", "host", "detach", "v")
    c.pxctl("node2", "volume", "delete", "v")
    assert c.pxctl("node1", "volume", "list") == []
    for n in ("node1", "node2"):
        vols = os.path.join(c.workdir, n, "drive0", "vols")
        assert os.listdir(vols) == [], f"chunks of the deleted volume left on {n}"


def test_mounting_a_file_system_with_recorded_errors_warns(make_cluster):
    """ext4 records the errors it met (an I/O error made it read-only); the
    next mount succeeds silently as far as mount(8) goes: pxctl says so."""
    c = make_cluster(1)
    c.pxctl("node1", "volume", "create", "ev", "--size", "256M")
    path = os.path.join(c.workdir, "ev")
    m = c.pxctl("node1", "host", "mount", "ev", "--path", path)
    assert "warning" not in m
    c.pxctl("node1", "host", "unmount", "ev")
    dev = c.pxctl("node1", "volume", "inspect", "ev")["device_path"]
    subprocess.run(["debugfs", "-w", "-R", "ssv state 3", dev], check=True, capture_output=True)
    res = c.pxctl("node1", "host", "mount", "ev", "--path", path, as_json=False, check=False)
    assert res.returncode == 0 and "successfully mounted" in res.stdout, res.stderr
    assert "has recorded errors" in res.stderr and f"e2fsck -f {dev}" in res.stderr, res.stderr
    c.pxctl("node1", "host", "unmount", "ev")
    c.pxctl("node1", "host", "detach", "ev")


def _loops_on(fuse_dir: str) -> list[str]:
    out = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True,
                         text=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if len(line.split()) == 2 and line.split()[1].startswith(fuse_dir)]


def test_two_volumes_mounted_at_one_path_at_once(make_cluster, tmp_path):
    """Two `host mount`s of different volumes at the same path at the same
    moment: one mounts, the other is refused (they used to both pass the
    path's checks and stack, and the next unmount took away the wrong
    one).  An unmount of a volume that something else now covers is
    refused rather than unmounting that."""
    import httpx
    c = make_cluster(2)
    for vol in ("s1", "s2"):
        c.pxctl("node1", "volume", "create", vol, "--size", "256M")
    path = str(tmp_path / "spot")
    # through one node, then through two nodes of the same host
    for via in (("node1", "node1"),) * 2 + (("node1", "node2"),) * 2:
        answers = {}

        def mount(vol, node):
            answers[vol] = httpx.post(c.api(node) + f"/v1/volumes/{vol}/mount",
                                      json={"path": path}, timeout=120)
        threads = [threading.Thread(target=mount, args=(v, n)) for v, n in zip(("s1", "s2"), via)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [v for v, r in answers.items() if r.status_code == 200]
        assert len(won) == 1, {v: r.text for v, r in answers.items()}
        lost = [r for r in answers.values() if r.status_code != 200][0]
        assert lost.status_code == 409 and ("being mounted" in lost.json()["error"]
                                            or "already a mount point" in lost.json()["error"]), \
            lost.text
        on_path = [m for m in open("/proc/self/mounts").read().splitlines()
                   if m.split()[1] == path]
        assert len(on_path) == 1, on_path
        c.pxctl(via[("s1", "s2").index(won[0])], "host", "unmount", won[0])
        assert not os.path.ismount(path)
        for vol in ("s1", "s2"):
            for node in set(via):
                c.pxctl(node, "host", "detach", vol, check=False)
    c.pxctl("node1", "host", "mount", "s1", "--path", path)
    subprocess.run(["mount", "-t", "tmpfs", "cover", path], check=True)
    try:
        res = c.pxctl("node1", "host", "unmount", "s1", check=False)
        assert res.returncode == 1 and "cover is mounted over volume 's1'" in res.stderr, \
            res.stderr
        assert c.pxctl("node1", "volume", "inspect", "s1")["mount_path"] == path
    finally:
        subprocess.run(["umount", path], check=True)
    c.pxctl("node1", "host", "unmount", "s1")
    assert not os.path.ismount(path)


def test_volume_unmounted_by_hand(make_cluster):
    """A user runs `umount` on the volume's mount path instead of pxctl:
    pxctl unmount and detach still work, and a node stop after it leaves
    no loop device behind."""
    c = make_cluster(1)
    fuse = c.nodes["node1"]["fuse"]
    for vol in ("u1", "u2"):
        c.pxctl("node1", "volume", "create", vol, "--size", "256M")
        c.pxctl("node1", "host", "mount", vol)
    m = c.pxctl("node1", "volume", "inspect", "u1")["mount_path"]
    subprocess.run(["umount", m], check=True)
    # inspect stops showing it by itself (within a checkpoint interval)
    c.wait_for(lambda: c.pxctl("node1", "volume", "inspect", "u1")["mount_path"] == "",
               timeout=10, what="inspect forgetting the mount taken away by hand")
    c.pxctl("node1", "host", "unmount", "u1", check=False)
    assert c.pxctl("node1", "volume", "inspect", "u1")["mount_path"] == ""
    c.pxctl("node1", "host", "detach", "u1")
    m = c.pxctl("node1", "volume", "inspect", "u2")["mount_path"]
    subprocess.run(["umount", m], check=True)
    res = c.pxctl("node1", "host", "detach", "u2", check=False)
    assert res.returncode == 0, res.stderr
    c.pxctl("node1", "host", "mount", "u2")
    m = c.pxctl("node1", "volume", "inspect", "u2")["mount_path"]
    subprocess.run(["umount", m], check=True)
    # mounting it again where it was really mounts it (not "already mounted")
    got = c.pxctl("node1", "host", "mount", "u2", "--path", m)
    assert os.path.ismount(m) and got["mount"] == m
    subprocess.run(["umount", m], check=True)
    assert _loops_on(fuse)
    c.stop_node("node1")
    assert _loops_on(fuse) == [], "a node stop left loop devices behind"
    log = open(os.path.join(c.workdir, "node1", "pxfsd.log")).read()
    assert "Traceback" not in log


def _fsck_clean(dev: str) -> None:
    res = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_first_mount_of_a_thin_volume_writes_little(make_cluster):
    """A volume never written reads as zeros, so mkfs skips zeroing the
    inode tables; pxfs writes only the 64 MiB journal: formatting 2 GiB
    stores ~65 MiB per replica (about 100 MiB each with a plain mkfs), and
    the filesystem checks clean."""
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "thin", "--size", "2G", "--repl", "2")
    m = c.pxctl("node1", "host", "mount", "thin")
    with open(os.path.join(m["mount"], "f"), "wb", buffering=0) as fh:
        fh.write(b"x" * 4096)
        os.fsync(fh.fileno())
    used = c.pxctl("node1", "volume", "inspect", "thin")["bytes_used"]
    assert used < (64 + 8) << 20, f"{used} bytes stored after mkfs of a thin volume"
    log = open(os.path.join(c.workdir, "node1", "pxfsd.log")).read()
    assert "never written: nothing to zero" in log
    c.pxctl("node1", "host", "unmount", "thin")
    _fsck_clean(m["device"])


def test_space_used_is_what_was_written(make_cluster):
    """Thin accounting on a real XFS pool: 64 MiB written in order occupy
    64 MiB per replica (plus chunk headers), not the space XFS would
    preallocate past the end of chunk files that grow as they are filled."""
    c = make_cluster(1, dir_drives=False)
    c.pxctl("node1", "volume", "create", "acct", "--size", "256M", "--fs", "none")
    dev = c.pxctl("node1", "host", "attach", "acct")["device"]
    subprocess.run(["dd", "if=/dev/urandom", f"of={dev}", "bs=64K", "count=1024", "oflag=direct",
                    "conv=fsync", "status=none"], check=True)
    used = c.pxctl("node1", "volume", "inspect", "acct")["bytes_used"]
    assert 64 * MiB <= used <= 64 * MiB + 64 * 8192, f"{used / MiB:.1f} MiB used for 64 MiB"


def test_unreplayable_journal_mount_error_says_why(make_cluster, tmp_path):
    """The failure fast_commit caused, made on purpose through pxfs: a volume
    formatted with it by hand, its fast-commit area filled by fsyncs, then
    its node SIGKILLed.  The next mount fails (the kernel cannot replay that
    journal) and pxctl's one-line error carries what the kernel said."""
    c = make_cluster(1)
    c.pxctl("node1", "volume", "create", "jr", "--size", "512M")
    dev = c.pxctl("node1", "host", "attach", "jr")["device"]
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "fast_commit", dev], check=True)
    mnt = tmp_path / "m"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "commit=600", dev, str(mnt)], check=True)
    try:
        fd = os.open(mnt / "log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        os.fsync(fd)
        os.sync()
        for i in range(63):                 # the 64-block area is then full
            os.write(fd, bytes([i]) * 4096)
            os.fsync(fd)
        c.stop_node("node1", kill=True)
        os.close(fd)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    c.start_node("node1")
    c.wait_for(lambda: c.pxctl("node1", "host", "attach", "jr", check=False).returncode == 0,
               what="jr attached again")
    res = c.pxctl("node1", "host", "mount", "jr", check=False)
    if res.returncode == 0:                 # a kernel that replays a full area
        with open(os.path.join(json.loads(res.stdout)["mount"], "log"), "rb") as fh:
            assert fh.read() == b"".join(bytes([i]) * 4096 for i in range(63))
        pytest.skip("this kernel replays a full fast-commit area: no mount error to check")
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pxctl: cannot mount"), err
    assert "kernel: " in err and "journal" in err, err
    assert c.pxctl("node1", "volume", "inspect", "jr").get("mount_path") in (None, ""), \
        "a failed mount left a mount behind"


def test_mount_clears_fast_commit_left_by_an_older_format(make_cluster):
    """ext4 with fast_commit cannot replay a crash taken with its fast-commit
    area full (tests/t4_hostdev.py): a volume formatted with it, as pxfs
    did before, loses the feature at its next mount, data intact."""
    c = make_cluster(1)
    c.pxctl("node1", "volume", "create", "oldfmt", "--size", "256M")
    dev = c.pxctl("node1", "host", "attach", "oldfmt")["device"]
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "fast_commit", dev], check=True)
    m = c.pxctl("node1", "host", "mount", "oldfmt")
    with open(os.path.join(m["mount"], "f"), "wb", buffering=0) as fh:
        fh.write(b"kept" * 1024)
        os.fsync(fh.fileno())
    c.pxctl("node1", "host", "unmount", "oldfmt")
    head = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True).stdout
    features = next(x for x in head.splitlines() if x.startswith("Filesystem features:"))
    assert "has_journal" in features and "fast_commit" not in features
    _fsck_clean(dev)
    m = c.pxctl("node1", "host", "mount", "oldfmt")
    assert open(os.path.join(m["mount"], "f"), "rb").read() == b"kept" * 1024
    assert "cleared ext4 fast_commit" in open(
        os.path.join(c.workdir, "node1", "pxfsd.log")).read()


def test_mkfs_zeroes_a_volume_that_holds_data(make_cluster):
    """Raw data written to the device before the first mount (no filesystem
    on it) must not be taken for zeros: mkfs zeroes what it needs and the
    filesystem checks clean."""
    c = make_cluster(1)
    c.pxctl("node1", "volume", "create", "raw", "--size", "256M")
    a = c.pxctl("node1", "host", "attach", "raw")
    junk = bytes(range(1, 256)) * (1 << 12)               # ~1 MiB, no signature
    with open(a["device"], "r+b") as fh:
        for i in range(48):                               # the first 48 MiB
            fh.seek(i << 20)
            fh.write(junk)
        os.fsync(fh.fileno())
    m = c.pxctl("node1", "host", "mount", "raw")
    log = open(os.path.join(c.workdir, "node1", "pxfsd.log")).read()
    assert "never written" not in log
    c.pxctl("node1", "host", "unmount", "raw")
    _fsck_clean(m["device"])


@pytest.fixture
def write_through_loop(tmp_path):
    """The next free loop device, left in "write through" cache mode (the
    mode survives detach), which makes the block layer drop flushes; set
    back to "write back" afterwards, whatever the test did."""
    dev = _leave_write_through(tmp_path)
    yield dev
    with open(f"/sys/block/{os.path.basename(dev)}/queue/write_cache", "w") as fh:
        fh.write("write back")


def _leave_write_through(tmp_path) -> str:
    dummy = tmp_path / "dummy.img"
    subprocess.run(["truncate", "-s", "1M", str(dummy)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(dummy)], capture_output=True,
                         text=True, check=True).stdout.strip()
    knob = f"/sys/block/{os.path.basename(dev)}/queue/write_cache"
    with open(knob, "w") as fh:
        fh.write("write through")
    subprocess.run(["losetup", "-d", dev], check=True)
    assert open(knob).read().strip() == "write through"
    return dev


@pytest.mark.alone
def test_attach_restores_flushes_on_a_write_through_loop_device(make_cluster, write_through_loop):
    dev = write_through_loop
    c = make_cluster(1)
    c.pxctl("node1", "volume", "create", "wc", "--size", "256M")
    c.pxctl("node1", "host", "mount", "wc")
    assert c.pxctl("node1", "volume", "inspect", "wc")["device_path"] == dev
    knob = f"/sys/block/{os.path.basename(dev)}/queue/write_cache"
    assert open(knob).read().strip() == "write back", "flushes would never reach pxfs"
    log = open(os.path.join(c.workdir, "node1", "pxfsd.log")).read()
    assert "drops flushes" in log


@pytest.mark.alone
def test_pool_image_loop_device_keeps_flushes(tmp_path, write_through_loop):
    from pxfs.chunk import pool
    img = tmp_path / "drive.img"
    subprocess.run(["truncate", "-s", "512M", str(img)], check=True)
    dev = write_through_loop
    roots = pool.prepare([str(img)], str(tmp_path / "data"))
    try:
        src = subprocess.run(["findmnt", "-n", "-o", "SOURCE", roots[0]], capture_output=True,
                             text=True, check=True).stdout.strip()
        assert src == dev
        assert open(f"/sys/block/{os.path.basename(dev)}/queue/write_cache").read().strip() \
            == "write back"
    finally:
        pool.release(roots, str(tmp_path / "data"))


WRITER = r'''
import hashlib, os, sys, time
path, log = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
lfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while i < 100000:
    block = hashlib.sha256(str(i).encode()).digest() * 2048          # 64 KiB
    os.pwrite(fd, block, i * len(block))
    os.fsync(fd)
    os.write(lfd, b"%d\n" % i)
    os.fsync(lfd)
    i += 1
'''


def test_failover_after_sigkill_keeps_every_fsynced_write(make_cluster):
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "dbvol", "--size", "2", "--repl", "2", "--nodes", "node1,node2")
    c.pxctl("node1", "host", "attach", "dbvol")
    mnt = c.pxctl("node1", "host", "mount", "dbvol")["mount"]
    log = os.path.join(c.workdir, "writer.log")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, os.path.join(mnt, "data"), log],
                              stderr=subprocess.DEVNULL)
    try:
        c.wait_for(lambda: os.path.exists(log) and len(open(log).read().split()) >= 20,
                   what="writer progress")
        c.stop_node("node1", kill=True)                 # the attached node dies mid-write
        t0 = time.monotonic()
    finally:
        time.sleep(0.5)
        writer.kill()
        writer.wait()
    done = [int(x) for x in open(log).read().split()]
    assert done == list(range(len(done)))
    # another node attaches within seconds, the same data is there
    attach_after_failover(c, "node2", "dbvol", timeout=20)
    assert time.monotonic() - t0 < 10, "failover took longer than 10 s"
    mnt2 = c.pxctl("node2", "host", "mount", "dbvol")["mount"]
    with open(os.path.join(mnt2, "data"), "rb") as fh:
        for i in done:
            block = fh.read(64 * 1024)
            assert block == hashlib.sha256(str(i).encode()).digest() * 2048, f"fsynced block {i} lost"
    states = replica_states(c, "node2", "dbvol")
    assert states["node1"] in ("offline", "out_of_sync")
    assert c.pxctl("node3", "volume", "inspect", "dbvol")["status"] == "degraded"
    # the volume keeps working degraded
    with open(os.path.join(mnt2, "after"), "wb") as fh:
        fh.write(b"x" * MiB)
        fh.flush()
        os.fsync(fh.fileno())
    # the node comes back, resyncs by itself, and rejoins
    c.start_node("node1")
    c.wait_for(lambda: replica_states(c, "node2", "dbvol")["node1"] == "in_sync", timeout=60,
               what="node1 back in sync")
    assert c.pxctl("node1", "volume", "inspect", "dbvol")["status"] == "up"
    st = c.pxctl("node3", "status")
    assert all(n["status"] == "Online" for n in st["nodes"])
    # what was written degraded reached node1 by the resync: with node2 gone,
    # node3 (no replica of its own) reads everything from node1
    c.pxctl("node2", "host", "unmount", "dbvol")
    c.pxctl("node2", "host", "detach", "dbvol")
    c.stop_node("node2", kill=True)
    mnt3 = c.pxctl("node3", "host", "mount", "dbvol")["mount"]
    with open(os.path.join(mnt3, "after"), "rb") as fh:
        assert fh.read() == b"x" * MiB
    with open(os.path.join(mnt3, "data"), "rb") as fh:
        for i in done:
            assert fh.read(64 * 1024) == hashlib.sha256(str(i).encode()).digest() * 2048, \
                f"block {i} differs on the resynced replica"


STALE_WRITER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
m = mmap.mmap(-1, 1 << 20)
m.write(b"C" * (1 << 20))
print("writing", flush=True)
try:
    os.pwrite(fd, m, int(sys.argv[2]))
    os.fsync(fd)
except OSError as exc:
    print("error", exc.errno, flush=True)
    sys.exit(1)
print("acknowledged", flush=True)
"""


def test_fencing_paused_node_cannot_overwrite(make_cluster):
    """node1 is paused (SIGSTOP) with the volume attached; node2 takes it
    over and writes.  A write node1 had queued, aimed where node2 never
    writes (so no later copy of node2's data could hide it), is refused when
    node1 wakes up, and no replica ever holds it."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "fv", "--size", "256M", "--repl", "2", "--fs", "none",
            "--nodes", "node1,node2")
    dev1 = c.pxctl("node1", "host", "attach", "fv")["device"]
    dd_write(dev1, b"A", 0, 12)
    c.signal("node1", signal.SIGSTOP)
    stale = None
    try:
        attach_after_failover(c, "node2", "fv", timeout=30)
        dev2 = c.pxctl("node2", "host", "attach", "fv")["device"]
        assert c.pxctl("node2", "volume", "inspect", "fv")["term"] == 2
        dd_write(dev2, b"B", 0, 4)
        # the paused node has a write queued when it wakes up
        stale = subprocess.Popen([sys.executable, "-c", STALE_WRITER, dev1, str(8 * MiB)],
                                 stdout=subprocess.PIPE, text=True)
        assert stale.stdout.readline() == "writing\n"
        time.sleep(0.5)                      # into the loop device and FUSE, held there
    finally:
        c.signal("node1", signal.SIGCONT)
    try:
        out, _ = stale.communicate(timeout=90)
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()
    assert stale.returncode == 1 and out.split() == ["error", "5"], out   # EIO
    assert dd_read(dev2, 0, 12) == b"B" * (4 * MiB) + b"A" * (8 * MiB)
    # node1's replica catches up; then only it and node3 remain: still no C
    c.wait_for(lambda: replica_states(c, "node2", "fv")["node1"] == "in_sync", timeout=60,
               what="node1 resynced")
    c.pxctl("node2", "host", "detach", "fv")
    c.stop_node("node2", kill=True)
    attach_after_failover(c, "node3", "fv", timeout=30)
    dev3 = c.pxctl("node3", "host", "attach", "fv")["device"]
    assert dd_read(dev3, 0, 12) == b"B" * (4 * MiB) + b"A" * (8 * MiB)


def test_resync_copies_only_what_changed(make_cluster):
    c = make_cluster(3)
    size_mib = 512
    c.pxctl("node1", "volume", "create", "rv", "--size", f"{size_mib}M", "--repl", "2", "--fs", "none",
            "--nodes", "node2,node3")
    dev = c.pxctl("node1", "host", "attach", "rv")["device"]
    ins = c.pxctl("node1", "volume", "inspect", "rv")
    assert ins["data_local"] is False
    assert "*" in c.pxctl("node1", "volume", "list", as_json=False)   # data is not local
    dd_write(dev, b"0123456789abcdef", 0, size_mib)              # the whole volume, once
    c.stop_node("node3", kill=True)
    changed = size_mib // 10
    dd_write(dev, b"changed!", 200, changed)                      # 10 % while node3 is out
    assert replica_states(c, "node1", "rv")["node3"] in ("offline", "out_of_sync")
    # node3's chunk files as it left them (a chunk copy replaces its file)
    drive = json.load(open(c.nodes["node3"]["config"]))["storage"]["devices"][0]
    chunks = os.path.join(drive, "vols", ins["id"])

    def files():
        return {f: (st.st_ino, st.st_mtime_ns) for f in os.listdir(chunks)
                for st in [os.stat(os.path.join(chunks, f))] if f.endswith(".chk")}
    before = files()
    assert len(before) == size_mib
    c.start_node("node3")

    def synced():
        ins = c.pxctl("node1", "volume", "inspect", "rv")
        r = {x["node"]: x for x in ins["replicas"]}["node3"]
        return r["state"] == "in_sync" and ins
    ins = c.wait_for(synced, timeout=90, what="node3 in sync")
    copied = sum(h["bytes"] for h in ins["resyncs"] if h["node"] == "node3")
    assert changed * MiB <= copied <= (changed + 4) * MiB, f"resync copied {copied} bytes"
    after = files()
    touched = sorted(f for f in after if before.get(f) != after[f])
    assert changed <= len(touched) <= changed + 4, f"{len(touched)} chunk files rewritten"
    assert set(touched) >= {f"{i:08x}.chk" for i in range(200, 200 + changed)}
    # now lose the other replica: everything must come from the resynced one
    c.stop_node("node2", kill=True)
    data = dd_read(dev, 0, size_mib)
    base = (b"0123456789abcdef" * (MiB // 16))
    for i in range(size_mib):
        want = (b"changed!" * (MiB // 8)) if 200 <= i < 200 + changed else base
        assert data[i * MiB:(i + 1) * MiB] == want, f"MiB {i} differs"


def test_garbage_on_data_port_closes_only_that_connection(make_cluster):
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "g", "--size", "128M", "--repl", "2", "--fs", "none")
    dev = c.pxctl("node1", "host", "attach", "g")["device"]
    host, port = c.nodes["node2"]["data"].split(":")
    noise = bytes(random.Random(7).randrange(256) for _ in range(4092))
    for garbage in (b"\xff\xff\xff\xff" + b"x" * 100, b"\x00\x00\x00\x03abc",
                    len(noise).to_bytes(4, "big") + noise, b"\x00\x00\x00\x01\x01"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(garbage)
            s.settimeout(5)
            try:
                assert s.recv(100) == b""            # closed by the node
            except ConnectionResetError:
                pass
    dd_write(dev, b"ok", 0, 2)
    assert dd_read(dev, 0, 2) == b"ok" * MiB
    assert all(s == "in_sync" for s in replica_states(c, "node1", "g").values())
    said = [x for x in open(c.nodes["node2"]["log"]) if "closing data connection" in x]
    assert len(said) == 4, said                   # each one named, e.g. "frame of ... exceeds"
    assert any("exceeds" in x for x in said), said


def test_node_restart_rejoins(make_cluster):
    c = make_cluster(2, dir_drives=False)          # image-file drives, formatted by pxfs
    c.stop_node("node2")
    st = c.pxctl("node1", "status")
    assert {n["id"]: n["status"] for n in st["nodes"]}["node2"] == "Offline"
    c.start_node("node2")
    st = c.pxctl("node1", "status")
    assert all(n["status"] == "Online" for n in st["nodes"])


def test_a_paused_node_does_not_hold_up_another_nodes_start(make_cluster):
    """A node's start looks for the loop devices of its image drives.  Asking
    every loop device for its status (losetup -j) waits on the backing file
    of each, and the volume attached on a paused node sits on that node's
    FUSE view: the start hung until the pause ended."""
    c = make_cluster(3, dir_drives=False)
    c.pxctl("node1", "volume", "create", "pz", "--size", "64M", "--repl", "1", "--fs", "none",
            "--nodes", "node1")
    c.pxctl("node1", "host", "attach", "pz")
    c.stop_node("node2")
    c.signal("node1", signal.SIGSTOP)
    try:
        t = time.monotonic()
        c.start_node("node2")
        assert time.monotonic() - t < 60
        st = c.pxctl("node2", "status")
        assert {n["id"]: n["status"] for n in st["nodes"]}["node2"] == "Online"
    finally:
        c.signal("node1", signal.SIGCONT)


def test_clean_stop_keeps_what_a_busy_mount_wrote(make_cluster):
    """A node is stopped (SIGTERM) while an application still has a file open
    on a volume mounted there: what it wrote before the stop survives, and
    its next write fails instead of vanishing."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "busy", "--size", "512M", "--repl", "2",
            "--nodes", "node1,node2")
    mnt = c.pxctl("node1", "host", "mount", "busy")["mount"]
    fh = open(os.path.join(mnt, "log"), "w")
    try:
        for i in range(200):
            fh.write(f"line {i}\n")
            fh.flush()                      # into the page cache: no fsync
        c.stop_node("node1")
        with pytest.raises(OSError):
            fh.write("after the stop\n")
            fh.flush()
    finally:
        try:
            fh.close()
        except OSError:
            pass
    assert not os.path.ismount(mnt)
    m2 = c.pxctl("node2", "host", "mount", "busy")["mount"]
    lines = open(os.path.join(m2, "log")).read().splitlines()
    assert lines == [f"line {i}" for i in range(200)]
    assert "syncing it, failing its further I/O" in open(c.nodes["node1"]["log"]).read()


def test_clean_stop_keeps_what_a_hand_mount_of_the_device_wrote(make_cluster):
    """The same for a mount the user made by hand of the attached device
    (``mount /dev/pxd/pxd<ID> /mnt``): pxctl knows no mount path for it,
    but the stop still writes back what it holds before the device goes."""
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "hm", "--size", "128M", "--repl", "2", "--fs", "none")
    a = c.pxctl("node1", "host", "attach", "hm")
    subprocess.run(["mkfs.ext4", "-q", a["device"]], check=True)
    hand = os.path.join(c.workdir, "hand")
    os.mkdir(hand)
    subprocess.run(["mount", a["pxd"], hand], check=True)
    try:
        data = os.urandom(3 * MiB)
        with open(os.path.join(hand, "f"), "wb") as fh:
            fh.write(data)                  # into the page cache: no fsync
        c.stop_node("node1")
        assert not os.path.ismount(hand)
    finally:
        if os.path.ismount(hand):
            subprocess.run(["umount", "-l", hand])
    dev2 = c.pxctl("node2", "host", "attach", "hm")["device"]
    subprocess.run(["mount", "-o", "ro", dev2, hand], check=True)
    try:
        assert open(os.path.join(hand, "f"), "rb").read() == data
    finally:
        subprocess.run(["umount", hand], check=True)
    assert f"is still mounted at {hand}" in open(c.nodes["node1"]["log"]).read()


def test_restart_leaves_another_nodes_mount_alone(make_cluster, tmp_path):
    """Several nodes on one host: node3 dies with a volume mounted at P, the
    user clears P and mounts the volume through node2 at P again.  When node3
    comes back, its clean-up of what its earlier run left must not take
    node2's mount or its /dev/pxd link away."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "mv", "--size", "512M", "--repl", "2",
            "--nodes", "node1,node2")
    path = str(tmp_path / "mv")
    c.pxctl("node3", "host", "mount", "mv", "--path", path)
    c.stop_node("node3", kill=True)
    subprocess.run(["umount", "-l", path], check=True)
    c.wait_for(lambda: c.pxctl("node2", "host", "mount", "mv", "--path", path,
                               check=False).returncode == 0, timeout=20, what="mount on node2")
    a = c.pxctl("node2", "volume", "inspect", "mv")
    with open(os.path.join(path, "f"), "w") as fh:
        fh.write("node2's")
    c.start_node("node3")
    assert os.path.ismount(path), "node3's restart unmounted node2's mount"
    dev = c.pxctl("node2", "host", "attach", "mv")["device"]
    assert os.path.realpath(f"/dev/pxd/pxd{a['id']}") == dev
    assert open(os.path.join(path, "f")).read() == "node2's"
    assert _loops_on(c.nodes["node3"]["fuse"]) == []


def test_pxfsd_refuses_foreign_filesystem(tmp_path, etcd_url):
    img = tmp_path / "foreign.img"
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-L", "userdata", str(img)], check=True)
    cfg = {"clusterid": "x", "kvdb": [f"etcd:{etcd_url}"], "storage": {"devices": [str(img)]},
           "data_dir": str(tmp_path / "data"), "fuse_mountpoint": str(tmp_path / "fuse")}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    res = subprocess.run([sys.executable, "-m", "pxfs.node", "--config", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "storage.devices" in res.stderr and "ext4" in res.stderr
    assert not (tmp_path / "fuse").exists()
    # a blank device too small for the pool's filesystem: one line, not mkfs's usage
    subprocess.run(["truncate", "-s", "0", str(img)], check=True)
    subprocess.run(["truncate", "-s", "20M", str(img)], check=True)
    res = subprocess.run([sys.executable, "-m", "pxfs.node", "--config", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "holds 20 MiB; a pool device needs at least 300 MiB" in \
        res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "fuse").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stray_config(c, tmp_path, **change) -> str:
    """A config for another pxfsd beside cluster ``c``: node1's, with a
    directory of its own for everything and free ports, then ``change``."""
    cfg = json.load(open(c.nodes["node1"]["config"]))
    (tmp_path / "drive").mkdir(exist_ok=True)
    cfg.update(node_id="node4", storage={"devices": [str(tmp_path / "drive")]},
               data_dir=str(tmp_path / "data"), fuse_mountpoint=str(tmp_path / "fuse"),
               osd_root=str(tmp_path / "osd"), docker_socket="",
               api_address=f"127.0.0.1:{_free_port()}", data_address=f"127.0.0.1:{_free_port()}")
    cfg.update(change)
    path = tmp_path / "stray.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _run_pxfsd(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pxfs.node", "--config", path],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def _refused(res, key: str, *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pxfsd: config key {key!r}"), res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def _mounts_under(path) -> list[str]:
    return [ln for ln in open("/proc/self/mountinfo") if str(path) in ln]


@pytest.fixture
def stray_dir(tmp_path):
    """tmp_path, and whatever a stray pxfsd that was not refused (the bug
    these tests look for) mounted under it is unmounted afterwards."""
    yield tmp_path
    targets = sorted({ln.split()[4] for ln in _mounts_under(tmp_path)}, reverse=True)
    for t in targets:
        subprocess.run(["umount", "-l", t], capture_output=True)
    for img in tmp_path.glob("*.img"):
        for lo in subprocess.run(["losetup", "-n", "-O", "NAME", "-j", str(img)],
                                 capture_output=True, text=True).stdout.split():
            subprocess.run(["losetup", "-d", lo], capture_output=True)


def test_a_second_pxfsd_under_a_running_nodes_id_is_refused(make_cluster, stray_dir):
    """Another pxfsd started as node1 (its own devices and ports) would take
    over node1's record, and its peers would send node1's replica writes
    to it: it is refused, and node1 stays as it was."""
    c = make_cluster(2)
    res = _run_pxfsd(_stray_config(c, stray_dir, node_id="node1"))
    _refused(res, "node_id", "already running", c.nodes["node1"]["api"])
    assert _mounts_under(stray_dir) == [] and not (stray_dir / "fuse").exists()
    assert os.listdir(stray_dir / "drive") == [], "the refused node claimed its device"
    assert not (stray_dir / "data").exists()
    nodes = {n["id"]: n for n in c.pxctl("node2", "status")["nodes"]}
    assert nodes["node1"]["status"] == "Online" and nodes["node1"]["api"] == c.nodes["node1"]["api"]
    assert "node4" not in nodes


def test_a_pool_of_another_node_is_refused(make_cluster, stray_dir):
    """node1's pool given to node4: refused while node1 runs (two nodes on
    one set of chunk files), and still refused once node1 has stopped (its
    replicas are node1's); the pool is left as it was."""
    c = make_cluster(2, dir_drives=False)
    drive = json.load(open(c.nodes["node1"]["config"]))["storage"]["devices"][0]
    path = _stray_config(c, stray_dir, storage={"devices": [drive]})
    _refused(_run_pxfsd(path), "storage.devices", "in use by another running pxfsd", "node1")
    assert not (stray_dir / "data").exists()
    c.stop_node("node1")
    _refused(_run_pxfsd(path), "storage.devices", "pool of node 'node1'")
    assert _mounts_under(stray_dir) == []
    assert subprocess.run(["losetup", "-j", drive], capture_output=True, text=True).stdout == ""
    c.start_node("node1")                     # its own pool is still its own
    assert {n["id"]: n["status"] for n in c.pxctl("node2", "status")["nodes"]}["node1"] == "Online"


@pytest.mark.parametrize("key", ["api_address", "data_address"])
def test_a_port_in_use_is_refused_and_leaves_nothing(make_cluster, stray_dir, key):
    c = make_cluster(1)
    taken = c.nodes["node1"]["api" if key == "api_address" else "data"]
    taken = taken.split("//")[-1]
    res = _run_pxfsd(_stray_config(c, stray_dir, **{key: taken}))
    _refused(res, key, taken, "another process listens there")
    assert not (stray_dir / "data").exists() and _mounts_under(stray_dir) == []
    assert [n["id"] for n in c.pxctl("node1", "status")["nodes"]] == ["node1"]


@pytest.mark.parametrize("key", ["fuse_mountpoint", "data_dir"])
def test_a_fuse_view_or_data_dir_of_a_running_node_is_refused(make_cluster, stray_dir, key):
    """Another pxfsd given node1's FUSE mount point would unmount node1's
    volumes as stale; given its data_dir, it would mount its pools over
    node1's.  Both are refused, and node1's mounted volume stays as it was."""
    c = make_cluster(1)
    c.pxctl("node1", "volume", "create", "live", "--size", "128M")
    mnt = c.pxctl("node1", "host", "mount", "live")["mount"]
    with open(os.path.join(mnt, "f"), "w") as fh:
        fh.write("still here")
    theirs = json.load(open(c.nodes["node1"]["config"]))[key]
    res = _run_pxfsd(_stray_config(c, stray_dir, **{key: theirs}))
    _refused(res, key, "running")
    assert os.path.ismount(mnt) and open(os.path.join(mnt, "f")).read() == "still here"
    assert os.path.ismount(c.nodes["node1"]["fuse"])
    v = c.pxctl("node1", "volume", "inspect", "live")
    assert v["attached_on"] == "node1" and v["mount_path"] == mnt
    c.pxctl("node1", "host", "unmount", "live")
    c.pxctl("node1", "host", "mount", "live")          # node1 still works
    assert open(os.path.join(mnt, "f")).read() == "still here"


def test_a_node_waiting_for_etcd_has_mounted_nothing_and_stops_cleanly(stray_dir):
    """A node waits for etcd before it formats or mounts its pools (etcd may
    yet say that another process is this node); SIGTERM meanwhile stops it
    at once, with status 0, leaving nothing mounted or attached."""
    img = stray_dir / "drive.img"
    subprocess.run(["truncate", "-s", "512M", str(img)], check=True)
    cfg = {"clusterid": "w", "kvdb": [f"etcd:http://127.0.0.1:{_free_port()}"],
           "storage": {"devices": [str(img)]}, "data_dir": str(stray_dir / "data"),
           "fuse_mountpoint": str(stray_dir / "fuse"), "osd_root": str(stray_dir / "osd"),
           "api_address": f"127.0.0.1:{_free_port()}",
           "data_address": f"127.0.0.1:{_free_port()}", "docker_socket": ""}
    (stray_dir / "c.json").write_text(json.dumps(cfg))
    log = open(stray_dir / "log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "pxfs.node", "--config", str(stray_dir / "c.json")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while "waiting for etcd" not in open(stray_dir / "log").read():
            assert proc.poll() is None and time.monotonic() < deadline, open(stray_dir / "log").read()
            time.sleep(0.2)
        assert _mounts_under(stray_dir) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, open(stray_dir / "log").read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run(["umount", "-l", str(stray_dir / "data" / "pools" / "0")],
                           capture_output=True)
    assert _mounts_under(stray_dir) == []
    assert subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True).stdout == ""


def test_a_node_whose_alive_key_vanished_shows_online_again(make_cluster, etcd_server):
    """A stray process that registered under node1's id and left takes
    node1's alive key with it; node1, still running, puts it back."""
    import trio

    from pxfs.meta import keys
    from pxfs.meta.etcd import EtcdKV
    c = make_cluster(2)
    cid = c.pxctl("node1", "status")["cluster_id"]

    async def drop():
        kv = EtcdKV([etcd_server])
        try:
            await kv.delete_prefix(keys.alive_key(cid, "node1"))
        finally:
            await kv.close()
    trio.run(drop)

    def online():
        return {n["id"]: n["status"] for n in c.pxctl("node2", "status")["nodes"]}["node1"] \
            == "Online"
    assert not online()
    c.wait_for(online, timeout=15, what="node1 Online again")


def test_unclean_end_reconciles_in_sync_replicas(make_cluster):
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "uv", "--size", "128M", "--repl", "2", "--fs", "none",
            "--nodes", "node2,node3")
    dev = c.pxctl("node1", "host", "attach", "uv")["device"]
    dd_write(dev, b"u", 0, 8)
    c.stop_node("node1", kill=True)              # dies without a clean detach
    attach_after_failover(c, "node2", "uv", timeout=30)
    log2 = open(c.nodes["node2"]["log"]).read()
    assert "ended uncleanly" in log2
    dev2 = c.pxctl("node2", "host", "attach", "uv")["device"]
    assert dd_read(dev2, 0, 8) == b"u" * (8 * MiB)
    assert all(s == "in_sync" for s in replica_states(c, "node2", "uv").values())
    c.pxctl("node2", "host", "detach", "uv")     # clean: the next attach need not reconcile
    c.pxctl("node3", "host", "attach", "uv")
    assert "ended uncleanly" not in open(c.nodes["node3"]["log"]).read()


def test_a_failed_attach_leaves_the_unclean_end_to_reconcile(make_cluster, etcd_server):
    """node1 dies attached while node2 (its other replica) is paused: an
    attach on node3 fails (no in-sync replica answers).  That failure must
    not record a clean end, or the next attach would skip reconciling what
    node1 left half-written."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "fa", "--size", "128M", "--repl", "2", "--fs", "none",
            "--nodes", "node1,node2")
    dev = c.pxctl("node1", "host", "attach", "fa")["device"]
    dd_write(dev, b"f", 0, 4)
    c.signal("node2", signal.SIGSTOP)
    try:
        c.stop_node("node1", kill=True)
        c.wait_for(lambda: "no in-sync replica is reachable" in c.pxctl(
            "node3", "host", "attach", "fa", check=False).stderr, timeout=40,
            what="a failed attach on node3")
    finally:
        c.signal("node2", signal.SIGCONT)
    rec = _vol_record(c, etcd_server, "fa")
    assert rec["clean"] is False, "a failed attach recorded a clean end"
    before = rec.get("durable", 0)
    attach_after_failover(c, "node3", "fa", timeout=30)
    dev3 = c.pxctl("node3", "host", "attach", "fa")["device"]
    assert dd_read(dev3, 0, 4) == b"f" * (4 * MiB)
    # node1, unreachable, is out of sync from node1's own last checkpoint on,
    # not from the failed attach's new stamp space
    rec = _vol_record(c, etcd_server, "fa")
    r1 = next(r for r in rec["replicas"] if r["node"] == "node1")
    assert r1["state"] == "out_of_sync" and r1["missed_from"] == before < rec["gen"] << 32


def _vol_record(c, etcd_server, name: str) -> dict:
    """The volume's record as etcd holds it."""
    import trio

    from pxfs import codec
    from pxfs.meta import keys
    from pxfs.meta.etcd import EtcdKV
    volid = int(c.pxctl("node3", "volume", "inspect", name)["id"])
    cid = c.pxctl("node3", "status")["cluster_id"]

    async def get():
        kv = EtcdKV([etcd_server])
        try:
            return codec.unpack_record((await kv.get(keys.vol_key(cid, volid))).value)
        finally:
            await kv.close()
    return trio.run(get)


def test_a_replica_power_loss_before_the_fsync_loses_nothing(make_cluster):
    """node2 takes writes, then loses power (an XFS shutdown without log
    flush throws its dirty pages away) and comes back before the attacher's
    fsync, which its new process answers.  That answer must not count:
    node2 falls out of sync, is resynced from node1, and the data is whole
    on it afterwards."""
    c = make_cluster(3, dir_drives=False)
    c.pxctl("node1", "volume", "create", "pl", "--size", "128M", "--repl", "2", "--fs", "none",
            "--nodes", "node1,node2")
    dev = c.pxctl("node1", "host", "attach", "pl")["device"]
    block = (b"power" * (MiB // 5 + 1))[:MiB]
    pool = os.path.join(c.workdir, "node2", "data", "pools", "0")
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap_block(block)
        for i in range(4):
            os.pwrite(fd, buf, i * MiB)            # taken by both replicas, not yet flushed
        subprocess.run(["xfs_io", "-x", "-c", "shutdown", pool], check=True)   # power loss
        c.stop_node("node2", kill=True)
        subprocess.run(["umount", pool], check=True)
        c.start_node("node2")                      # the pool again, after log recovery
        os.fsync(fd)
    finally:
        os.close(fd)
    assert "restarted since it took writes" in open(c.nodes["node1"]["log"]).read()
    # it fell out of sync (the resync of 4 chunks may be over already)
    c.wait_for(lambda: replica_states(c, "node1", "pl")["node2"] == "in_sync", timeout=60,
               what="node2 resynced")
    resyncs = c.pxctl("node1", "volume", "inspect", "pl")["resyncs"]
    assert [h for h in resyncs if h["node"] == "node2" and h["chunks"] >= 4], resyncs
    c.stop_node("node1", kill=True)                # only node2's copy is left in sync
    attach_after_failover(c, "node3", "pl", timeout=30)
    dev3 = c.pxctl("node3", "host", "attach", "pl")["device"]
    assert dd_read(dev3, 0, 4) == block * 4


def mmap_block(data: bytes):
    """A page-aligned buffer (O_DIRECT) holding ``data``."""
    import mmap
    m = mmap.mmap(-1, len(data))
    m.write(data)
    return m


def test_reconcile_takes_a_torn_chunk_from_the_good_replica(make_cluster):
    """node1 dies attached; its copy of a chunk written since the last flush
    is damaged (as a power loss tears a write).  The next attach reconciles
    from the replica whose copy checks out: both replicas stay in sync and
    the data reads back, instead of the good replica being blamed."""
    from pxfs.chunk.layout import HEADER_SIZE
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "tv", "--size", "128M", "--repl", "2", "--fs", "none",
            "--nodes", "node1,node2")
    volid = c.pxctl("node1", "volume", "inspect", "tv")["id"]
    dev = c.pxctl("node1", "host", "attach", "tv")["device"]
    block = (b"torn" * (MiB // 4))[:MiB]
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwrite(fd, mmap_block(block), 0)            # on both replicas, never flushed
    finally:
        os.close(fd)
    c.stop_node("node1", kill=True)
    path = os.path.join(c.workdir, "node1", "drive0", "vols", volid, "00000000.chk")
    with open(path, "r+b") as fh:
        fh.seek(HEADER_SIZE + 5000)
        b = fh.read(1)
        fh.seek(HEADER_SIZE + 5000)
        fh.write(bytes([b[0] ^ 0xFF]))
    c.start_node("node1")
    attach_after_failover(c, "node1", "tv", timeout=30)
    assert "ended uncleanly" in open(c.nodes["node1"]["log"]).read()
    assert replica_states(c, "node1", "tv") == {"node1": "in_sync", "node2": "in_sync"}
    dev1 = c.pxctl("node1", "host", "attach", "tv")["device"]
    assert dd_read(dev1, 0, 1) == block


def test_reconcile_makes_replicas_agree_on_chunks_a_discard_reached_in_part(make_cluster):
    """node1 dies attached in the middle of a discard that deleted chunk 3
    on node2 only (no stamp says so).  The next attach makes the replicas
    agree on it (both hold it, or neither), so a read does not depend on
    which replica serves it."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "pd", "--size", "128M", "--repl", "2", "--fs", "none",
            "--nodes", "node1,node2")
    volid = c.pxctl("node1", "volume", "inspect", "pd")["id"]
    dev = c.pxctl("node1", "host", "attach", "pd")["device"]
    dd_write(dev, b"kept", 0, 8)
    time.sleep(3)           # a checkpoint records those writes durable: no stamp is newer
    c.stop_node("node1", kill=True)
    os.unlink(os.path.join(c.workdir, "node2", "drive0", "vols", volid, "00000003.chk"))
    c.start_node("node1")
    attach_after_failover(c, "node3", "pd", timeout=30)
    assert "ended uncleanly" in open(c.nodes["node3"]["log"]).read()
    c.wait_for(lambda: all(s == "in_sync" for s in replica_states(c, "node3", "pd").values()),
               timeout=60, what="both replicas in sync")
    held = {n: os.path.exists(os.path.join(c.workdir, n, "drive0", "vols", volid,
                                           "00000003.chk")) for n in ("node1", "node2")}
    assert held["node1"] == held["node2"], held


WRITE_LOOP = r"""
import os, sys, time
path, log, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + secs
i = 0
with open(log, "w") as out:
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.write(fd, b"%08d\n" % i)
            os.fsync(fd)
            os.close(fd)
            out.write(f"ok {i} {time.monotonic() - t0:.2f}\n")
        except OSError as exc:
            out.write(f"error {i} {exc}\n")
        out.flush()
        i += 1
        time.sleep(0.05)
"""


def _runs(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("outage", ["pause", "restart"])
def test_io_waits_out_an_etcd_outage(make_cluster, outage):
    """etcd stops answering for longer than the nodes' leases (paused, or
    killed and started again on its data, which restores the old leases):
    the attached node loses its lease, holds the volume's I/O instead of
    failing it, and when etcd is back (nobody took the volume meanwhile)
    takes its attachment back and goes on.  Every node survives."""
    c = make_cluster(3, own_etcd=True)
    etcd_pid = json.load(open(os.path.join(c.workdir, "cluster.json")))["etcd_pid"]
    c.pxctl("node1", "volume", "create", "eo", "--size", "256M", "--repl", "2",
            "--nodes", "node1,node2")
    mnt = c.pxctl("node1", "host", "mount", "eo")["mount"]
    log = os.path.join(c.workdir, "eo.log")
    w = subprocess.Popen([sys.executable, "-c", WRITE_LOOP, os.path.join(mnt, "f"), log, "26"])
    try:
        time.sleep(2)
        if outage == "pause":
            os.kill(etcd_pid, signal.SIGSTOP)
        else:
            res = c.cli("stop-etcd", "--kill")
            assert res.returncode == 0 and not _runs(etcd_pid), res.stderr
        # I/O is held from ~2 s (the lease clock); the lease (3 s) is found
        # lost when the keepalive's calls time out (~10 s)
        c.wait_for(lambda: "lost its etcd lease" in open(c.nodes["node1"]["log"]).read(),
                   timeout=40, what="node1 finding its lease lost")
        if outage == "pause":   # status tells of the node itself, and why not of the rest
            text = c.pxctl("node2", "status", as_json=False)
            assert "Status: PX is not operational: etcd at" in text, text
            assert "Node ID: node2" in text and "nodes are unknown" in text, text
        else:                   # a one-line error that says what is wrong
            res = c.pxctl("node2", "volume", "list", check=False)
            assert res.returncode == 1 and re.search(
                r"^pxctl: etcd at \S+ does not answer \(range: connection failed\)$",
                res.stderr.strip()), res.stderr
        time.sleep(1 if outage == "pause" else 4)      # a failed rejoin or two
    finally:
        if outage == "pause":
            os.kill(etcd_pid, signal.SIGCONT)
        else:               # on its old ports and data: `down` stops this one
            res = c.cli("start-etcd")
            assert res.returncode == 0, res.stderr
            st = json.load(open(os.path.join(c.workdir, "cluster.json")))
            assert json.loads(res.stdout) == {"etcd": st["etcd"], "pid": st["etcd_pid"]}
            assert st["etcd_pid"] != etcd_pid and _runs(st["etcd_pid"])
        w.wait(timeout=120)
    lines = open(log).read().split("\n")[:-1]
    assert lines and not [x for x in lines if x.startswith("error")], lines
    assert max(float(x.split()[2]) for x in lines) > 1, "no write was ever held"
    written = [int(x.split()[1]) for x in lines]
    assert open(os.path.join(mnt, "f")).read().split() == [f"{i:08d}" for i in written]
    n1 = open(c.nodes["node1"]["log"]).read()
    assert "I/O held" in n1 and "still attached here after the lease loss" in n1
    assert c.pxctl("node2", "volume", "inspect", "eo")["attached_on"] == "node1"
    for n in c.nodes:
        os.kill(c.pid(n), 0)                       # every node still runs
    assert all(n["status"] == "Online" for n in c.pxctl("node3", "status")["nodes"])


def test_a_node_stopped_while_cut_off_from_etcd_stops_in_time(make_cluster):
    """etcd stops answering; node1, with a volume mounted and its I/O held
    (its lease is lost), is told to stop.  The unmount waits in the kernel
    for that held I/O, where no cancellation reaches: the node fails the
    held I/O after a grace period and stops within ~20 s (before, only the
    launcher's SIGKILL after 60 s ended it), leaving no mount or loop device
    behind.  What was fsynced before is there after the failover."""
    c = make_cluster(3, own_etcd=True)
    etcd_pid = json.load(open(os.path.join(c.workdir, "cluster.json")))["etcd_pid"]
    c.pxctl("node1", "volume", "create", "so", "--size", "256M", "--repl", "2",
            "--nodes", "node1,node2")
    mnt = c.pxctl("node1", "host", "mount", "so")["mount"]
    dev = c.pxctl("node1", "volume", "inspect", "so")["device_path"]
    with open(os.path.join(mnt, "kept"), "wb") as f:
        f.write(b"fsynced before the outage\n")
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(mnt, "dirty"), "wb") as f:
        f.write(b"x" * 65536)           # in the page cache: the unmount must write it
    os.kill(etcd_pid, signal.SIGSTOP)
    try:
        c.wait_for(lambda: "lost its etcd lease" in open(c.nodes["node1"]["log"]).read(),
                   timeout=40, what="node1 finding its lease lost")
        t0 = time.monotonic()
        c.stop_node("node1")
        took = time.monotonic() - t0
    finally:
        os.kill(etcd_pid, signal.SIGCONT)
    log = open(c.nodes["node1"]["log"]).read()
    assert took < 40 and "the node is stopping and the volume's I/O was held" in log, took
    assert not os.path.ismount(mnt)
    # its loop device is gone (by backing file: another cluster on the host may
    # have taken the same device number since)
    assert dev and _loops_on(c.nodes["node1"]["fuse"]) == []
    attach_after_failover(c, "node2", "so", timeout=30)
    mnt2 = c.pxctl("node2", "host", "mount", "so")["mount"]
    assert open(os.path.join(mnt2, "kept"), "rb").read() == b"fsynced before the outage\n"


def test_a_node_taken_over_while_mounted_is_cleaned_up_through_pxctl(make_cluster):
    """node1 is paused with the volume mounted; node2 takes it over.  When
    node1 wakes up its attachment is gone: a new attach or mount there is
    refused while the old mount is still in place, and pxctl unmount/detach
    clear it without touching node2's attachment."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "tm", "--size", "256M", "--repl", "2",
            "--nodes", "node1,node2")
    mnt1 = c.pxctl("node1", "host", "mount", "tm")["mount"]
    c.signal("node1", signal.SIGSTOP)
    try:
        attach_after_failover(c, "node2", "tm", timeout=30)
    finally:
        c.signal("node1", signal.SIGCONT)
    c.wait_for(lambda: "not attached here any more" in open(c.nodes["node1"]["log"]).read(),
               timeout=30, what="node1 learning it lost the volume")
    res = c.pxctl("node1", "host", "attach", "tm", check=False)
    assert res.returncode == 1 and "still mounted" in res.stderr, res.stderr
    # a mount there used to answer "successfully mounted" while every write failed
    c.wait_for(lambda: c.pxctl("node1", "volume", "inspect", "tm").get("io_stopped"),
               timeout=30, what="node1 stopping the volume's I/O")
    # its own device and mount, not only the new owner's paths
    text = c.pxctl("node1", "volume", "inspect", "tm", as_json=False)
    assert f"mounted at {mnt1}; unmount, detach and attach again" in text, text
    res = c.pxctl("node1", "host", "mount", "tm", "--path", mnt1, check=False)
    assert res.returncode == 1 and "I/O stopped on this node" in res.stderr, res.stderr
    c.pxctl("node1", "host", "unmount", "tm")
    assert not os.path.ismount(mnt1)
    c.pxctl("node1", "host", "detach", "tm")
    assert c.pxctl("node3", "volume", "inspect", "tm")["attached_on"] == "node2"
    assert _loops_on(c.nodes["node1"]["fuse"]) == []


def test_restart_cleans_what_a_crash_left_without_its_fuse_view(make_cluster):
    """A node crashed, and its FUSE view went away with it (a crash path
    unmounts it): its loop devices then name their file '/<volume>'.  The
    next start still recognises them from its own records and cleans up."""
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "cr", "--size", "256M", "--repl", "2")
    mnt = c.pxctl("node1", "host", "mount", "cr")["mount"]
    dev = c.pxctl("node1", "host", "attach", "cr")["device"]
    c.stop_node("node1", kill=True)
    subprocess.run(["umount", "-l", c.nodes["node1"]["fuse"]], check=True)
    backing = f"/sys/block/{os.path.basename(dev)}/loop/backing_file"

    def still_ours():
        try:
            return open(backing).read().strip() == "/cr"
        except OSError:
            return False
    try:
        assert still_ours()
        c.start_node("node1")
        assert not os.path.ismount(mnt)
        assert not still_ours()
    finally:
        # the cluster's teardown knows loop devices by their backing file in
        # its workdir: this one names "/cr" now
        if still_ours():
            subprocess.run(["umount", "-l", mnt], capture_output=True)
            subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_a_restarted_node_lets_go_of_its_old_attachments_at_once(make_cluster):
    """A node killed and started again undoes its previous run's loop
    devices, and ends that run's lease with them: another node may attach
    the volume at once, not only once the old lease expires."""
    c = make_cluster(2, lease_ttl=30)
    c.pxctl("node1", "volume", "create", "rs", "--size", "256M", "--repl", "2")
    c.pxctl("node1", "host", "attach", "rs")
    c.stop_node("node1", kill=True)
    t0 = time.monotonic()
    c.start_node("node1")
    [vol] = c.pxctl("node2", "volume", "list")
    assert vol["attached_on"] is None, vol
    dev = c.pxctl("node2", "host", "attach", "rs")["device"]
    assert time.monotonic() - t0 < 30, "too slow to tell a revoke from an expiry"
    assert c.pxctl("node1", "volume", "inspect", "rs")["attached_on"] == "node2"
    assert dev


def test_no_take_back_when_a_replica_was_resynced_meanwhile(make_cluster):
    """node1 is attached, node2's replica out of sync (node3's in sync).
    node1 is paused past its lease; node2 comes back and, the volume looking
    detached, resyncs its replica from node3 by itself and is marked in sync.  When node1 wakes up it
    must not take the volume back with its old view (it would never write
    to node2 again): its I/O fails, and the volume is attached afresh."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "rb", "--size", "256M", "--repl", "3", "--fs", "none")
    dev = c.pxctl("node1", "host", "attach", "rb")["device"]
    c.stop_node("node2", kill=True)
    dd_write(dev, b"1", 0, 2)
    c.wait_for(lambda: replica_states(c, "node3", "rb")["node2"] == "out_of_sync", timeout=30,
               what="node2 out of sync")
    c.signal("node1", signal.SIGSTOP)
    try:
        c.wait_for(lambda: c.pxctl("node3", "volume", "inspect", "rb")["attached_on"] is None,
                   timeout=30, what="node1's lease expiring")
        c.start_node("node2")
        c.wait_for(lambda: replica_states(c, "node3", "rb")["node2"] == "in_sync", timeout=60,
                   what="node2 resynced while detached")
    finally:
        c.signal("node1", signal.SIGCONT)
    c.wait_for(lambda: "changed while this node was away" in open(c.nodes["node1"]["log"]).read(),
               timeout=30, what="node1 refusing to take the volume back")
    c.pxctl("node1", "host", "detach", "rb")
    dev2 = c.pxctl("node2", "host", "attach", "rb")["device"]
    dd_write(dev2, b"2", 0, 2)
    assert dd_read(dev2, 0, 2) == b"2" * (2 * MiB)
    assert all(s == "in_sync" for s in replica_states(c, "node2", "rb").values())


class CutProxy:
    """A TCP proxy to ``upstream`` (host, port) on a free loopback port.
    ``cut()`` makes it a black hole, as a partition does: connections stay
    open and new ones are taken, but nothing gets through, so requests hang
    until their timeouts.  ``mend()`` closes them all (clients reconnect)
    and forwards again."""

    def __init__(self, upstream):
        self.upstream, self.open, self.socks = upstream, True, []
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                self.socks.append(conn)
                if not self.open:
                    threading.Thread(target=self._pipe, args=(conn, None), daemon=True).start()
                    continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            with self.lock:
                self.socks.append(up)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while data := src.recv(65536):
                if self.open and dst is not None:
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s and s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.open = False

    def mend(self):
        with self.lock:
            for s in self.socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.socks = []
            self.open = True

    def close(self):
        self.mend()
        self.lsock.close()


@pytest.mark.parametrize("cut", ["etcd", "etcd+peers"])
def test_a_node_cut_off_from_etcd_serves_no_stale_reads(make_cluster, cut):
    """node1 can no longer reach etcd (requests hang, as in a partition),
    and with "etcd+peers" its data port is unreachable too, so node2 cannot
    fence node1's replica and marks it out of sync.  node1's lease runs out,
    node2 takes the volume over and writes.  A read on node1 (past its page
    cache) must not be served: it is held once node1's lease may have run
    out, and fails when node1 learns the volume was taken."""
    c = make_cluster(3)
    cfg_path = c.nodes["node1"]["config"]
    cfg = json.load(open(cfg_path))
    host, port = cfg["kvdb"][0].rsplit("/", 1)[-1].rsplit(":", 1)    # etcd:http://H:P
    proxy = CutProxy((host, int(port)))
    rule = ["INPUT", "-p", "tcp", "-d", "127.0.0.1",
            "--dport", c.nodes["node1"]["data"].rsplit(":", 1)[1], "-j", "DROP"]
    dropping = False
    try:
        cfg["kvdb"] = [f"etcd:http://127.0.0.1:{proxy.port}"]
        c.stop_node("node1")
        with open(cfg_path, "w") as fh:
            json.dump(cfg, fh)
        c.start_node("node1")
        c.pxctl("node1", "volume", "create", "sr", "--size", "64M", "--repl", "2",
                "--nodes", "node1,node2", "--fs", "none")
        dev1 = c.pxctl("node1", "host", "attach", "sr")["device"]
        dd_write(dev1, b"A", 0, 1)
        assert dd_read(dev1, 0, 1) == b"A" * MiB
        proxy.cut()
        if cut == "etcd+peers":
            subprocess.run(["iptables", "-I", *rule], check=True)
            dropping = True
        attach_after_failover(c, "node2", "sr", timeout=40)
        if cut == "etcd+peers":
            assert replica_states(c, "node2", "sr")["node1"] == "out_of_sync"
        dev2 = c.pxctl("node2", "host", "attach", "sr")["device"]    # attached: says where
        dd_write(dev2, b"B", 0, 1)
        reader = subprocess.Popen(["dd", f"if={dev1}", "bs=1M", "count=1", "iflag=direct",
                                   "status=none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            try:
                out, err = reader.communicate(timeout=5)
                assert out != b"A" * MiB, "node1 returned the bytes node2 replaced"
                pytest.fail(f"node1 served a read of a volume attached on node2 ({err!r})")
            except subprocess.TimeoutExpired:          # held: let node1 reach etcd again
                proxy.mend()
                out, err = reader.communicate(timeout=90)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        assert out != b"A" * MiB and reader.returncode != 0, (reader.returncode, err)
        assert b"Input/output error" in err, err
        log1 = open(c.nodes["node1"]["log"]).read()
        assert "I/O held: this node's etcd lease was not refreshed in time" in log1
        assert dd_read(dev2, 0, 1) == b"B" * MiB
    finally:
        if dropping:
            subprocess.run(["iptables", "-D", *rule])
        proxy.close()


def _chunk_files(c, node: str, volid: str) -> int:
    drive = json.load(open(c.nodes[node]["config"]))["storage"]["devices"][0]
    d = os.path.join(drive, "vols", volid)
    return sum(f.endswith(".chk") for f in os.listdir(d)) if os.path.isdir(d) else 0


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_fstrim_gives_the_space_of_deleted_files_back_on_every_replica(make_cluster, fs):
    """Thin volumes shrink again: after a file is deleted, fstrim on the
    mounted volume reaches pxfs through the loop device (discard ->
    fallocate on the node's FUSE view) and the chunks the file held go
    from both replicas; the file kept reads as written after a remount
    from cold caches, and the filesystem checks clean."""
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "trim", "--size", "1G", "--repl", "2", "--fs", fs)
    m = c.pxctl("node1", "host", "mount", "trim")
    volid = c.pxctl("node1", "volume", "inspect", "trim")["id"]
    keep = os.urandom(8 * MiB)
    for name, data in (("keep", keep), ("big", os.urandom(96 * MiB))):
        with open(os.path.join(m["mount"], name), "wb") as fh:
            fh.write(data)
            os.fsync(fh.fileno())
    before = {n: _chunk_files(c, n, volid) for n in ("node1", "node2")}
    assert min(before.values()) >= 100, before
    os.unlink(os.path.join(m["mount"], "big"))
    subprocess.run(["sync"], check=True)
    trims = []

    def trimmed():
        # XFS frees a deleted file's extents in the background (inode
        # inactivation, busy extents until the log is on disk): a trim
        # right after the rm may find them not free yet
        res = subprocess.run(["fstrim", "-v", m["mount"]], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        trims.append(res.stdout)
        after = {n: _chunk_files(c, n, volid) for n in ("node1", "node2")}
        return all(before[n] - after[n] >= 90 for n in after) and after  # most of 96 MiB
    c.wait_for(trimmed, timeout=30, what="the deleted file's chunks gone")
    assert re.search(r"\(([1-9]\d*) bytes\) trimmed", trims[0]), trims
    ins = c.pxctl("node1", "volume", "inspect", "trim")
    assert {r["state"] for r in ins["replicas"]} == {"in_sync"}
    c.pxctl("node1", "host", "unmount", "trim")
    if fs == "ext4":
        _fsck_clean(m["device"])
    else:
        res = subprocess.run(["xfs_repair", "-n", m["device"]], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    drop_cache(m["device"])
    m = c.pxctl("node1", "host", "mount", "trim")
    assert open(os.path.join(m["mount"], "keep"), "rb").read() == keep


def test_discard_and_zeroout_on_the_block_device(make_cluster):
    """blkdiscard, aligned and not, and BLKZEROOUT on a raw volume: those
    ranges read as zeros (also from the other replica alone, after a
    flush), the rest as written; preallocation through the node's FUSE
    file is refused (a thin volume reserves nothing)."""
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "raw", "--size", "64M", "--repl", "2", "--fs", "none")
    dev = c.pxctl("node1", "host", "attach", "raw")["device"]
    data = bytearray(os.urandom(8 * MiB))
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    for off, n, zero in [(4096, 8192, False), (MiB - 4096, 2 * MiB + 8192, False),
                         (5 * MiB, MiB, False), (6 * MiB + 512, 1536, True),
                         (7 * MiB + 4096, 65536, True)]:
        subprocess.run(["blkdiscard"] + (["-z"] if zero else []) + ["-o", str(off), "-l", str(n),
                        dev], check=True, capture_output=True)
        data[off:off + n] = bytes(n)
    fd = os.open(dev, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    drop_cache(dev)
    assert dd_read(dev, 0, 8) == bytes(data)
    image = os.path.join(c.nodes["node1"]["fuse"], "raw")
    res = subprocess.run(["fallocate", "-o", "0", "-l", "4096", image], capture_output=True,
                         text=True)
    assert res.returncode != 0 and "not supported" in res.stderr, res
    # the other replica alone has the same bytes
    c.pxctl("node1", "host", "detach", "raw")
    c.stop_node("node1", kill=True)
    dev = c.pxctl("node2", "host", "attach", "raw")["device"]
    assert replica_states(c, "node2", "raw")["node2"] == "in_sync"
    assert dd_read(dev, 0, 8) == bytes(data)


def _bytes_held(c, node: str, volid: str) -> int:
    drive = json.load(open(c.nodes[node]["config"]))["storage"]["devices"][0]
    d = os.path.join(drive, "vols", volid)
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for f in os.listdir(d)
               if f.endswith(".chk"))


def test_discards_inside_chunks_give_space_back_after_the_flush(make_cluster):
    """A discard of part of each chunk (a filesystem's free space is rarely
    whole 1 MiB chunks) gives that part's space back on every replica once
    a flush has made it durable, and the rest reads as written."""
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "holes", "--size", "64M", "--repl", "2", "--fs",
            "none")
    volid = c.pxctl("node1", "volume", "inspect", "holes")["id"]
    dev = c.pxctl("node1", "host", "attach", "holes")["device"]
    data = bytearray(os.urandom(8 * MiB))
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        before = {n: _bytes_held(c, n, volid) for n in ("node1", "node2")}
        for i in range(8):              # the middle 768 KiB of each chunk
            subprocess.run(["blkdiscard", "-o", str(i * MiB + 128 * 1024), "-l",
                            str(768 * 1024), dev], check=True, capture_output=True)
            data[i * MiB + 128 * 1024:i * MiB + 896 * 1024] = bytes(768 * 1024)
        os.fsync(fd)
    finally:
        os.close(fd)
    after = {n: _bytes_held(c, n, volid) for n in ("node1", "node2")}
    for n in after:
        assert before[n] - after[n] >= 6 * MiB, (before, after)
    drop_cache(dev)
    assert dd_read(dev, 0, 8) == bytes(data)


@pytest.mark.parametrize("how", ["killed", "paused", "paused briefly"])
def test_a_resync_orphaned_by_its_attached_node_starts_over(make_cluster, how):
    """node1 (attached, holding no replica) is resyncing node2's replica
    from node3 when it dies, or pauses past its lease: the volume is
    detached and node2's replica is left marked resyncing with nobody
    copying.  node2 must start over by itself (after a grace of 4 leases)
    and end in sync, with every byte written, without an attach; a paused
    node1 that wakes up after that must not take the volume back (its term
    is old now) nor write.  Woken within the grace, node1 takes its
    attachment back, the application's I/O goes on, and node1 resyncs
    node2 itself."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "orph", "--size", "256M", "--repl", "2", "--fs",
            "none", "--nodes", "node2,node3")
    dev = c.pxctl("node1", "host", "attach", "orph")["device"]
    dd_write(dev, b"first pass", 0, 32)
    c.stop_node("node2", kill=True)
    dd_write(dev, b"while node2 was out", 16, 64)
    c.wait_for(lambda: replica_states(c, "node1", "orph")["node2"] == "out_of_sync",
               timeout=30, what="node2 out of sync")
    c.start_node("node2")
    os.kill(c.pid("node3"), signal.SIGSTOP)           # the copy stalls on its source
    paused = []
    try:
        c.wait_for(lambda: replica_states(c, "node1", "orph")["node2"] == "resyncing",
                   timeout=30, what="node2 resyncing")
        if how == "killed":
            c.stop_node("node1", kill=True)
        elif how == "paused briefly":
            c.signal("node1", signal.SIGSTOP)
            paused.append("node1")
            c.wait_for(lambda: {n["id"]: n["status"] for n in c.pxctl("node2", "status")[
                "nodes"]}["node1"] == "Offline", timeout=30, what="node1's lease gone")
            time.sleep(2)
            c.signal("node1", signal.SIGCONT)
            paused.clear()
            c.wait_for(lambda: "still attached here after the lease loss"
                       in open(c.nodes["node1"]["log"]).read(), timeout=30,
                       what="node1 taking its attachment back")
        else:
            # node1 sleeps past its lease: node2 starts over (its own copy
            # stalls on node3 too); node1 wakes up while it copies
            c.signal("node1", signal.SIGSTOP)
            paused.append("node1")
            c.wait_for(lambda: "stopped with its runner" in open(c.nodes["node2"]["log"]).read(),
                       timeout=45, what="node2 starting over")
            c.signal("node1", signal.SIGCONT)
            paused.clear()
            c.wait_for(lambda: "attached elsewhere" in open(c.nodes["node1"]["log"]).read(),
                       timeout=30, what="node1 finding it may not take orph back")
    finally:
        for n in paused:
            c.signal(n, signal.SIGCONT)
        os.kill(c.pid("node3"), signal.SIGCONT)
    c.wait_for(lambda: replica_states(c, "node2", "orph")["node2"] == "in_sync",
               timeout=60, what="node2 in sync again without an attach")
    if how == "paused briefly":
        assert "stopped with its runner" not in open(c.nodes["node2"]["log"]).read()
        dd_write(dev, b"after the pause", 100, 1)          # still attached, I/O goes on
        assert c.pxctl("node1", "volume", "inspect", "orph")["attached_on"] == "node1"
        c.pxctl("node1", "host", "detach", "orph")
    else:
        assert "stopped with its runner" in open(c.nodes["node2"]["log"]).read()
    if how == "paused":
        with pytest.raises(OSError):
            dd_write(dev, b"stale", 0, 1)
        c.pxctl("node1", "host", "detach", "orph")
    c.stop_node("node3", kill=True)                   # node2's copy alone
    dev = c.pxctl("node2", "host", "attach", "orph")["device"]
    data = dd_read(dev, 0, 80)
    first, later = ((p * (MiB // len(p) + 1))[:MiB] for p in (b"first pass",
                                                            b"while node2 was out"))
    assert data == first * 16 + later * 64
    if how == "paused briefly":
        assert dd_read(dev, 100, 1) == (b"after the pause" * (MiB // 15 + 1))[:MiB]


def test_inspect_says_when_the_attachment_here_stopped_its_io(make_cluster):
    """A write that both in-sync replicas leave unanswered (both paused)
    stops the attachment's I/O (they may now differ).  etcd still shows the
    volume up and both replicas in sync; `pxctl volume inspect` on the
    attached node must say that its I/O stopped, and why."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "st", "--size", "64M", "--repl", "2", "--fs", "none",
            "--nodes", "node2,node3")
    dev = c.pxctl("node1", "host", "attach", "st")["device"]
    dd_write(dev, b"s", 0, 1)
    assert "io_stopped" not in c.pxctl("node1", "volume", "inspect", "st")
    for n in ("node2", "node3"):
        c.signal(n, signal.SIGSTOP)
    try:
        with pytest.raises(OSError):
            dd_write(dev, b"t", 1, 1)
    finally:
        for n in ("node2", "node3"):
            c.signal(n, signal.SIGCONT)
    ins = c.pxctl("node1", "volume", "inspect", "st")
    assert "failed on every in-sync replica" in ins["io_stopped"], ins
    text = c.pxctl("node1", "volume", "inspect", "st", as_json=False)
    assert "STOPPED on this node" in text and f"still here: {dev}; detach and attach" in text, \
        text
    c.pxctl("node1", "host", "detach", "st")
    dev = c.pxctl("node1", "host", "attach", "st")["device"]
    assert "io_stopped" not in c.pxctl("node1", "volume", "inspect", "st")


def test_a_volume_deleted_while_its_node_was_cut_off_is_cleaned_up_through_pxctl(make_cluster):
    """node1 is paused with the volume mounted; its attachment expires with
    its lease and the volume is deleted from node2.  When node1 wakes up,
    pxctl unmount and detach of that name still clear its mount and loop
    device (the volume's record is gone)."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "dz", "--size", "256M", "--repl", "2",
            "--nodes", "node2,node3")
    mnt1 = c.pxctl("node1", "host", "mount", "dz")["mount"]
    c.signal("node1", signal.SIGSTOP)
    try:
        c.wait_for(lambda: c.pxctl("node2", "volume", "delete", "dz", check=False).returncode
                   == 0, timeout=30, what="the delete of dz from node2")
    finally:
        c.signal("node1", signal.SIGCONT)
    c.wait_for(lambda: c.pxctl("node1", "status")["nodes"] and all(
        n["status"] == "Online" for n in c.pxctl("node1", "status")["nodes"]),
        timeout=30, what="node1 back")
    c.pxctl("node1", "host", "unmount", "dz")
    assert not os.path.ismount(mnt1)
    c.pxctl("node1", "host", "detach", "dz")
    assert _loops_on(c.nodes["node1"]["fuse"]) == []
    res = c.pxctl("node1", "host", "detach", "dz", check=False)
    assert res.returncode == 1 and "not found" in res.stderr, res.stderr


def test_a_node_started_while_etcd_is_down_waits_for_it(make_cluster):
    """A node (re)started while etcd does not answer waits for it, says so
    in its log, and joins once etcd is back, with its volume's data."""
    c = make_cluster(2, own_etcd=True)
    etcd_pid = json.load(open(os.path.join(c.workdir, "cluster.json")))["etcd_pid"]
    c.pxctl("node1", "volume", "create", "ew", "--size", "64M", "--repl", "2", "--fs", "none")
    dev = c.pxctl("node1", "host", "attach", "ew")["device"]
    dd_write(dev, b"e", 0, 2)
    c.pxctl("node1", "host", "detach", "ew")
    c.stop_node("node1")
    os.kill(etcd_pid, signal.SIGSTOP)
    started = []
    t = threading.Thread(target=lambda: started.append(c.cli("start-node", "node1")))
    try:
        t.start()
        c.wait_for(lambda: "waiting for etcd" in open(c.nodes["node1"]["log"]).read(),
                   timeout=40, what="node1 saying it waits for etcd")
        assert t.is_alive()
    finally:
        os.kill(etcd_pid, signal.SIGCONT)
        t.join(timeout=120)
    assert started and started[0].returncode == 0, started
    c.nodes["node1"].update(json.loads(started[0].stdout))
    c.wait_for(lambda: all(n["status"] == "Online" for n in c.pxctl("node2", "status")["nodes"]),
               timeout=30, what="both nodes online")
    dev = c.pxctl("node1", "host", "attach", "ew")["device"]
    assert dd_read(dev, 0, 2) == b"e" * (2 * MiB)


def test_mount_paths_with_utf8_and_spaces_unmount_for_real(make_cluster, tmp_path):
    """/proc/self/mounts gives a UTF-8 name as its bytes and a space as an
    octal escape: the unmount must find the mount (it took a mount it did
    not recognise for one undone by hand, said "unmounted" and let detach
    pull the device from under a live filesystem)."""
    c = make_cluster(1)
    c.pxctl("node1", "volume", "create", "uv8", "--size", "128M", "--fs", "ext4")
    path = str(tmp_path / "mnt ü é")
    os.makedirs(path)
    c.pxctl("node1", "host", "mount", "uv8", "--path", path)
    assert os.path.ismount(path)
    with open(os.path.join(path, "f"), "w") as fh:
        fh.write("kept")
    assert c.pxctl("node1", "volume", "inspect", "uv8")["mount_path"] == path
    res = c.pxctl("node1", "host", "detach", "uv8", check=False)
    assert res.returncode == 1 and "mounted" in res.stderr, res.stderr
    c.pxctl("node1", "host", "unmount", "uv8")
    assert not os.path.ismount(path)
    c.pxctl("node1", "host", "detach", "uv8")
    c.pxctl("node1", "host", "mount", "uv8", "--path", path)
    assert open(os.path.join(path, "f")).read() == "kept"
    c.pxctl("node1", "host", "unmount", "uv8")
    assert not os.path.ismount(path)


def test_inspect_on_the_attached_node_shows_io_failing_at_once(make_cluster):
    """The only replica's node dies: etcd still calls it in sync until its
    lease ends, but the attached node's inspect shows the failed I/O (how
    many, how long ago, which replica) from the first failure on."""
    c = make_cluster(2, lease_ttl=10)
    c.pxctl("node1", "volume", "create", "lone", "--size", "64M", "--repl", "1", "--fs", "none",
            "--nodes", "node2")
    dev = c.pxctl("node1", "host", "attach", "lone")["device"]
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    buf.write(b"x" * 4096)
    try:
        os.pwrite(fd, buf, 0)
        assert "I/O errors" not in c.pxctl("node1", "volume", "inspect", "lone", as_json=False)
        c.stop_node("node2", kill=True)
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, buf, 1 << 20)
            os.fsync(fd)
        assert ei.value.errno == errno.EIO
    finally:
        os.close(fd)
    v = c.pxctl("node1", "volume", "inspect", "lone")
    assert v["replicas"][0]["state"] == "in_sync"        # etcd's view, for up to a lease
    assert v["io"]["errors"] >= 1 and "node2" in v["io"]["last_error"], v["io"]
    text = c.pxctl("node1", "volume", "inspect", "lone", as_json=False)
    line = next(ln for ln in text.splitlines() if ln.startswith("I/O errors"))
    assert re.search(r": \d+, the last \d+ s ago: volume \d+: no in-sync replica took the "
                     r"write: node2: ", line), line


def test_cluster_delete_removes_an_offline_node_that_holds_no_replica(make_cluster):
    """`pxctl cluster delete`: refused for an Online node, for one holding a
    replica (naming the volume), for an unknown one, and for the node asked
    itself; an Offline node with no replica goes from the cluster, and
    registers again if it is started again."""
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "kept", "--size", "64M", "--repl", "1", "--fs", "none",
            "--nodes", "node2")

    def nodes():
        return {n["id"]: n["status"] for n in c.pxctl("node1", "status")["nodes"]}

    def refused(node, *words):
        res = c.pxctl("node1", "cluster", "delete", node, check=False)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        for w in words:
            assert w in res.stderr, res.stderr
    refused("node3", "node3 is Online")
    refused("node2", "node2 is Online")         # not only "holds replicas": Online first
    refused("node1", "this node")
    # `volume list` filters, as Portworx's --name, --label and --node-id
    c.pxctl("node1", "volume", "create", "lab", "--size", "64M", "--repl", "1", "--fs", "none",
            "--nodes", "node3", "--label", "app=db,tier=gold")

    def listed(*flags):
        return [v["name"] for v in c.pxctl("node1", "volume", "list", *flags)]
    assert listed() == ["kept", "lab"]
    assert listed("--node-id", "node2") == ["kept"] and listed("--node-id", "node1") == []
    assert listed("--label", "app=db") == ["lab"] and listed("-l", "app=db,tier=gold") == ["lab"]
    assert listed("--label", "app=db,tier=silver") == [] and listed("--name", "kept") == ["kept"]
    assert listed("--name", "kept", "--node-id", "node3") == []
    kept_id = c.pxctl("node1", "volume", "inspect", "kept")["id"]
    assert listed("--name", kept_id) == ["kept"]                # a name or an id, as elsewhere
    text = c.pxctl("node1", "volume", "list", "--label", "tier=gold", as_json=False)
    assert "lab" in text and "kept" not in text
    for flags, said in ((("--label", "app"), "expected key=value"),
                        (("--node-id", "no de"), "not a node id")):
        res = c.pxctl("node1", "volume", "list", *flags, check=False)
        assert res.returncode == 1 and said in res.stderr, res.stderr
    import httpx
    r = httpx.get(c.api("node1") + "/v1/volumes?nmae=kept")
    assert r.status_code == 400 and "unknown query parameter 'nmae'" in r.json()["error"]
    r = httpx.get(c.api("node1") + "/v1/volumes?name=")
    assert r.status_code == 400 and "'name' is empty" in r.json()["error"], r.text
    # repeated --label: all of them, as one k=v,k2=v2 list; a scalar flag
    # given twice is refused rather than the last one taken
    assert listed("-l", "app=db", "-l", "tier=gold") == ["lab"]
    assert listed("-l", "app=db", "-l", "tier=silver") == []
    for flags in (("--name", "kept", "--name", "lab"), ("--node-id", "node2", "--node-id", "node3")):
        res = c.pxctl("node1", "volume", "list", *flags, check=False)
        assert res.returncode == 2 and "given 2 times" in res.stderr, res.stderr
    res = c.pxctl("node1", "volume", "create", "twice", "-s", "1", "-s", "2", check=False)
    assert res.returncode == 2 and "'--size': given 2 times" in res.stderr, res.stderr
    # only the list takes query parameters; DELETE takes no body
    for method, path in (("POST", "/v1/volumes/lab/attach?node=node2"),
                         ("DELETE", "/v1/volumes/lab?force=1"), ("GET", "/v1/cluster/status?x=1"),
                         ("POST", "/v1/volumes?name=zzz")):
        r = httpx.request(method, c.api("node1") + path, json={"name": "zzz", "size": 1} if
                          path.startswith("/v1/volumes?") else None)
        assert r.status_code == 400 and "unknown query parameter" in r.json()["error"], r.text
    r = httpx.request("DELETE", c.api("node1") + "/v1/volumes/lab", json={"force": True})
    assert r.status_code == 400 and "takes no fields" in r.json()["error"], r.text
    assert listed() == ["kept", "lab"] and c.pxctl("node1", "volume", "inspect", "lab")[
        "attached_on"] is None
    c.pxctl("node1", "volume", "delete", "lab")
    refused("nosuch", "'nosuch' is not in the cluster")
    c.stop_node("node2")
    c.stop_node("node3")
    c.wait_for(lambda: nodes()["node3"] == "Offline" and nodes()["node2"] == "Offline",
               what="node2 and node3 Offline")
    refused("node2", "holds replicas of kept")
    out = c.pxctl("node1", "cluster", "delete", "node3")
    assert out == {"node": "node3", "removed": True}
    assert set(nodes()) == {"node1", "node2"}
    refused("node3", "not in the cluster")
    c.start_node("node3")
    assert nodes()["node3"] == "Online"


def test_unmount_of_a_busy_mount_names_who_holds_it(make_cluster):
    """A shell sits in the mounted volume and a process has a file open
    there: the unmount is refused naming both, the volume stays mounted,
    and it unmounts once they are gone."""
    c = make_cluster(1)
    c.pxctl("node1", "volume", "create", "busym", "--size", "128M", "--fs", "ext4")
    mnt = c.pxctl("node1", "host", "mount", "busym")["mount"]
    sitter = subprocess.Popen(["sleep", "60"], cwd=mnt)
    opener = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1], 'w'); "
                               "print('open', flush=True); sys.stdin.read()",
                               os.path.join(mnt, "f")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert opener.stdout.readline() == "open\n"
        res = c.pxctl("node1", "host", "unmount", "busym", check=False)
        assert res.returncode == 1, res.stderr
        err = res.stderr.strip()
        assert len(err.splitlines()) == 1 and "busy" in err, err
        assert f"{sitter.pid} (sleep)" in err and f"{opener.pid} (python" in err, err
        assert os.path.ismount(mnt)
    finally:
        sitter.kill()
        sitter.wait()
        opener.stdin.close()
        opener.wait(timeout=10)
    # another volume mounted inside it holds it too
    c.pxctl("node1", "volume", "create", "inner", "--size", "64M")
    inner = c.pxctl("node1", "host", "mount", "inner", "--path", os.path.join(mnt, "sub"))["mount"]
    res = c.pxctl("node1", "host", "unmount", "busym", check=False)
    assert res.returncode == 1 and f"in use by a mount at {inner}" in res.stderr, res.stderr
    c.pxctl("node1", "host", "unmount", "inner")
    c.pxctl("node1", "host", "unmount", "busym")
    assert not os.path.ismount(mnt)


def test_detach_refuses_a_device_a_process_holds_open(make_cluster):
    """A process (a database on the raw device) holds the volume's block
    device open: detach is refused, naming it, and changes nothing; once it
    closes the device, detach goes on."""
    c = make_cluster(1)
    c.pxctl("node1", "volume", "create", "busy", "--size", "64M", "--fs", "none")
    a = c.pxctl("node1", "host", "attach", "busy")
    dev, pxd = a["device"], a["pxd"]
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys; fd = os.open(sys.argv[1], "
                               "os.O_RDWR); print('open', flush=True); sys.stdin.read()", dev],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        res = c.pxctl("node1", "host", "detach", "busy", check=False)
        assert res.returncode == 1 and f"{dev} is open by {holder.pid} (python" in res.stderr, \
            res.stderr
        assert c.pxctl("node1", "volume", "inspect", "busy")["attached_on"] == "node1"
        assert os.path.exists(dev) and dev in _loops_on(c.nodes["node1"]["fuse"])
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    # a mount made by hand holds the device with no open file to see: what
    # it has not written back would be thrown away
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    hand = os.path.join(c.workdir, "hand mnt")
    os.mkdir(hand)
    subprocess.run(["mount", pxd, hand], check=True)
    try:
        with open(os.path.join(hand, "f"), "w") as fh:
            fh.write("not yet written back")
        res = c.pxctl("node1", "host", "detach", "busy", check=False)
        assert res.returncode == 1 and f"{dev} is mounted at {hand}; unmount" in res.stderr, \
            res.stderr
        assert c.pxctl("node1", "volume", "inspect", "busy")["attached_on"] == "node1"
    finally:
        subprocess.run(["umount", hand], check=True)
    c.pxctl("node1", "host", "detach", "busy")
    assert _loops_on(c.nodes["node1"]["fuse"]) == []
    c.pxctl("node1", "host", "attach", "busy")
    subprocess.run(["mount", "-o", "ro", pxd, hand], check=True)
    try:
        assert open(os.path.join(hand, "f")).read() == "not yet written back"
    finally:
        subprocess.run(["umount", hand], check=True)
    c.pxctl("node1", "host", "detach", "busy")


def test_delete_does_not_wait_for_a_paused_replica(make_cluster):
    """A replica's node is paused (SIGSTOP): etcd still has it Online and
    its kernel still accepts connections, but it answers nothing.  Delete
    returns within seconds; the paused node drops the volume's chunks once
    it runs again and has its lease back."""
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "pz", "--size", "64M", "--repl", "2", "--fs", "none")
    dev = c.pxctl("node1", "host", "attach", "pz")["device"]
    dd_write(dev, b"z", 0, 4)
    c.pxctl("node1", "host", "detach", "pz")
    vols2 = os.path.join(c.workdir, "node2", "drive0", "vols")
    assert os.listdir(vols2)
    c.signal("node2", signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        c.pxctl("node1", "volume", "delete", "pz")
        took = time.monotonic() - t0
        assert took < 15, f"delete waited {took:.1f} s for the paused replica"
        c.wait_for(lambda: [n["status"] for n in c.pxctl("node1", "status")["nodes"]
                            if n["id"] == "node2"] == ["Offline"], timeout=30,
                   what="node2 offline")
    finally:
        c.signal("node2", signal.SIGCONT)
    assert os.listdir(vols2), "nothing should have removed them while node2 was paused"
    c.wait_for(lambda: os.listdir(vols2) == [], timeout=30,
               what="node2 dropping the deleted volume's chunks")
    assert os.listdir(os.path.join(c.workdir, "node1", "drive0", "vols")) == []


def _launcher(*args):
    return subprocess.run([sys.executable, "-m", "pxfs_tools.cluster", *args],
                          capture_output=True, text=True, timeout=120)


def test_launcher_refuses_a_workdir_in_use_or_with_old_drives(make_cluster, tmp_path):
    c = make_cluster(1)
    res = _launcher("up", "--nodes", "1", "--workdir", c.workdir)
    assert res.returncode == 1 and "already holds a cluster" in res.stderr, res.stderr
    res = _launcher("stop-node", "node7", "--workdir", c.workdir)
    assert res.returncode == 1 and "no node 'node7'" in res.stderr, res.stderr
    for cmd in ("stop-etcd", "start-etcd"):     # the test session's etcd is not its own
        res = _launcher(cmd, "--workdir", c.workdir)
        assert res.returncode == 1 and "did not start" in res.stderr, res.stderr
    # drives an earlier cluster left (down keeps them): refused before anything starts
    old = tmp_path / "old"
    (old / "node1").mkdir(parents=True)
    (old / "node1" / "drive0.img").write_bytes(b"")
    res = _launcher("up", "--nodes", "1", "--workdir", str(old))
    assert res.returncode == 1 and "holds the drives of an earlier cluster" in res.stderr
    assert sorted(os.listdir(old)) == [".pxfs-cluster.lock", "node1"]
    # drive sizes that cannot be made or formatted: refused before anything is made
    for size, said in (("abc", "expected a number"), ("100M", "below the minimum of 300 MiB")):
        res = _launcher("up", "--nodes", "1", "--workdir", str(tmp_path / "small"),
                        "--drive-size", size)
        assert res.returncode == 2 and said in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and not (tmp_path / "small").exists()
    # another launcher command working in the same workdir
    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".pxfs-cluster.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        res = _launcher("up", "--nodes", "1", "--workdir", str(busy))
    assert res.returncode == 1 and "another pxfs-cluster command" in res.stderr, res.stderr
    assert sorted(os.listdir(busy)) == [".pxfs-cluster.lock"]
    # a command in the cluster's own workdir: down refuses at once and stops nothing;
    # stop-node waits for the command before it, then does its work
    with open(os.path.join(c.workdir, ".pxfs-cluster.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        res = _launcher("down", "--workdir", c.workdir)
        assert res.returncode == 1 and "another pxfs-cluster command" in res.stderr, res.stderr
        c.pxctl("node1", "status")
        waiting = subprocess.Popen([sys.executable, "-m", "pxfs_tools.cluster", "stop-node",
                                    "node1", "--workdir", c.workdir],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert waiting.poll() is None                   # still waiting for the lock
        c.pxctl("node1", "status")
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert c.pxctl("node1", "status", check=False).returncode != 0   # stopped now


def test_pxctl_gives_up_on_a_silent_node_after_pxctl_timeout():
    """A node that takes the connection and never answers (paused): pxctl
    waits PXCTL_TIMEOUT seconds, not its 120 s default, and says so; a bad
    value is a usage error."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        url = f"http://127.0.0.1:{lsock.getsockname()[1]}"
        argv = [sys.executable, os.path.join(ROOT, "pxctl"), "--host", url, "status"]
        t0 = time.monotonic()
        res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60,
                             env={**os.environ, "PXCTL_TIMEOUT": "1.5"})
        took = time.monotonic() - t0
    assert res.returncode == 1 and "did not answer within 1.5 s" in res.stderr, res.stderr
    assert took < 10, took
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "PXCTL_TIMEOUT": "-1"})
    assert res.returncode == 2 and "PXCTL_TIMEOUT '-1'" in res.stderr, res.stderr


@pytest.mark.parametrize("flag, url, said", [
    (True, "http://127.0.0.1:99999", "not a URL (Port out of range"),
    (True, "127.0.0.1:9001", "no http:// or https:// scheme"),
    (True, "http://:9001", "no host name"),
    (True, "http://127.0.0.1:0", "port 0"),
    (True, "http://[::1", "not a URL"),
    (True, "http://127.0.0.1:9001/v1?x=1", "a path, query or fragment"),
    (False, "http://x:abc", "not a URL (Port could not be cast"),
])
def test_pxctl_refuses_a_bad_node_url_before_asking(flag, url, said):
    """A node URL that cannot be one is a usage error naming where it came
    from (--host or PXCTL_HOST); a port of 99999 used to be reported as
    "connection refused"."""
    env = {**os.environ, "PXCTL_HOST": url} if not flag else dict(os.environ)
    argv = [sys.executable, os.path.join(ROOT, "pxctl")] + (["--host", url] if flag else [])
    res = subprocess.run(argv + ["volume", "list"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, env=env)
    where = "'--host'" if flag else "PXCTL_HOST"
    assert res.returncode == 2 and f"Invalid value for {where}: {said}" in res.stderr, res.stderr
    assert "connection refused" not in res.stderr.lower(), res.stderr


def test_launcher_takes_its_ports_from_pxfs_port_range(etcd_url, tmp_path):
    """PXFS_PORT_RANGE bounds the ports a cluster gets; a bad one is refused
    before anything starts."""
    env = {**os.environ}
    for bad in ("abc", "20000-10000", "80-2000", "10000-70000"):
        env["PXFS_PORT_RANGE"] = bad
        res = subprocess.run([sys.executable, "-m", "pxfs_tools.cluster", "up", "--nodes", "1",
                              "--workdir", str(tmp_path / "bad"), "--dir-drives"],
                             capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        assert res.returncode == 1 and f"PXFS_PORT_RANGE {bad!r}" in res.stderr, res.stderr
        assert not os.path.exists(tmp_path / "bad" / "cluster.json")
    lo = int(os.environ.get("PXFS_PORT_RANGE", "10000-").split("-")[0])
    env["PXFS_PORT_RANGE"] = f"{lo + 7}-{lo + 47}"
    wd = str(tmp_path / "good")
    res = subprocess.run([sys.executable, "-m", "pxfs_tools.cluster", "up", "--nodes", "2",
                          "--workdir", wd, "--dir-drives", "--etcd", etcd_url],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    try:
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        ports = [int(n[k].rpartition(":")[2]) for n in out["nodes"] for k in ("api", "data")]
        assert len(set(ports)) == 4 and all(lo + 7 <= p < lo + 47 for p in ports), ports
    finally:
        _launcher("down", "--workdir", wd)
