"""The Docker volume plugin protocol, spoken directly to real nodes' unix
sockets (what dockerd sends): options, names, bad input, mount counting,
restart and failover.  t9_docker.py drives the same through a real dockerd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from conftest import needs_mounts

pytestmark = needs_mounts


def call(c, node: str, op: str, body=None, *, raw: bytes | None = None) -> dict:
    sock = c.nodes[node]["docker_socket"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=120) as h:
        content = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        resp = h.post(f"http://pxd/{op}", content=content,
                      headers={"Content-Type": "application/vnd.docker.plugins.v1.2+json"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/vnd.docker.plugins.v1+json")
    return resp.json()


def ok(c, node, op, body=None) -> dict:
    out = call(c, node, op, body)
    assert out.get("Err", "") == "", out
    return out


def names(c, node="node1") -> set[str]:
    return {v["name"] for v in c.pxctl(node, "volume", "list")}


def is_mounted(path: str) -> bool:
    return os.path.ismount(path)


def test_protocol_create_options_inline_alias_list_get(make_cluster):
    c = make_cluster(2)
    assert call(c, "node1", "Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    assert call(c, "node2", "VolumeDriver.Capabilities") == {"Capabilities": {"Scope": "global"}}

    ok(c, "node1", "VolumeDriver.Create",
       {"Name": "dv", "Opts": {"size": "1G", "repl": "2", "fs": "ext4", "io_priority": "high",
                               "label": "app=db"}})
    vol = c.pxctl("node2", "volume", "inspect", "dv")
    assert (vol["size"], vol["ha"], vol["fs"], vol["io_priority"]) == (1 << 30, 2, "ext4", "HIGH")
    assert vol["labels"] == {"app": "db"}
    ok(c, "node2", "VolumeDriver.Create", {"Name": "dv", "Opts": {"size": "5"}})   # exists: no-op
    assert c.pxctl("node1", "volume", "inspect", "dv")["size"] == 1 << 30

    # the inline spec names the volume by its name=; Docker keeps using the whole string
    inline = "size=100M,repl=2,name=iv,bs=64"
    ok(c, "node2", "VolumeDriver.Create", {"Name": inline, "Opts": {}})
    iv = c.pxctl("node1", "volume", "inspect", "iv")
    assert (iv["size"], iv["ha"], iv["block_size"]) == (100 << 20, 2, 64 << 10)
    got = ok(c, "node1", "VolumeDriver.Get", {"Name": inline})["Volume"]
    assert got["Name"] == inline and got["Status"]["name"] == "iv" and got["Mountpoint"] == ""

    # --opt name=v without --name: Docker makes up a name, pxfs keeps it as an alias
    generated = "ab" * 32
    ok(c, "node1", "VolumeDriver.Create", {"Name": generated, "Opts": {"name": "av", "size": "1"}})
    assert ok(c, "node2", "VolumeDriver.Get", {"Name": generated})["Volume"]["Status"]["name"] == "av"

    c.pxctl("node1", "volume", "create", "fromcli", "--size", "1")
    listed = {v["Name"]: v["Mountpoint"] for v in ok(c, "node2", "VolumeDriver.List")["Volumes"]}
    assert listed == {"dv": "", "iv": "", "av": "", "fromcli": ""}
    assert ok(c, "node1", "VolumeDriver.Path", {"Name": "dv"})["Mountpoint"] == ""
    shared = {"Name": "sv", "Opts": {"shared": "true", "size": "1", "repl": "2"}}
    ok(c, "node1", "VolumeDriver.Create", shared)
    assert c.pxctl("node1", "volume", "inspect", "sv")["shared"] is True

    ok(c, "node2", "VolumeDriver.Remove", {"Name": generated})
    ok(c, "node2", "VolumeDriver.Remove", {"Name": inline})
    assert names(c) == {"dv", "fromcli", "sv"}
    assert "not found" in call(c, "node1", "VolumeDriver.Get", {"Name": generated})["Err"]


BAD = [
    ({"Name": "bad1", "Opts": {"sise": "1"}}, "unknown volume option 'sise'"),
    ({"Name": "bad2", "Opts": {"size": "lots"}}, "size"),
    ({"Name": "bad3", "Opts": {"repl": "4"}}, "repl"),
    ({"Name": "bad4", "Opts": {"fs": "ntfs"}}, "fs"),
    ({"Name": "bad5", "Opts": {"shared": "maybe"}}, "shared"),
    ({"Name": "bad6", "Opts": {"size": 5}}, "Opts must be an object of strings"),
    ({"Name": "bad7", "Opts": ["size=1"]}, "Opts must be an object of strings"),
    ({"Name": "bad8", "Opts": {"name": "other"}}, "two names"),
    ({"Name": "../x", "Opts": {}}, "name"),
    ({"Name": "a/b", "Opts": {}}, "name"),
    ({"Name": "x" * 300, "Opts": {}}, "name"),
    ({"Name": "size=1,repl=2"}, "no name="),
    ({"Name": "size=1,name=bad9", "Opts": {"repl": "2"}}, "not both"),
    ({"Name": "size=1,name=../x"}, "name"),
    ({"Opts": {}}, "Name must be a non-empty string"),
    ({"Name": ""}, "Name must be a non-empty string"),
    ({"Name": 7}, "Name must be a non-empty string"),
]


def test_bad_requests_get_err_and_create_nothing(make_cluster):
    c = make_cluster(2)
    before = names(c)
    for body, expect in BAD:
        out = call(c, "node1", "VolumeDriver.Create", body)
        assert expect in out["Err"], (body, out)
    assert "not valid JSON" in call(c, "node1", "VolumeDriver.Create", raw=b"{nope")["Err"]
    assert "JSON object" in call(c, "node1", "VolumeDriver.Create", raw=b"[1]")["Err"]
    assert "ID must be" in call(c, "node1", "VolumeDriver.Mount", {"Name": "x"})["Err"]
    assert "not found" in call(c, "node1", "VolumeDriver.Mount", {"Name": "nosuch", "ID": "1"})["Err"]
    assert "not found" in call(c, "node1", "VolumeDriver.Remove", {"Name": "nosuch"})["Err"]
    assert "name" in call(c, "node1", "VolumeDriver.Get", {"Name": "../../etc"})["Err"]
    assert names(c) == before == set()
    assert not os.listdir(os.path.join(c.nodes["node1"]["osd_root"], "mounts"))


def test_mounts_are_counted_per_id_and_the_last_unmount_detaches(make_cluster):
    c = make_cluster(2)
    ok(c, "node1", "VolumeDriver.Create", {"Name": "blk", "Opts": {"size": "1", "repl": "2"}})
    path = ok(c, "node1", "VolumeDriver.Mount", {"Name": "blk", "ID": "a"})["Mountpoint"]
    assert path == os.path.join(c.nodes["node1"]["osd_root"], "mounts", "blk")
    assert is_mounted(path)
    with open(os.path.join(path, "data"), "w") as fh:
        fh.write("one")
    assert ok(c, "node1", "VolumeDriver.Mount", {"Name": "blk", "ID": "b"})["Mountpoint"] == path
    assert ok(c, "node1", "VolumeDriver.Mount", {"Name": "blk", "ID": "b"})["Mountpoint"] == path
    ok(c, "node1", "VolumeDriver.Unmount", {"Name": "blk", "ID": "a"})
    assert is_mounted(path)
    assert ok(c, "node1", "VolumeDriver.Path", {"Name": "blk"})["Mountpoint"] == path
    # an operator cannot pull the volume from under the containers
    for cmd in (["host", "unmount", "blk"], ["host", "detach", "blk"]):
        res = c.pxctl("node1", *cmd, check=False)
        assert res.returncode == 1 and "in use by 1 Docker container mount(s)" in res.stderr, \
            res.stderr
    assert is_mounted(path)
    assert ok(c, "node2", "VolumeDriver.Get", {"Name": "blk"})["Volume"]["Mountpoint"] == ""

    # a block volume is used on one node at a time, and is not removed while used
    err = call(c, "node2", "VolumeDriver.Mount", {"Name": "blk", "ID": "c"})["Err"]
    assert "attached on node node1" in err
    err = call(c, "node2", "VolumeDriver.Remove", {"Name": "blk"})["Err"]
    assert "in use" in err and "node1" in err
    assert c.pxctl("node2", "volume", "inspect", "blk")["attached_on"] == "node1"

    ok(c, "node1", "VolumeDriver.Unmount", {"Name": "blk", "ID": "b"})
    assert not is_mounted(path)
    assert c.pxctl("node2", "volume", "inspect", "blk")["attached_on"] is None
    ok(c, "node1", "VolumeDriver.Unmount", {"Name": "blk", "ID": "b"})          # again: harmless
    assert ok(c, "node1", "VolumeDriver.Path", {"Name": "blk"})["Mountpoint"] == ""

    path2 = ok(c, "node2", "VolumeDriver.Mount", {"Name": "blk", "ID": "c"})["Mountpoint"]
    with open(os.path.join(path2, "data")) as fh:
        assert fh.read() == "one"
    ok(c, "node2", "VolumeDriver.Unmount", {"Name": "blk", "ID": "c"})

    # a shared volume mounts on every node at once
    ok(c, "node1", "VolumeDriver.Create", {"Name": "sv", "Opts": {"shared": "true", "repl": "2"}})
    p1 = ok(c, "node1", "VolumeDriver.Mount", {"Name": "sv", "ID": "x"})["Mountpoint"]
    p2 = ok(c, "node2", "VolumeDriver.Mount", {"Name": "sv", "ID": "y"})["Mountpoint"]
    with open(os.path.join(p1, "hello"), "w") as fh:
        fh.write("from node1")
    with open(os.path.join(p2, "hello")) as fh:
        assert fh.read() == "from node1"
    assert {m["node"] for m in c.pxctl("node1", "volume", "inspect", "sv")["mounts"]} == {"node1", "node2"}
    res = c.pxctl("node1", "host", "unmount", "sv", "--path", p1, check=False)
    assert res.returncode == 1 and "Docker container" in res.stderr, res.stderr
    ok(c, "node1", "VolumeDriver.Unmount", {"Name": "sv", "ID": "x"})
    ok(c, "node2", "VolumeDriver.Unmount", {"Name": "sv", "ID": "y"})
    c.wait_for(lambda: c.pxctl("node1", "volume", "inspect", "sv")["mounts"] == [], what="sv unmounted")
    assert not is_mounted(p1) and not is_mounted(p2)
    ok(c, "node2", "VolumeDriver.Remove", {"Name": "sv"})
    ok(c, "node2", "VolumeDriver.Remove", {"Name": "blk"})
    assert names(c) == set()


def test_node_restart_remounts_and_failover_moves_the_volume(make_cluster):
    c = make_cluster(3)
    ok(c, "node1", "VolumeDriver.Create", {"Name": "db", "Opts": {"size": "1", "repl": "2"}})
    path = ok(c, "node1", "VolumeDriver.Mount", {"Name": "db", "ID": "ctr1"})["Mountpoint"]
    fd = os.open(os.path.join(path, "rows"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"committed\n")
    os.fsync(fd)
    os.close(fd)
    dfd = os.open(path, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)

    # SIGKILL and restart: the node mounts again what Docker still uses
    c.stop_node("node1", kill=True)
    c.start_node("node1")

    def remounted():
        with open(os.path.join(path, "rows")) as fh:
            return fh.read() == "committed\n"
    c.wait_for(lambda: os.path.ismount(path) and remounted(), timeout=30, what="mount restored")
    assert ok(c, "node1", "VolumeDriver.Path", {"Name": "db"})["Mountpoint"] == path
    assert "in use" in call(c, "node3", "VolumeDriver.Remove", {"Name": "db"})["Err"]

    # failover: node1 dies; once its lease is gone node2 mounts the volume
    c.stop_node("node1", kill=True)
    deadline = time.monotonic() + 30
    while True:
        out = call(c, "node2", "VolumeDriver.Mount", {"Name": "db", "ID": "ctr2"})
        if not out["Err"] or time.monotonic() > deadline:
            break
        assert "attached on node node1" in out["Err"]
        time.sleep(0.5)
    assert out["Err"] == ""
    with open(os.path.join(out["Mountpoint"], "rows")) as fh:
        assert fh.read() == "committed\n"

    # node1 returns: the volume is node2's now, so node1 forgets its old mount
    c.start_node("node1")
    c.wait_for(lambda: ok(c, "node1", "VolumeDriver.Get", {"Name": "db"})["Volume"]["Mountpoint"] == "",
               timeout=30, what="node1 forgets its docker mount")
    assert c.pxctl("node1", "volume", "inspect", "db")["attached_on"] == "node2"
    ok(c, "node1", "VolumeDriver.Unmount", {"Name": "db", "ID": "ctr1"})      # the old container stops
    assert c.pxctl("node1", "volume", "inspect", "db")["attached_on"] == "node2"
    ok(c, "node2", "VolumeDriver.Unmount", {"Name": "db", "ID": "ctr2"})
    ok(c, "node3", "VolumeDriver.Remove", {"Name": "db"})


def _mount_process(path: str) -> int:
    """The pid of the shared-volume mount process serving ``path``."""
    out = subprocess.run(["pgrep", "-f", f"pxfs.mount .* {path} "], capture_output=True,
                         text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


@pytest.mark.alone     # another worker's node start would unmount the dead mount
def test_a_node_restart_mounts_a_shared_volume_again_after_its_mount_process_died(make_cluster):
    """The node and its shared volume's mount process are killed (a host
    crash of pxfs): the dead FUSE mount is cleared at the restart and the
    plugin mounts the volume again where the containers have it."""
    c = make_cluster(2)
    ok(c, "node1", "VolumeDriver.Create", {"Name": "dsh", "Opts": {"shared": "true", "repl": "2"}})
    path = ok(c, "node2", "VolumeDriver.Mount", {"Name": "dsh", "ID": "ctr"})["Mountpoint"]
    with open(os.path.join(path, "f"), "w") as fh:
        fh.write("kept")
        fh.flush()
        os.fsync(fh.fileno())
    pid = _mount_process(path)
    c.stop_node("node2", kill=True)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(OSError):
        os.statvfs(path)                            # ENOTCONN: the mount is dead
    c.start_node("node2")

    def back():
        try:
            return open(os.path.join(path, "f")).read() == "kept"
        except OSError:
            return False
    c.wait_for(back, timeout=30, what="the shared mount restored")
    assert ok(c, "node2", "VolumeDriver.Path", {"Name": "dsh"})["Mountpoint"] == path
    ok(c, "node2", "VolumeDriver.Unmount", {"Name": "dsh", "ID": "ctr"})
    c.wait_for(lambda: not os.path.ismount(path), timeout=30, what="unmounted")
    # the killed mount process's record goes with its lease
    c.wait_for(lambda: call(c, "node1", "VolumeDriver.Remove", {"Name": "dsh"})["Err"] == "",
               timeout=30, what="dsh removed")
