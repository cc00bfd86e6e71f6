"""pxctl volume ha-update: one replica more (copied whole while the volume is
in use) or one fewer (its node drops the data), against real nodes and etcd."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

from t5_cluster import MiB, attach_after_failover, dd_read, dd_write, replica_states


def ha(c, node, vol, *args, check=True):
    return c.pxctl(node, "volume", "ha-update", vol, *args, check=check)


def chunk_dir(c, node, volid):
    drive = json.load(open(c.nodes[node]["config"]))["storage"]["devices"][0]
    return os.path.join(drive, "vols", str(volid))


def test_ha_update_adds_a_replica_while_in_use_then_drops_one(make_cluster):
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "hv", "--size", "256M", "--repl", "1", "--fs", "none",
            "--nodes", "node1")
    dev = c.pxctl("node1", "host", "attach", "hv")["device"]
    dd_write(dev, b"first-", 0, 96)
    out = ha(c, "node2", "hv", "--repl", "2", "--node", "node3")    # any node may ask
    assert (out["action"], out["node"]) == ("add", "node3")
    assert out["volume"]["ha"] == 2
    text = c.pxctl("node1", "volume", "inspect", "hv", as_json=False)
    assert "node3" in text
    dd_write(dev, b"during", 120, 16)              # the volume stays in use meanwhile
    c.wait_for(lambda: replica_states(c, "node1", "hv") == {"node1": "in_sync",
                                                             "node3": "in_sync"},
               timeout=90, what="node3 in sync")
    ins = c.pxctl("node1", "volume", "inspect", "hv")
    copied = sum(h["bytes"] for h in ins["resyncs"] if h["node"] == "node3")
    assert copied >= 96 * MiB, copied              # a whole copy, not only what changed
    assert [v["ha"] for v in c.pxctl("node1", "volume", "list") if v["name"] == "hv"] == [2]
    # the new replica alone holds everything
    c.stop_node("node1", kill=True)
    attach_after_failover(c, "node2", "hv", timeout=30)
    dev2 = c.pxctl("node2", "host", "attach", "hv")["device"]
    data = dd_read(dev2, 0, 136)
    first = (b"first-" * (MiB // 6 + 1))[:MiB]
    during = (b"during" * (MiB // 6 + 1))[:MiB]
    for i in range(136):
        want = first if i < 96 else bytes(MiB) if i < 120 else during
        assert data[i * MiB:(i + 1) * MiB] == want, f"MiB {i} differs"
    # one fewer: the dead node's replica goes (chosen first: offline); asked
    # of node3, the request goes on to node2, where the volume is attached
    # (and which alone stops writing to it)
    res = ha(c, "node3", "hv", "--repl", "1", "--node", "node3", check=False)
    assert res.returncode == 1 and "without an in-sync replica" in res.stderr, res.stderr
    out = ha(c, "node3", "hv", "--repl", "1")
    assert (out["action"], out["node"]) == ("remove", "node1")
    assert "hv: replica on node1 removed" in open(c.nodes["node2"]["log"]).read()
    assert [r["node"] for r in out["volume"]["replicas"]] == ["node3"]
    assert out["volume"]["status"] == "up"
    dd_write(dev2, b"after!", 0, 4)
    assert dd_read(dev2, 0, 4) == (b"after!" * (MiB // 6 + 1))[:MiB] * 4
    # node1 comes back: the chunks of the replica it lost go at its start
    volid = ins["id"]
    assert os.listdir(chunk_dir(c, "node1", volid))
    c.start_node("node1")
    assert not os.path.exists(chunk_dir(c, "node1", volid))
    assert replica_states(c, "node1", "hv") == {"node3": "in_sync"}


def test_ha_update_removes_a_detached_replica_and_its_data(make_cluster):
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "dv", "--size", "64M", "--repl", "2", "--fs", "none",
            "--nodes", "node1,node2")
    dev = c.pxctl("node1", "host", "attach", "dv")["device"]
    dd_write(dev, b"kept", 0, 8)
    c.pxctl("node1", "host", "detach", "dv")
    volid = c.pxctl("node1", "volume", "inspect", "dv")["id"]
    assert os.listdir(chunk_dir(c, "node2", volid))
    out = ha(c, "node3", "dv", "--repl", "1", "--node", "node2")
    assert (out["action"], out["node"]) == ("remove", "node2")
    assert not os.path.exists(chunk_dir(c, "node2", volid))      # dropped at once
    assert out["volume"]["ha"] == 1
    text = c.pxctl("node1", "volume", "ha-update", "dv", "--repl", "2", "--node", "node2",
                   as_json=False)
    assert text.startswith("Replication update started successfully"), text
    c.wait_for(lambda: replica_states(c, "node1", "dv") == {"node1": "in_sync",
                                                             "node2": "in_sync"},
               timeout=60, what="node2 in sync again")
    c.stop_node("node1", kill=True)
    attach_after_failover(c, "node3", "dv", timeout=30)
    dev3 = c.pxctl("node3", "host", "attach", "dv")["device"]
    assert dd_read(dev3, 0, 8) == (b"kept" * (8 * MiB // 4))


def test_ha_update_refuses_what_it_cannot_do_and_changes_nothing(make_cluster):
    c = make_cluster(3)
    c.pxctl("node1", "volume", "create", "rv", "--size", "64M", "--repl", "1", "--fs", "none",
            "--nodes", "node1")
    before = c.pxctl("node1", "volume", "inspect", "rv")
    cases = [
        (["--repl", "3"], 1, "one at a time"),
        (["--repl", "1"], 1, "already has 1 replica"),
        (["--repl", "4"], 1, "repl must be 1..3"),
        (["--repl", "0"], 1, "repl must be 1..3"),
        (["--repl", "2", "--node", "nosuch"], 1, "no node 'nosuch'"),
        (["--repl", "2", "--node", "node1"], 1, "already holds a replica"),
        (["--repl", "x"], 2, "not a whole number"),
        ([], 2, "is required"),
        (["--repl", "2", "--repl", "2"], 2, "give it once"),
    ]
    for args, rc, said in cases:
        res = ha(c, "node1", "rv", *args, check=False)
        assert res.returncode == rc and said in res.stderr, (args, res.returncode, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = ha(c, "node1", "nosuch", "--repl", "2", check=False)
    assert res.returncode == 1 and "not found" in res.stderr
    # the last in-sync replica cannot go; an offline node takes none
    c.pxctl("node1", "volume", "create", "two", "--size", "64M", "--repl", "2", "--fs", "none",
            "--nodes", "node1,node2")
    c.stop_node("node3")
    res = ha(c, "node1", "rv", "--repl", "2", "--node", "node3", check=False)
    assert res.returncode == 1 and "offline" in res.stderr, res.stderr
    c.stop_node("node2")
    res = ha(c, "node1", "two", "--repl", "1", "--node", "node1", check=False)
    assert res.returncode == 1 and "without an in-sync replica on an online node" in res.stderr
    assert c.pxctl("node1", "volume", "inspect", "rv")["replicas"] == before["replicas"]
    assert len(c.pxctl("node1", "volume", "inspect", "two")["replicas"]) == 2
    # REST bodies: wrong types and unknown fields
    for body, said in (({"repl": "2"}, "whole number"), ({"repl": True}, "whole number"),
                       ({"repl": 2, "node": 3}, "node must be a node id"),
                       ({"repl": 2, "zones": "a"}, "unknown field 'zones'"), ({}, "is required")):
        req = urllib.request.Request(f"{c.api('node1')}/v1/volumes/rv/ha", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError(f"{body} was taken")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400 and said in json.load(exc)["error"], (body, exc.code)
    assert c.pxctl("node1", "volume", "inspect", "rv")["replicas"] == before["replicas"]


def test_ha_update_of_a_shared_volume_waits_until_it_is_mounted_nowhere(shared):
    c, mount = shared
    c.pxctl("node1", "volume", "create", "sv", "--shared", "--size", "64M", "--repl", "1",
            "--nodes", "node1")
    m = mount("node1", "sv", os.path.join(c.workdir, "m"))
    with open(os.path.join(m, "f"), "wb") as fh:
        fh.write(b"shared!" * 100000)
        os.fsync(fh.fileno())
    res = ha(c, "node2", "sv", "--repl", "2", check=False)
    assert res.returncode == 1 and "mounted now" in res.stderr, res.stderr
    assert len(c.pxctl("node1", "volume", "inspect", "sv")["replicas"]) == 1
    subprocess.run(["umount", m], check=True)
    c.wait_for(lambda: not c.pxctl("node1", "volume", "inspect", "sv")["mounts"], timeout=30,
               what="the mount's record gone")
    ha(c, "node2", "sv", "--repl", "2", "--node", "node2")
    c.wait_for(lambda: replica_states(c, "node1", "sv") == {"node1": "in_sync",
                                                             "node2": "in_sync"},
               timeout=60, what="node2 in sync")
    c.stop_node("node1")
    m2 = mount("node3", "sv", os.path.join(c.workdir, "m2"))
    assert open(os.path.join(m2, "f"), "rb").read() == b"shared!" * 100000
