#!/usr/bin/env python3
"""Shared-volume benchmark: the same workloads, in one run, on

  (a) a directory on the local ext4 disk: the baseline;
  (b) a bare pyfuse3 passthrough of such a directory (benchmarks/
      passthroughfs.py): the ceiling for a Python FUSE filesystem;
  (c) a pxfs shared volume with repl=2 on a local 3-node cluster
      (``pxfs-cluster up``, etcd with fsync on), mounted with
      ``mount -t fuse.pxfs``.

Workloads:

  create    create N empty files in one directory          files/s
  stat      stat them (after dropping caches)               files/s
  unlink    remove them                                     files/s
  untar     unpack a source tree of about M entries         s
  find      list the unpacked tree                          s
  readback  read every file of it (tar to a pipe)           s
  seqwrite  1 MiB sequential writes of S MiB, then fsync    MiB/s
  seqread   read that file back (caches dropped)            MiB/s
  lockpass  an exclusive flock passed between two processes ms (median, from the
            (on two nodes' mounts for (c)): from the holder's    holder's unlock
            unlock to the blocked waiter's return                to the waiter's grant)

Usage::

    /opt/pxfs/bin/python benchmarks/shared_meta.py [--files 10000] [--tree 10000] [--seq-mib 256] [--lock-rounds 40] [--json]

Needs root, etcd, fuse3 and the pxfs console scripts.  Everything it makes is
removed at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = {"a": "ext4 (a)", "b": "passthrough (b)", "c": "pxfs repl=2 (c)"}
JOBS = [("create", "files/s"), ("stat", "files/s"), ("unlink", "files/s"), ("untar", "s"),
        ("find", "s"), ("readback", "s"), ("seqwrite", "MiB/s"), ("seqread", "MiB/s"),
        ("lockpass", "ms")]
HIGHER_IS_BETTER = {"files/s", "MiB/s"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def make_tree(root: str, entries: int, seed: int = 7) -> int:
    """A source tree shaped like a large Python project: ~10 files per
    directory, a few levels deep, sizes skewed small."""
    rnd = random.Random(seed)
    n, dirs = 0, [root]
    os.makedirs(root)
    while n < entries:
        parent = rnd.choice(dirs[-50:])
        d = os.path.join(parent, f"pkg{n}")
        os.mkdir(d)
        dirs.append(d)
        n += 1
        for k in range(min(10, entries - n)):
            size = int(rnd.paretovariate(1.3) * 800) % 60000
            with open(os.path.join(d, f"mod{k}.py"), "wb") as fh:
                fh.write(rnd.randbytes(size))
            n += 1
    return n


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


LOCKER = '''
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
for cmd in sys.stdin:
    if cmd == "hold\\n":
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
    elif cmd == "wait\\n":
        print("waiting", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("got %.9f" % time.monotonic(), flush=True)
    elif cmd == "release\\n":
        t = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_UN)
        print("released %.9f" % t, flush=True)
'''


def lock_handoff(path1: str, path2: str, rounds: int) -> float:
    """Median ms from one process's unlock of an exclusive flock to the
    return of another process's blocked request for it (CLOCK_MONOTONIC is
    one clock for both); the two swap roles every round."""
    procs = [subprocess.Popen([sys.executable, "-c", LOCKER, p], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for p in (path1, path2)]

    def ask(p, cmd: str) -> str:
        p.stdin.write(cmd + "\n")
        p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"lock helper died at {cmd!r}")
        return line

    try:
        holder, waiter = procs
        ask(holder, "hold")
        times = []
        for _ in range(rounds):
            ask(waiter, "wait")
            time.sleep(0.05)                          # the waiter is blocked by now
            t0 = float(ask(holder, "release").split()[1])
            t1 = float(waiter.stdout.readline().split()[1])
            times.append((t1 - t0) * 1000)
            holder, waiter = waiter, holder
        return statistics.median(times)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_jobs(where: str, args, tarball: str, where2: str | None = None) -> dict:
    out = {}
    many = os.path.join(where, "many")
    os.mkdir(many)
    names = [os.path.join(many, f"f{i:05d}") for i in range(args.files)]

    def create():
        for p in names:
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    out["create"] = args.files / timed(create)
    drop_caches()
    out["stat"] = args.files / timed(lambda: [os.stat(p) for p in names])
    out["unlink"] = args.files / timed(lambda: [os.unlink(p) for p in names])
    tree = os.path.join(where, "tree")
    os.mkdir(tree)
    out["untar"] = timed(lambda: subprocess.run(["tar", "-C", tree, "-xf", tarball], check=True))
    drop_caches()
    out["find"] = timed(lambda: subprocess.run(["find", tree], check=True,
                                               stdout=subprocess.DEVNULL))
    drop_caches()
    out["readback"] = timed(lambda: subprocess.run(f"tar -C {tree} -cf - . | cat > /dev/null",
                                                   shell=True, check=True))
    big = os.path.join(where, "seq.dat")
    block = os.urandom(1 << 20)

    def seqwrite():
        with open(big, "wb") as fh:
            for _ in range(args.seq_mib):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
    out["seqwrite"] = args.seq_mib / timed(seqwrite)
    drop_caches()

    def seqread():
        with open(big, "rb", buffering=0) as fh:
            while fh.read(1 << 20):
                pass
    out["seqread"] = args.seq_mib / timed(seqread)
    out["lockpass"] = lock_handoff(os.path.join(where, "lockfile"),
                                   os.path.join(where2 or where, "lockfile"), args.lock_rounds)
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="pxfs-meta-", dir=args.workdir)
        self.cleanups = []

    def passthrough(self) -> str:
        src, mnt = os.path.join(self.workdir, "pt-src"), os.path.join(self.workdir, "pt")
        os.makedirs(src)
        os.makedirs(mnt)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "passthroughfs.py"), src, mnt])
        self.cleanups.append(lambda: (subprocess.run(["umount", mnt], capture_output=True),
                                      proc.wait(timeout=30)))
        for _ in range(100):
            if os.path.ismount(mnt):
                return mnt
            time.sleep(0.1)
        raise RuntimeError("passthrough did not mount")

    def pxfs(self) -> tuple[str, str]:
        """The volume mounted through node1, and through node2 as well (the
        second process of ``lockpass`` runs there)."""
        cdir = os.path.join(self.workdir, "cluster")
        res = subprocess.run([sys.executable, "-m", "pxfs_tools.cluster", "up", "--nodes", "3",
                              "--workdir", cdir], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
        self.cleanups.append(lambda: subprocess.run(
            [sys.executable, "-m", "pxfs_tools.cluster", "down", "--workdir", cdir], cwd=ROOT,
            capture_output=True, timeout=300))
        if res.returncode:
            raise RuntimeError(f"pxfs-cluster up failed: {res.stderr}")
        nodes = json.loads(res.stdout)["nodes"]
        api = nodes[0]["api"]
        size = max(4, 2 * self.args.seq_mib // 1024 + 4)
        subprocess.run([sys.executable, os.path.join(ROOT, "pxctl"), "--host", api, "volume",
                        "create", "benchns", "--shared", "--size", str(size), "--repl", "2"],
                       check=True, capture_output=True)
        mnts = []
        for i, node in enumerate(nodes[:2]):
            mnt = os.path.join(cdir, f"mnt{i + 1}")
            os.makedirs(mnt)
            subprocess.run(["mount", "-t", "fuse.pxfs", "benchns", mnt, "-o",
                            f"node={node['api']}"], check=True)
            self.cleanups.append(lambda m=mnt: subprocess.run(["umount", m],
                                                              capture_output=True))
            mnts.append(mnt)
        return mnts[0], mnts[1]

    def run(self) -> dict:
        src = os.path.join(self.workdir, "src")
        n = make_tree(src, self.args.tree)
        tarball = os.path.join(self.workdir, "tree.tar")
        with tarfile.open(tarball, "w") as tf:
            tf.add(src, arcname="src")
        log(f"source tree: {n} entries")
        results = {}
        for t in self.args.targets:
            where2 = None
            if t == "a":
                where = os.path.join(self.workdir, "ext4")
                os.makedirs(where)
            elif t == "b":
                where = self.passthrough()
            else:
                where, where2 = self.pxfs()
            log(f"{TARGETS[t]}: running in {where}")
            results[t] = run_jobs(where, self.args, tarball, where2)
            for k, v in results[t].items():
                log(f"  {k:9s} {v:10.2f}")
        return {"entries": n, "results": results}

    def close(self) -> None:
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:            # keep cleaning up
                log(f"cleanup: {exc}")
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def table(res: dict, targets: str) -> str:
    cols = ["job", "unit"]
    for t in targets:
        cols.append(TARGETS[t])
        if t != "a" and "a" in targets:
            cols.append(f"{t}/a")
    if "c" in targets and "b" in targets:
        cols.append("c/b")
    rows = []
    for job, unit in JOBS:
        row = [job, unit]
        for t in targets:
            v = res["results"][t][job]
            row.append(f"{v:.1f}" if v >= 10 else f"{v:.2f}")
            if t != "a" and "a" in targets:
                row.append(_ratio(v, res["results"]["a"][job], unit))
        if "c" in targets and "b" in targets:
            row.append(_ratio(res["results"]["c"][job], res["results"]["b"][job], unit))
        rows.append(row)
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: " | ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w)
                                for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cols), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def _ratio(v: float, base: float, unit: str) -> str:
    """As a fraction of the baseline's speed (times are inverted)."""
    if not base or not v:
        return "-"
    return f"{v / base:.2f}" if unit in HIGHER_IS_BETTER else f"{base / v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--tree", type=int, default=10000, help="entries in the source tree")
    ap.add_argument("--seq-mib", type=int, default=256)
    ap.add_argument("--lock-rounds", type=int, default=40, help="lock handoffs measured")
    ap.add_argument("--targets", default="abc")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (FUSE mounts, dropping caches)")
    bench = Bench(args)
    try:
        res = bench.run()
    finally:
        bench.close()
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"\n{res['entries']}-entry tree, {args.files} files, {args.seq_mib} MiB sequential; "
              "ratios are speed relative to the baseline (higher is better)")
        print(table(res, args.targets))


if __name__ == "__main__":
    main()
