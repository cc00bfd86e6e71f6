"""A Hypothesis state machine applies the same random operations to a pxfs
shared-volume mount and to a local ext4 directory, and after every step
compares the outcome (result or errno) and the whole trees."""

from __future__ import annotations

import collections
import errno
import os
import shutil
import stat
import subprocess

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from conftest import needs_mounts

pytestmark = needs_mounts

TOP, NESTED = ["a", "b", "c", "d"], ["d/a", "d/b", "d/e", "d/e/a"]
path_st = st.one_of(st.sampled_from(TOP), st.sampled_from(TOP), st.sampled_from(NESTED))
data_st = st.binary(min_size=0, max_size=9000)
XATTRS = ["user.one", "user.two"]
TALLY = collections.Counter()


def outcome(fn, *args):
    try:
        res = fn(*args)
        return ("ok", res)
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def snapshot(root: str) -> dict:
    """Everything a user can see of a tree, except times and inode numbers."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st_ = os.lstat(full)
            entry = {"mode": stat.S_IFMT(st_.st_mode), "perm": stat.S_IMODE(st_.st_mode),
                     "nlink": st_.st_nlink}
            if stat.S_ISREG(st_.st_mode):
                entry["size"] = st_.st_size
                with open(full, "rb") as fh:
                    entry["data"] = fh.read()
            elif stat.S_ISLNK(st_.st_mode):
                entry["target"] = os.readlink(full)
            if not stat.S_ISLNK(st_.st_mode):
                entry["xattrs"] = sorted((n, os.getxattr(full, n)) for n in os.listxattr(full)
                                         if n.startswith("user."))
            out[rel] = entry
    return out


def machine(pxfs_root: str, ref_root: str):
    class Fs(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            for root in (pxfs_root, ref_root):      # a fresh, empty tree per example
                for name in os.listdir(root):
                    full = os.path.join(root, name)
                    if os.path.isdir(full) and not os.path.islink(full):
                        shutil.rmtree(full)
                    else:
                        os.unlink(full)

        @initialize(a=data_st, b=data_st)
        def start(self, a, b):
            """Start from a populated tree: most operations then succeed."""
            for root in (pxfs_root, ref_root):
                os.mkdir(os.path.join(root, "d"))
                for name, data in (("a", a), ("d/b", b)):
                    with open(os.path.join(root, name), "wb") as fh:
                        fh.write(data)

        def both(self, fn, *rel_args, extra=()):
            a = outcome(fn, *[os.path.join(pxfs_root, p) for p in rel_args], *extra)
            b = outcome(fn, *[os.path.join(ref_root, p) for p in rel_args], *extra)
            assert a == b, f"{fn.__name__}{rel_args}{extra}: pxfs {a} != ext4 {b}"
            TALLY[a[0]] += 1

        @rule(p=path_st, data=data_st)
        def create(self, p, data):
            def write_file(path, data):
                with open(path, "wb") as fh:
                    fh.write(data)
            self.both(write_file, p, extra=(data,))

        @rule(p=path_st, off=st.integers(0, 20000), data=data_st)
        def write_at(self, p, off, data):
            def pwrite(path, off, data):
                fd = os.open(path, os.O_WRONLY)
                try:
                    return os.pwrite(fd, data, off)
                finally:
                    os.close(fd)
            self.both(pwrite, p, extra=(off, data))

        @rule(p=path_st, data=data_st)
        def append(self, p, data):
            def app(path, data):
                with open(path, "ab") as fh:
                    fh.write(data)
            self.both(app, p, extra=(data,))

        @rule(p=path_st, size=st.integers(0, 20000))
        def truncate(self, p, size):
            self.both(os.truncate, p, extra=(size,))

        @rule(p=path_st, small=st.integers(0, 6000), grow=st.integers(1, 9000))
        def shrink_then_grow(self, p, small, grow):
            """The classic stale-tail case: bytes cut off must read as zeros
            when the file grows again."""
            def resize(path, small, grow):
                os.truncate(path, small)
                os.truncate(path, small + grow)
            self.both(resize, p, extra=(small, grow))

        @rule(src=path_st, dst=path_st)
        def rename(self, src, dst):
            self.both(os.rename, src, dst)

        @rule(src=path_st, dst=path_st)
        def link(self, src, dst):
            self.both(os.link, src, dst)

        @rule(p=path_st)
        def unlink(self, p):
            self.both(os.unlink, p)

        @rule(p=path_st)
        def mkdir(self, p):
            self.both(os.mkdir, p)

        @rule(p=path_st)
        def rmdir(self, p):
            self.both(os.rmdir, p)

        @rule(p=path_st, mode=st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o4755]))
        def chmod(self, p, mode):
            self.both(os.chmod, p, extra=(mode,))

        @rule(dest=st.sampled_from(["a", "d/b", "../a", "nowhere", "d"]), p=path_st)
        def symlink(self, dest, p):
            def mk(path, dest):
                os.symlink(dest, path)
            self.both(mk, p, extra=(dest,))

        @rule(p=path_st, name=st.sampled_from(XATTRS), value=st.binary(max_size=100))
        def setxattr(self, p, name, value):
            self.both(os.setxattr, p, extra=(name, value))

        @rule(p=path_st, name=st.sampled_from(XATTRS))
        def removexattr(self, p, name):
            self.both(os.removexattr, p, extra=(name,))

        @rule(p=path_st)
        def read(self, p):
            def rd(path):
                with open(path, "rb") as fh:
                    return fh.read()
            self.both(rd, p)

        @rule(p=path_st)
        def listdir(self, p):
            self.both(lambda path: sorted(os.listdir(path)), p)

        def teardown(self):
            pass

        def check_trees(self):
            a, b = snapshot(pxfs_root), snapshot(ref_root)
            assert a.keys() == b.keys(), (sorted(a), sorted(b))
            for k in a:
                assert a[k] == b[k], (k, a[k], b[k])

    Fs.trees_match = invariant()(Fs.check_trees)     # compared after every step
    return Fs


def test_pxfs_behaves_like_ext4(make_cluster, tmp_path):
    if subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                      text=True).stdout.strip() != "ext2/ext3":
        pytest.skip("the reference directory must be on ext4")
    c = make_cluster(2)
    c.pxctl("node1", "volume", "create", "model", "--shared", "--size", "1", "--repl", "2")
    mnt = os.path.join(c.workdir, "model")
    os.makedirs(mnt)
    res = subprocess.run(["mount", "-t", "fuse.pxfs", "model", mnt, "-o",
                          f"node={c.api('node1')},default_permissions"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ref = tmp_path / "ref"
    ref.mkdir()
    try:
        run_state_machine_as_test(
            machine(mnt, str(ref)),
            settings=settings(max_examples=int(os.environ.get("PXFS_MODEL_EXAMPLES", 45)),
                              stateful_step_count=40, deadline=None,
                              suppress_health_check=list(HealthCheck)))
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
    print("operations:", dict(TALLY))
    assert TALLY["ok"] > 300         # the machine really exercised the filesystem
