"""Shared volumes end to end: real etcd, real nodes, `mount -t fuse.pxfs` on
several nodes, cross-node semantics, crashes and bad input."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import mounts_of, needs_mounts

pytestmark = needs_mounts
MiB = 1 << 20


def in_mount_table(path: str) -> bool:
    """(os.path.ismount is False for a dead FUSE mount: its lstat fails)"""
    with open("/proc/self/mounts") as fh:
        return any(line.split()[1] == path for line in fh)


def mount_pids(vol: str, path: str) -> list[int]:
    """The pids of the mount processes of ``vol`` (a regex: a host mount
    is given the volume's id) at ``path``."""
    res = subprocess.run(["pgrep", "-f", f"pxfs.mount {vol} {path}"], capture_output=True,
                         text=True)
    return [int(p) for p in res.stdout.split()]


def wait_unmounted(c, vol, timeout=20):
    c.wait_for(lambda: mounts_of(c, vol) == [], timeout=timeout, what=f"{vol} unmounted")


def test_two_nodes_share_one_tree(shared):
    c, mount = shared
    if shutil.which("pxfs", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") is None:
        pytest.fail("the pxfs mount program is not on the system PATH (install-deps links it)")
    c.pxctl("node1", "volume", "create", "ws", "--shared", "--size", "1", "--repl", "2")
    m1 = mount("node1", "ws", os.path.join(c.workdir, "m1"))
    m2 = mount("node2", "ws", os.path.join(c.workdir, "m2"))
    text = open("/proc/self/mounts").read()
    assert f"ws {m1} fuse.pxfs" in text and f"ws {m2} fuse.pxfs" in text
    data = os.urandom(3 * MiB + 123)
    with open(f"{m1}/file", "wb") as fh:           # close-to-open
        fh.write(data)
    with open(f"{m2}/file", "rb") as fh:
        assert fh.read() == data
    os.makedirs(f"{m2}/dir/sub")
    with open(f"{m2}/dir/sub/x", "w") as fh:
        fh.write("from node2")
    c.wait_for(lambda: os.path.exists(f"{m1}/dir/sub/x"), timeout=5, what="entry visible")
    assert open(f"{m1}/dir/sub/x").read() == "from node2"
    os.rename(f"{m1}/dir/sub/x", f"{m1}/dir/y")
    c.wait_for(lambda: sorted(os.listdir(f"{m2}/dir")) == ["sub", "y"], timeout=5,
               what="rename visible")
    os.link(f"{m1}/dir/y", f"{m1}/hard")
    os.symlink("dir/y", f"{m1}/sym")
    assert os.stat(f"{m2}/hard").st_nlink == 2
    assert open(f"{m2}/sym").read() == "from node2"
    st = os.statvfs(m1)
    assert st.f_blocks * st.f_frsize == 1 << 30
    assert (st.f_blocks - st.f_bfree) * st.f_frsize >= len(data)
    view = c.pxctl("node1", "volume", "list")
    row = next(v for v in view if v["name"] == "ws")
    assert row["shared"] and row["status_text"] == "up - mounted on node1, node2"
    res = c.pxctl("node1", "volume", "delete", "ws", check=False)
    assert res.returncode != 0 and "mounted" in res.stderr
    # both ways of unmounting work, and the mount processes go away
    subprocess.run(["umount", m1], check=True)
    subprocess.run(["fusermount3", "-u", m2], check=True)
    wait_unmounted(c, "ws")
    c.pxctl("node1", "volume", "delete", "ws")


def test_posix_errors_on_a_mount(shared):
    c, mount = shared
    c.pxctl("node1", "volume", "create", "pe", "--shared", "--size", "64M", "--repl", "2")
    c.pxctl("node1", "volume", "create", "pe2", "--shared", "--size", "64M", "--repl", "1")
    m = mount("node1", "pe", os.path.join(c.workdir, "m"))
    other = mount("node1", "pe2", os.path.join(c.workdir, "other"))

    def err(fn, *args):
        with pytest.raises(OSError) as e:
            fn(*args)
        return e.value.errno
    os.mkdir(f"{m}/d")
    open(f"{m}/d/f", "w").close()
    assert err(os.stat, f"{m}/nope") == errno.ENOENT
    assert err(os.mkdir, f"{m}/d") == errno.EEXIST
    assert err(os.rmdir, f"{m}/d") == errno.ENOTEMPTY
    assert err(os.unlink, f"{m}/d") == errno.EISDIR
    assert err(os.mkdir, f"{m}/d/f/x") == errno.ENOTDIR
    assert err(os.rename, f"{m}/d/f", f"{other}/f") == errno.EXDEV
    assert err(os.open, f"{m}/" + "n" * 256, os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert err(os.rename, f"{m}/d", f"{m}/d/inside") == errno.EINVAL
    assert err(os.setxattr, f"{m}/d/f", "user.big", b"x" * (64 * 1024 + 1)) in (errno.E2BIG,
                                                                                errno.ERANGE)
    os.setxattr(f"{m}/d/f", "user.k", b"v")
    assert os.getxattr(f"{m}/d/f", "user.k") == b"v"
    # no POSIX ACLs: cp -p and cp -a, which try to set a file's mode through a
    # minimal ACL first, fall back to chmod, and the modes arrive
    src = os.path.join(c.workdir, "src")
    os.makedirs(f"{src}/dir")
    with open(f"{src}/dir/run.sh", "w") as fh:
        fh.write("#!/bin/sh\n")
    os.chmod(f"{src}/dir/run.sh", 0o755)
    os.chmod(f"{src}/dir", 0o751)
    subprocess.run(["cp", "-a", f"{src}/dir", f"{m}/copied"], check=True)
    subprocess.run(["cp", "-p", f"{src}/dir/run.sh", f"{m}/run.sh"], check=True)
    assert stat.S_IMODE(os.stat(f"{m}/copied").st_mode) == 0o751
    assert stat.S_IMODE(os.stat(f"{m}/copied/run.sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(f"{m}/run.sh").st_mode) == 0o755
    assert err(os.setxattr, f"{m}/run.sh", "system.posix_acl_access", b"\2\0\0\0") \
        == errno.EOPNOTSUPP
    assert os.listxattr(f"{m}/run.sh") == []
    os.symlink("abcdefgh", f"{m}/sl")
    assert os.lstat(f"{m}/sl").st_size == 8 and os.readlink(f"{m}/sl") == "abcdefgh"
    # O_APPEND, truncate, sparse files
    with open(f"{m}/log", "ab") as fh:
        fh.write(b"one\n")
    with open(f"{m}/log", "ab") as fh:
        fh.write(b"two\n")
    assert open(f"{m}/log", "rb").read() == b"one\ntwo\n"
    with open(f"{m}/sparse", "wb") as fh:
        fh.seek(5 * MiB)
        fh.write(b"end")
    with open(f"{m}/sparse", "rb") as fh:
        assert fh.read(4096) == bytes(4096)
        fh.seek(5 * MiB)
        assert fh.read() == b"end"
    os.truncate(f"{m}/sparse", 10)
    os.truncate(f"{m}/sparse", 5 * MiB + 3)
    with open(f"{m}/sparse", "rb") as fh:
        fh.seek(5 * MiB)
        assert fh.read() == bytes(3)               # no stale bytes after shrink + grow
    # unlink of an open file: the data stays until the last close
    fh = open(f"{m}/open", "w+b")
    fh.write(b"still here")
    fh.flush()
    os.unlink(f"{m}/open")
    fh.seek(0)
    assert fh.read() == b"still here"
    fh.close()
    assert not os.path.exists(f"{m}/open")
    # permissions and ownership
    os.chmod(f"{m}/log", 0o600)
    os.chown(f"{m}/log", 1234, 5678)
    st = os.stat(f"{m}/log")
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 1234, 5678)
    os.utime(f"{m}/log", ns=(1_000_000_000_000_000_000, 1_500_000_000_000_000_000))
    assert os.stat(f"{m}/log").st_mtime_ns == 1_500_000_000_000_000_000
    # the volume is full: ENOSPC, and what was written before stays readable
    with pytest.raises(OSError) as e:
        with open(f"{m}/huge", "wb") as fh:
            for _ in range(80):
                fh.write(b"z" * MiB)
    assert e.value.errno == errno.ENOSPC
    assert open(f"{m}/log", "rb").read() == b"one\ntwo\n"


def test_racing_exclusive_creates_across_nodes(shared):
    """Two mounts on two nodes create the same 40 names with O_EXCL at the
    same time: every name has exactly one winner."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "race", "--shared", "--size", "1", "--repl", "2")
    m1 = mount("node1", "race", os.path.join(c.workdir, "r1"))
    m2 = mount("node2", "race", os.path.join(c.workdir, "r2"))
    prog = ("import os, sys\n"
            "won = []\n"
            "for i in range(40):\n"
            "    try:\n"
            "        fd = os.open(f'{sys.argv[1]}/n{i}', os.O_CREAT | os.O_EXCL | os.O_WRONLY)\n"
            "        os.write(fd, sys.argv[2].encode()); os.close(fd); won.append(i)\n"
            "    except FileExistsError:\n"
            "        pass\n"
            "print(' '.join(map(str, won)))\n")
    # in the root, and in a directory node1 made (and so holds: its creates
    # are made in memory until node2 recalls the directory)
    os.mkdir(f"{m1}/held")
    c.wait_for(lambda: os.path.isdir(f"{m2}/held"), what="held visible on node2")
    for sub in ("", "/held"):
        procs = [subprocess.Popen([sys.executable, "-c", prog, m + sub, tag],
                                  stdout=subprocess.PIPE, text=True)
                 for m, tag in ((m1, "A"), (m2, "B"))]
        won = [set(map(int, p.communicate(timeout=120)[0].split())) for p in procs]
        assert not (won[0] & won[1]), sub
        assert won[0] | won[1] == set(range(40)), sub
        for i in range(40):
            owner = "A" if i in won[0] else "B"
            assert open(f"{m1}{sub}/n{i}").read() == owner
            assert open(f"{m2}{sub}/n{i}").read() == owner


FILE_WRITER = r"""
import hashlib, os, sys
root, log = sys.argv[1], sys.argv[2]
lfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for i in range(100000):
    data = os.urandom(50_000 + (i % 50) * 1000)
    try:
        fd = os.open(f"{root}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(root, os.O_RDONLY)
        os.fsync(dfd)                      # its name too
        os.close(dfd)
    except OSError as exc:
        print("stopped:", exc, flush=True)
        break
    os.write(lfd, b"f%d %s\n" % (i, hashlib.sha256(data).hexdigest().encode()))
    os.fsync(lfd)
"""


def test_fsynced_files_survive_sigkill(shared):
    """A process writes and fsyncs file after file through a mount on
    node3; a replica node is SIGKILLed mid-stream, then the mount process
    itself while the writer still runs.  Every file whose fsyncs returned
    is intact afterwards, read through another node."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "dur", "--shared", "--size", "1", "--repl", "2",
            "--nodes", "node1,node2")
    m1 = mount("node3", "dur", os.path.join(c.workdir, "d1"))
    log = os.path.join(c.workdir, "dur.log")
    writer = subprocess.Popen([sys.executable, "-c", FILE_WRITER, m1, log],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def logged() -> int:
        return len(open(log).read().splitlines()) if os.path.exists(log) else 0
    try:
        c.wait_for(lambda: logged() >= 10, timeout=60, what="10 files written")
        c.signal("node2", signal.SIGKILL)              # a replica dies mid-stream
        n = logged()
        c.wait_for(lambda: logged() >= n + 10, timeout=60, what="10 more files, degraded")
        assert writer.poll() is None, writer.communicate()
        # the mount dies too, under the running writer, without unmounting
        pids = mount_pids("dur", m1)
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        out, err = writer.communicate(timeout=60)
        assert "stopped:" in out, (out, err)              # its next call failed
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        subprocess.run(["umount", "-l", m1], capture_output=True)
    synced = dict(line.split() for line in open(log).read().splitlines())
    assert len(synced) >= 20
    states = {r["node"]: r["state"] for r in c.pxctl("node1", "volume", "inspect", "dur")["replicas"]}
    assert states["node2"] in ("out_of_sync", "offline")
    m2 = mount("node1", "dur", os.path.join(c.workdir, "d2"))
    for name, digest in synced.items():
        with open(f"{m2}/{name}", "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == digest, name
    # the namespace is consistent: what a crash may leave is usage the killed
    # mount had not recorded yet, and the writer mark of the file it was
    # creating (cleared by the next open elsewhere, or here by fsck)
    subprocess.run(["umount", m2], check=True)
    wait_unmounted(c, "dur")
    code, res = fsck(c, "dur", "-n")
    assert all(p.startswith("usage records") or "still marked as being written by" in p
               for p in res["problems"]), res
    fsck(c, "dur")                                   # repaired
    assert fsck(c, "dur", "-n")[1]["problems"] == []


def _make_tree(root: str, files: int) -> None:
    """A source tree like a small project: nested packages of small files."""
    n = 0
    for a in range(10):
        for b in range(files // 100 + 1):
            d = os.path.join(root, f"pkg{a}", f"mod{b}")
            os.makedirs(d, exist_ok=True)
            for k in range(10):
                if n >= files:
                    return
                with open(os.path.join(d, f"f{k}.py"), "w") as fh:
                    fh.write(f"# file {n}\nVALUE = {n}\n" + "x = 1\n" * (n % 50))
                n += 1


def test_two_agents_share_a_workspace(shared, tmp_path):
    """Like two Jenkins agents: each unpacks a source tree into its own
    directory and builds in it while the other node lists and reads it."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "jenkins", "--shared", "--size", "2", "--repl", "2")
    m1 = mount("node1", "jenkins", os.path.join(c.workdir, "j1"))
    m2 = mount("node2", "jenkins", os.path.join(c.workdir, "j2"))
    src = tmp_path / "src"
    nfiles = 400
    _make_tree(str(src), nfiles)
    tarball = tmp_path / "src.tar"
    with tarfile.open(tarball, "w") as tf:
        tf.add(src, arcname="src")
    build = ("import compileall, sys; sys.exit(0 if compileall.compile_dir(sys.argv[1], quiet=1) "
             "else 1)")
    procs = []
    for m, agent in ((m1, "agent1"), (m2, "agent2")):
        os.makedirs(f"{m}/{agent}")
        procs.append(subprocess.Popen(
            ["sh", "-c", f"tar -C {m}/{agent} -xf {tarball} && {sys.executable} -c '{build}' "
                         f"{m}/{agent}/src"]))
    # meanwhile each node reads the other's workspace as it grows
    seen = 0
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        for m, other in ((m1, "agent2"), (m2, "agent1")):
            for dirpath, _, files in os.walk(f"{m}/{other}"):
                for f in files[:3]:
                    try:
                        open(os.path.join(dirpath, f), "rb").read()
                        seen += 1
                    except FileNotFoundError:
                        pass
        time.sleep(0.2)
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert seen > 0
    for m in (m1, m2):
        for agent in ("agent1", "agent2"):
            res = subprocess.run(["diff", "-r", "-x", "__pycache__", str(src), f"{m}/{agent}/src"],
                                 capture_output=True, text=True)
            assert res.returncode == 0, res.stdout[:2000]
            pyc = [f for _, _, fs in os.walk(f"{m}/{agent}/src") for f in fs if f.endswith(".pyc")]
            assert len(pyc) == nfiles


def test_pxctl_host_mount_of_a_shared_volume(shared):
    c, mount = shared
    c.pxctl("node1", "volume", "create", "hm", "--shared", "--size", "1", "--repl", "2")
    res = c.pxctl("node2", "host", "mount", "hm")
    path = os.path.join(c.nodes["node2"]["osd_root"], "pxns", "hm")
    assert res["mount"] == path and os.path.ismount(path)
    with open(f"{path}/hello", "w") as fh:
        fh.write("hi")
    other = os.path.join(c.workdir, "elsewhere")
    c.pxctl("node3", "host", "mount", "hm", "--path", other)
    assert open(f"{other}/hello").read() == "hi"
    res = c.pxctl("node1", "host", "attach", "hm", check=False)
    assert res.returncode != 0 and "shared" in res.stderr
    res = c.pxctl("node3", "host", "detach", "hm", check=False)
    assert res.returncode == 1 and "is shared: it has no block device" in res.stderr, res.stderr
    res = c.pxctl("node3", "host", "unmount", "hm", "--path", "/mnt/nope", check=False)
    assert res.returncode == 1 and f"mounted on this node at {other}, not at /mnt/nope" \
        in res.stderr, res.stderr
    # a user's own mount through node2 is not node2's to undo
    mine = mount("node2", "hm", os.path.join(c.workdir, "mine"))
    again = mount("node2", "hm", mine, check=False)         # FUSE would stack it
    assert again.returncode != 0 and "already a pxfs mount" in again.stderr, again.stderr
    assert [m["path"] for m in mounts_of(c, "hm")].count(mine) == 1
    c.pxctl("node2", "host", "unmount", "hm")
    assert os.path.ismount(mine) and open(f"{mine}/hello").read() == "hi"
    subprocess.run(["umount", mine], check=True)
    c.pxctl("node3", "host", "unmount", "hm")
    assert not os.path.ismount(path) and not os.path.ismount(other)
    # the default mount point goes with its mount; a path given stays
    assert not os.path.exists(path) and os.path.isdir(other)
    wait_unmounted(c, "hm")
    # the mount processes log under the node's data dir
    data_dir = json.load(open(c.nodes["node3"]["config"]))["data_dir"]
    log = open(os.path.join(data_dir, "mount-logs", "hm.log")).read()
    assert f" at {other} through node" in log, log


def test_bad_mount_input_changes_nothing(shared):
    c, mount = shared
    c.pxctl("node1", "volume", "create", "blk", "--size", "64M", "--repl", "1")
    c.pxctl("node1", "volume", "create", "sh", "--shared", "--size", "64M", "--repl", "1")
    path = os.path.join(c.workdir, "bad")
    for vol, opts, words in [("sh", ("bogus=1",), "unknown mount option"),
                             ("sh", ("log",), "unknown mount option"),
                             ("blk", (), "block volume"),
                             ("nosuch", (), "not found"),
                             ("../x", (), "'../x'")]:
        res = mount("node1", vol, path, *opts, check=False)
        assert res.returncode != 0, (vol, opts)
        assert words in res.stderr, res.stderr
        lines = res.stderr.strip().splitlines()        # one line, said once
        assert len(lines) == 1 and lines[0].count(words) == 1, res.stderr
        assert not os.path.ismount(path)
    res = subprocess.run(["mount", "-t", "fuse.pxfs", "sh", path + "-nope", "-o",
                          "node=" + c.api("node1")], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "does not exist" in res.stderr, res.stderr
    assert mounts_of(c, "sh") == []
    res = subprocess.run(["mount", "-t", "fuse.pxfs", "sh", path, "-o", "node=http://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "cannot reach" in res.stderr
    # read-only mounts refuse writes
    ro = mount("node1", "sh", path, "ro")
    with pytest.raises(OSError) as e:
        open(f"{ro}/x", "w")
    assert e.value.errno == errno.EROFS


def fsck(c, vol, *args):
    res = subprocess.run([sys.executable, "-m", "pxfs_tools.fsck", vol, "--host", c.api("node1"),
                          "-j", *args], capture_output=True, text=True, timeout=120)
    return res.returncode, (json.loads(res.stdout) if res.stdout.strip() else res.stderr)


def test_fsck_repairs_damage(shared):
    """Damage a shared volume's metadata and chunks behind pxfs's back; fsck
    reports each problem, repairs it, and a second run finds nothing."""
    import trio
    from pxfs.meta import keys
    from pxfs.meta.etcd import EtcdKV
    from pxfs.meta.kv import Delete, Put
    from pxfs.namespace.records import Inode, pack_ino
    from pxfs.rpc.client import Peer

    c, mount = shared
    c.pxctl("node1", "volume", "create", "fk", "--shared", "--size", "1", "--repl", "2",
            "--nodes", "node1,node2")
    m = mount("node1", "fk", os.path.join(c.workdir, "fk"))
    os.makedirs(f"{m}/dir")
    for name in ("a", "b", "dir/c"):
        with open(f"{m}/{name}", "wb") as fh:
            fh.write(os.urandom(2 * MiB))
    os.link(f"{m}/a", f"{m}/a2")
    inos = {n: os.stat(f"{m}/{n}").st_ino for n in ("a", "b", "dir", "dir/c")}
    subprocess.run(["umount", m], check=True)
    wait_unmounted(c, "fk")
    code, res = fsck(c, "fk", "-n")
    assert code == 0 and res["problems"] == [], res
    info = c.pxctl("node1", "volume", "inspect", "fk")
    volid = int(info["id"])
    cid = c.pxctl("node1", "status")["cluster_id"]
    host, port = c.info["etcd"].rsplit("//", 1)[1].rsplit(":", 1)

    async def damage():
        kv = EtcdKV([(host, int(port))])
        ik = lambda ino: keys.ns_inode_key(cid, volid, ino)
        a = Inode.unpack(inos["a"], (await kv.get(ik(inos["a"]))).value)
        a.nlink = 7                                            # wrong link count
        orphan = Inode(999_000, stat_reg(), nlink=0, size=10)   # unlinked, never closed
        lost = Inode(999_001, stat_reg(), nlink=1, size=0)      # reachable from nowhere
        await kv.txn([], [
            Put(ik(inos["a"]), a.pack()),
            Put(ik(orphan.ino), orphan.pack()), Put(ik(lost.ino), lost.pack()),
            Put(keys.ns_dentry_key(cid, volid, 1, b"dangling"), pack_ino(123_456)),
            # lock records of a file that is gone (another mount deleted it meanwhile)
            Put(keys.ns_lock_prefix(cid, volid, 777_777), b""),
            Put(keys.ns_lock_key(cid, volid, 777_777, "m.h.1"), b"\x90"),
            Delete(ik(inos["dir/c"]))])                        # c's entry now dangles
        data = {n["id"]: n["data"] for n in c.pxctl("node1", "status")["nodes"]}
        h2, p2 = data["node2"].rsplit(":", 1)
        # a chunk of no file on node2, and chunk 0 of b lost on node2
        await Peer(h2, int(p2)).call("write", vol=volid, idx=(888_888 << 24), off=0,
                                     data=b"s" * 4096, term=0, gen=1)
        await Peer(h2, int(p2)).call("drop_chunks", vol=volid, first=inos["b"] << 24, count=1,
                                     term=0)
        await kv.close()
    trio.run(damage)
    code, res = fsck(c, "fk", "-n")
    assert code == 4, res
    text = "\n".join(res["problems"])
    for words in ("points to missing inode 123456", "orphan inode 999000",
                  "unreachable inode 999001", f"inode {inos['a']}: link count 7, should be 2",
                  "lock records of missing inode 777777",
                  "chunk(s) that no file references", f"chunk {inos['b']}:0 missing on node2",
                  "usage records"):
        assert words in text, (words, text)
    code, res = fsck(c, "fk")
    assert code == 1, res
    code, res = fsck(c, "fk", "-n")
    assert code == 0 and res["problems"] == [], res
    m = mount("node2", "fk", os.path.join(c.workdir, "fk2"))
    assert sorted(os.listdir(m)) == ["a", "a2", "b", "dir", "lost+found"]
    assert os.listdir(f"{m}/lost+found") == ["#999001"]
    assert os.listdir(f"{m}/dir") == []
    assert os.stat(f"{m}/a").st_nlink == 2
    # b reads back whole from node2 alone (its lost chunk was copied back)
    digest = hashlib.sha256(open(f"{m}/b", "rb").read()).hexdigest()
    c.signal("node1", signal.SIGKILL)
    subprocess.run(["umount", m], check=True)
    m = mount("node2", "fk", os.path.join(c.workdir, "fk3"))
    assert hashlib.sha256(open(f"{m}/b", "rb").read()).hexdigest() == digest


def stat_reg():
    import stat
    return stat.S_IFREG | 0o644


def test_replica_resyncs_while_mounted(shared):
    """A replica node dies while a mount writes; it comes back and catches up
    while writes go on; then the other replica dies and every file reads
    back whole from the resynced one.  A file cut short while it was away
    (its chunks dropped) and extended again reads zeros there, not the
    bytes its old chunks held."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "rs", "--shared", "--size", "1", "--repl", "2",
            "--nodes", "node1,node2")
    m = mount("node3", "rs", os.path.join(c.workdir, "rs"))
    digests = {}

    def put(name, data):
        with open(f"{m}/{name}", "r+b" if os.path.exists(f"{m}/{name}") else "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with open(f"{m}/{name}", "rb") as fh:
            digests[name] = hashlib.sha256(fh.read()).hexdigest()
    for i in range(10):
        put(f"f{i}", os.urandom(300_000))
    put("cut", b"\xee" * (3 * MiB))
    c.signal("node2", signal.SIGKILL)
    os.truncate(f"{m}/cut", 1000)                   # its chunks 1 and 2 dropped on node1 only
    for i in range(10, 20):
        put(f"f{i}", os.urandom(200_000))
    for i in range(5):
        put(f"f{i}", b"overwritten while node2 was away")
    states = lambda: {r["node"]: r["state"] for r in
                      c.pxctl("node1", "volume", "inspect", "rs")["replicas"]}
    assert states()["node2"] in ("out_of_sync", "offline")
    c.start_node("node2")
    i = 20
    deadline = time.monotonic() + 90
    while states()["node2"] != "in_sync":             # writes go on during the resync
        assert time.monotonic() < deadline, states()
        put(f"f{i}", os.urandom(100_000))
        put("f0", os.urandom(50_000))
        i += 1
    for j in range(i, i + 5):
        put(f"f{j}", os.urandom(100_000))
    assert "while mounted" in open(c.nodes["node2"]["log"]).read()
    c.signal("node1", signal.SIGKILL)
    for name, digest in digests.items():
        if name != "cut":
            with open(f"{m}/{name}", "rb") as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == digest, name
    os.truncate(f"{m}/cut", 3 * MiB)                # read from node2's replica alone
    with open(f"{m}/cut", "rb") as fh:
        assert fh.read() == b"\xee" * 1000 + bytes(3 * MiB - 1000)


def test_a_file_cut_while_a_replica_was_away_reads_zeros_after_its_resync(shared):
    """A file is cut short while replica node2 is away (its chunks dropped
    on node1 only; they were written before, so they carry no new stamp)
    and the volume is unmounted; node2 comes back and resyncs.  With node1
    gone, the file extended again reads zeros past the cut from node2's
    replica, not the bytes its dropped chunks held."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "ct", "--shared", "--size", "1", "--repl", "2",
            "--nodes", "node1,node2")
    m = mount("node3", "ct", os.path.join(c.workdir, "ct"))
    with open(f"{m}/cut", "wb") as fh:
        fh.write(b"\xee" * (3 * MiB))
        fh.flush()
        os.fsync(fh.fileno())
    c.stop_node("node2", kill=True)
    os.truncate(f"{m}/cut", 1000)
    with open(f"{m}/after", "wb") as fh:          # node2's absence noticed for sure
        fh.write(b"a" * 4096)
        fh.flush()
        os.fsync(fh.fileno())
    states = lambda: {r["node"]: r["state"] for r in
                      c.pxctl("node1", "volume", "inspect", "ct")["replicas"]}
    assert states()["node2"] in ("out_of_sync", "offline")
    subprocess.run(["umount", m], check=True)
    wait_unmounted(c, "ct")
    c.start_node("node2")
    c.wait_for(lambda: states()["node2"] == "in_sync", timeout=60, what="node2 resynced")
    c.stop_node("node1", kill=True)
    m2 = mount("node3", "ct", os.path.join(c.workdir, "ct2"))
    assert os.path.getsize(f"{m2}/cut") == 1000
    os.truncate(f"{m2}/cut", 3 * MiB)
    with open(f"{m2}/cut", "rb") as fh:
        got = fh.read()
    assert got == b"\xee" * 1000 + bytes(3 * MiB - 1000), "old bytes came back past the cut"


def test_mount_that_lost_the_cluster_stops_writing(shared):
    """A mount frozen longer than its record may live (SIGSTOP: a partition
    as far as etcd can tell) no longer reads or writes data when it wakes up
    (ESTALE): a resync may have started without it.  A fresh mount works."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "fz", "--shared", "--size", "1", "--repl", "2")
    m = mount("node3", "fz", os.path.join(c.workdir, "fz"))
    with open(f"{m}/before", "wb") as fh:
        fh.write(b"written before")
    pids = mount_pids("fz", m)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(7)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    with pytest.raises(OSError) as e:
        with open(f"{m}/after", "wb") as fh:
            fh.write(b"must not land")
    assert e.value.errno in (errno.ESTALE, errno.EIO)
    with pytest.raises(OSError) as e:
        open(f"{m}/before", "rb").read()
    assert e.value.errno == errno.ESTALE
    # list and inspect say so; `pxctl host mount` of its path mounts it again
    c.wait_for(lambda: any(x["stale"] for x in mounts_of(c, "fz")), what="stale shown")
    ins = c.pxctl("node1", "volume", "inspect", "fz")
    assert f"stale, mount again: node3:{m}" in ins["status_text"], ins["status_text"]
    text = c.pxctl("node1", "volume", "inspect", "fz", as_json=False)
    assert "(stale: mount again)" in text, text
    c.pxctl("node3", "host", "mount", "fz", "--path", m)
    assert open(f"{m}/before", "rb").read() == b"written before"
    assert not any(x["stale"] for x in mounts_of(c, "fz"))
    assert len(mounts_of(c, "fz")) == 1
    m2 = mount("node2", "fz", os.path.join(c.workdir, "fz2"))
    assert open(f"{m2}/before", "rb").read() == b"written before"
    with open(f"{m2}/after", "wb") as fh:
        fh.write(b"fresh mount")
    assert open(f"{m2}/after", "rb").read() == b"fresh mount"


def test_close_to_open_while_records_are_batched(shared):
    """A file created on one mount is recorded after its close, in a batch;
    an open on another node right after the close still sees all of it."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "cto", "--shared", "--size", "1", "--repl", "2")
    m1 = mount("node1", "cto", os.path.join(c.workdir, "c1"))
    m2 = mount("node2", "cto", os.path.join(c.workdir, "c2"))
    os.mkdir(f"{m1}/d")
    c.wait_for(lambda: os.path.isdir(f"{m2}/d"), what="directory visible on node2")
    for i in range(150):
        data = os.urandom(100 + 37 * i)
        with open(f"{m1}/d/f{i}", "wb") as fh:
            fh.write(data)
        # the other node's kernel may not know the name yet: look it up until it does
        deadline = time.monotonic() + 5
        while True:
            try:
                fd = os.open(f"{m2}/d/f{i}", os.O_RDONLY)
                break
            except FileNotFoundError:
                assert time.monotonic() < deadline, f"f{i} never appeared on node2"
                time.sleep(0.01)
        with os.fdopen(fd, "rb") as fh:
            assert fh.read() == data, f"f{i}: node2 did not see what node1 closed"


def test_open_clears_the_mark_of_a_killed_writer(shared):
    """The mount that created a file is SIGKILLed before recording it: an
    open elsewhere clears its writer mark (once its mount record is gone)
    instead of waiting for ever, and pxfs-fsck finds no mark left over."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "wk", "--shared", "--size", "1", "--repl", "2")
    m1 = mount("node1", "wk", os.path.join(c.workdir, "w1"))
    m2 = mount("node2", "wk", os.path.join(c.workdir, "w2"))
    pids = mount_pids("wk", m1)
    assert pids
    fd = os.open(f"{m1}/lost", os.O_CREAT | os.O_WRONLY)    # created and marked in etcd
    os.write(fd, b"never recorded")
    os.kill(pids[0], signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.close(fd)
    subprocess.run(["umount", "-l", m1], capture_output=True)
    c.wait_for(lambda: os.path.exists(f"{m2}/lost"), what="the created name is visible")
    start = time.monotonic()
    with open(f"{m2}/lost", "rb") as fh:     # waits for the killed mount's record to expire
        fh.read()
    assert time.monotonic() - start < 30
    t = time.monotonic()
    with open(f"{m2}/lost", "rb") as fh:     # the mark is gone: no wait the second time
        fh.read()
    assert time.monotonic() - t < 1
    subprocess.run(["umount", m2], check=True)
    wait_unmounted(c, "wk")
    code, res = fsck(c, "wk", "-n")
    assert not any("being written" in p for p in res["problems"]), res


def test_delete_drops_the_record_of_a_killed_mount_at_once(shared):
    """A mount process killed leaves its record until its lease runs out:
    delete drops it (this host's pid is gone, nothing live at its path)
    instead of refusing, but still refuses while a live mount stands."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "kd", "--shared", "--size", "64M", "--repl", "1")
    m1 = mount("node1", "kd", os.path.join(c.workdir, "k1"))
    m2 = mount("node2", "kd", os.path.join(c.workdir, "k2"))
    pids = mount_pids("kd", m1)
    assert pids
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    try:
        c.wait_for(lambda: not os.path.exists(f"/proc/{pids[0]}"), timeout=5, what="pid gone")
        [row] = [v for v in c.pxctl("node3", "volume", "list") if v["name"] == "kd"]
        assert row["status_text"] == "up - mounted on node2", row
        res = c.pxctl("node3", "volume", "delete", "kd", check=False)
        assert res.returncode != 0 and f"node2:{m2}" in res.stderr and m1 not in res.stderr, \
            res.stderr
        subprocess.run(["umount", m2], check=True)
        wait_unmounted(c, "kd")                 # m2's process gone, and its record
        c.pxctl("node3", "volume", "delete", "kd")
        assert time.monotonic() - killed < 10, "too slow to tell a drop from an expiry"
        assert not in_mount_table(m1)           # its dead FUSE mount went too
    finally:
        subprocess.run(["umount", "-l", m1], capture_output=True)


@pytest.mark.alone     # another worker's node start would unmount the dead mount
def test_restart_unmounts_dead_shared_mounts_at_paths_of_their_own(shared):
    """The node and a shared volume's mount process (at a --path outside
    the osd root) are both killed: the node's next start unmounts the dead
    mount (it answered "Transport endpoint is not connected")."""
    c, _ = shared
    c.pxctl("node1", "volume", "create", "dm", "--shared", "--size", "64M", "--repl", "2")
    path = os.path.join(c.workdir, "own", "dm")
    assert c.pxctl("node1", "host", "mount", "dm", "--path", path)["mount"] == path
    pids = mount_pids("[0-9]+", path)
    assert pids
    try:
        c.stop_node("node1", kill=True)
        os.kill(pids[0], signal.SIGKILL)
        c.wait_for(lambda: not os.path.exists(f"/proc/{pids[0]}"), timeout=5, what="pid gone")
        with pytest.raises(OSError) as err:
            os.statvfs(path)
        assert err.value.errno == errno.ENOTCONN
        assert in_mount_table(path)
        c.start_node("node1")
        assert not in_mount_table(path)
        c.pxctl("node1", "host", "mount", "dm", "--path", path)     # and it mounts again
        assert in_mount_table(path)
        c.pxctl("node1", "host", "unmount", "dm", "--path", path)
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def test_stat_sees_deferred_attributes_while_they_are_recorded(shared):
    """fchmod/fchown on an open file are recorded with its size after the
    close; a stat() while that record is on its way to etcd must already
    show them (the model test caught a stale mode in that window)."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "attrs", "--shared", "--size", "1", "--repl", "2")
    m1 = mount("node1", "attrs", os.path.join(c.workdir, "a1"))
    stale = []
    for i in range(40):
        path = f"{m1}/f{i}"                 # in the root: not a held directory
        with open(path, "wb") as fh:
            fh.write(b"x" * (i + 1))
            os.fchmod(fh.fileno(), 0o4755)
        deadline = time.monotonic() + 0.15
        while time.monotonic() < deadline:   # spans the batch window and the commit
            mode = os.stat(path).st_mode & 0o7777
            if mode != 0o4755:
                stale.append((i, oct(mode)))
                break
    assert not stale, f"stat showed the mode from before fchmod: {stale[:5]}"


def test_appends_take_turns_across_mounts(shared):
    """`>>` on one mount right after a close on another lands after it, also
    while this mount's kernel still holds the file's old size (its name is
    cached for a second): an O_APPEND write goes to the end pxfs knows."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "app", "--shared", "--size", "1", "--repl", "2")
    m1 = mount("node1", "app", os.path.join(c.workdir, "a1"))
    m2 = mount("node2", "app", os.path.join(c.workdir, "a2"))
    open(f"{m1}/log", "w").close()
    c.wait_for(lambda: os.path.exists(f"{m2}/log"), what="log visible on node2")
    want = []
    for i in range(20):
        for m, tag in ((m1, "A"), (m2, "B")):
            line = f"{tag} {i}\n"
            fd = os.open(f"{m}/log", os.O_WRONLY | os.O_APPEND)
            try:
                assert os.write(fd, line.encode()) == len(line)
            finally:
                os.close(fd)
            want.append(line)
    for m in (m1, m2):
        assert open(f"{m}/log").read() == "".join(want), m
        assert os.stat(f"{m}/log").st_size == len("".join(want))


def test_only_appending_writes_append(shared):
    """Which writes go to the end is the file's O_APPEND flag as the kernel
    sends it with each write: a descriptor whose flag fcntl cleared writes
    where it is told, and pages of an O_APPEND file written through mmap go
    back where they belong (their write-back carries no O_APPEND)."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "apf", "--shared", "--size", "1", "--repl", "2")
    m1 = mount("node1", "apf", os.path.join(c.workdir, "p1"))
    m2 = mount("node2", "apf", os.path.join(c.workdir, "p2"))
    with open(f"{m1}/f", "wb") as fh:
        fh.write(b"a" * 8192)
    fd = os.open(f"{m1}/f", os.O_RDWR | os.O_APPEND)
    try:
        assert os.pwrite(fd, b"A", 0) == 1                   # O_APPEND: at the end
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)
        assert os.pwrite(fd, b"P", 10) == 1                  # cleared: where told
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        mm = mmap.mmap(fd, 8192)
        try:
            mm[20:21] = b"M"
            mm.flush()
        finally:
            mm.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    want = bytearray(b"a" * 8192 + b"A")
    want[10:11], want[20:21] = b"P", b"M"
    assert open(f"{m1}/f", "rb").read() == want
    assert open(f"{m2}/f", "rb").read() == want


def test_one_large_direct_append(shared):
    """An O_DIRECT append larger than one FUSE write reaches pxfs in pieces
    at once; each piece lands after the one before it."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "dap", "--shared", "--size", "1", "--repl", "2")
    m1 = mount("node1", "dap", os.path.join(c.workdir, "d1"))
    with open(f"{m1}/f", "wb") as fh:
        fh.write(b"h" * 4096)
    data = mmap.mmap(-1, 4 << 20)                            # page-aligned, for O_DIRECT
    for i in range(0, 4 << 20, 4096):
        data[i:i + 4096] = (b"%08d" % i) * 512
    fd = os.open(f"{m1}/f", os.O_WRONLY | os.O_APPEND | os.O_DIRECT)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)
    got = open(f"{m1}/f", "rb").read()
    assert got[:4096] == b"h" * 4096 and got[4096:] == bytes(data)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_rolling_restart_of_the_replicas_keeps_a_mount_that_did_not_fsync(shared, how):
    """A mount wrote without an fsync; then each replica's node restarts in
    turn (a rolling upgrade: clean stops, or crashes of the process while
    the host stays up).  Nothing the mount wrote can have been lost: the
    restarted processes answer under their old incarnation, the mount goes
    on, every replica stays in sync, and the data is whole."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", "rr", "--shared", "--size", "1", "--repl", "2",
            "--nodes", "node1,node2")
    m = mount("node3", "rr", os.path.join(c.workdir, "rr"))
    data = os.urandom(2 * MiB + 5)
    with open(f"{m}/f", "wb") as fh:
        fh.write(data)                              # no fsync
    for n in ("node1", "node2"):
        c.stop_node(n, kill=how == "kill")
        c.start_node(n)
        c.wait_for(lambda: all(r["state"] == "in_sync" for r in
                               c.pxctl("node3", "volume", "inspect", "rr")["replicas"]),
                   timeout=60, what=f"rr in sync after {n}'s restart")
    with open(f"{m}/g", "wb") as fh:
        fh.write(b"after the restarts")
        fh.flush()
        os.fsync(fh.fileno())
    assert open(f"{m}/f", "rb").read() == data
    assert all(r["state"] == "in_sync" for r in
               c.pxctl("node3", "volume", "inspect", "rr")["replicas"])
