#!/usr/bin/env python3
"""Block-volume benchmark: the same fio jobs on

  (a) ext4 on a loop device (--direct-io=on) over a sparse file on the local
      disk: the baseline;
  (p) the same over a sparse file in a bare pyfuse3 passthrough of a
      directory on the local disk (benchmarks/passthroughfs.py): what any
      Python FUSE filesystem on this machine pays before doing anything of
      its own, for scale;
  (b) ext4 on a pxfs volume with repl=1, mounted on node1 of a local 3-node
      cluster (``pxfs-cluster up``, image-file drives; ``--drives dir``:
      directories on the local disk's filesystem);
  (c) the same with repl=2.

Jobs (files inside each mounted filesystem, direct=1):

  seqwrite   1 MiB sequential write, libaio QD4, end_fsync=1, time  MiB/s
             based (first pass allocates, later passes overwrite)
  seqread    1 MiB sequential read of that file, one pass, libaio     MiB/s
             QD4 (caches dropped first)
  randwrite  4 KiB random write, psync, fsync after every write         IOPS
  randread   4 KiB random read, libaio QD16 (caches dropped first)      IOPS

Every job runs ``--rounds`` times (default 3) on each target (in the order
a, p, b, c), the targets one right after the other within a round: a figure is the median of its
rounds, a ratio the median of each round's ratio, so that a ratio compares
figures taken seconds apart (a small VM's speed drifts within minutes).

Usage::

    /opt/pxfs/bin/python benchmarks/block_fio.py [--size 1G] [--runtime 15] [--rounds 3] [--workdir DIR] [--json]

Needs root, fio, etcd, losetup, mkfs.ext4 and the pxfs console scripts
(``pxfs-cluster``, ``pxctl``).  Everything it creates is torn down at the end,
also on error and Ctrl-C: volumes unmounted, cluster stopped (``pxfs-cluster
down``), baseline unmounted and its loop device detached.

Before and after each pxfs target the script checks that every node is alive
and every replica in sync; if not, the figures are marked NOT VALID (a repl=2
volume with a dead peer silently runs as repl=1), the work directory with the
node logs is kept and the exit status is 1.  Per job it also records host CPU
and per-node pxfsd CPU (user+sys), fio latencies and fsync latencies (JSON).

``--profile DIR`` additionally samples pxfsd (node1 by default) with py-spy
while the write jobs run against (c), stores the collapsed stacks (.txt) and
flame graphs (.svg) there and prints a summary of where the time goes: per
thread role, the share of busy samples in FUSE dispatch, RPC, msgpack, thread
offload, crc32, pwrite, fsync..., and the hottest stacks.  Set PYTHONPATH to
benchmark another pxfs tree (the nodes inherit it).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import trio

from pxfs.chunk.loopdev import insist_write_back
from pxfs.volume.hostdev import write_journal

MiB = 1 << 20
GiB = 1 << 30

# --------------------------------------------------------------------------- jobs
JOBS = [
    {"key": "seqwrite", "label": "seq write 1M QD4 end_fsync", "unit": "MiB/s", "dir": "write",
     "args": ["--rw=write", "--bs=1M", "--ioengine=libaio", "--iodepth=4", "--direct=1",
              "--end_fsync=1"], "time_based": True, "drop_caches": False},
    {"key": "seqread", "label": "seq read 1M QD4", "unit": "MiB/s", "dir": "read",
     "args": ["--rw=read", "--bs=1M", "--ioengine=libaio", "--iodepth=4", "--direct=1"],
     "time_based": False, "drop_caches": True},
    {"key": "randwrite", "label": "rand write 4K fsync=1", "unit": "IOPS", "dir": "write",
     "args": ["--rw=randwrite", "--bs=4k", "--ioengine=psync", "--iodepth=1", "--direct=1",
              "--fsync=1"], "time_based": True, "drop_caches": False},
    {"key": "randread", "label": "rand read 4K QD16", "unit": "IOPS", "dir": "read",
     "args": ["--rw=randread", "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--direct=1"],
     "time_based": True, "drop_caches": True},
]
JOB_KEYS = [j["key"] for j in JOBS]
TARGETS = {"a": "ext4-loop (a)", "p": "passthrough (p)", "b": "pxfs repl=1 (b)",
           "c": "pxfs repl=2 (c)"}
ORDER = "apbc"
DATAFILE = "fio-bench.dat"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 1G)")
    mult = {"": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    n = int(float(m.group(1)) * mult)
    if n < 16 * MiB:
        raise argparse.ArgumentTypeError("size must be at least 16M")
    return n // MiB * MiB


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so that the cleanup runs."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


# --------------------------------------------------------------------------- helpers
def tool(name: str, module: str) -> list[str]:
    path = shutil.which(name)
    return [path] if path else [sys.executable, "-m", module]


PXCTL = tool("pxctl", "pxfs_tools.cli")
PXFS_CLUSTER = tool("pxfs-cluster", "pxfs_tools.cluster")


def run(argv: list[str], *, timeout: float = 120, check: bool = True, quiet: bool = False) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-1500:]}")
    if not quiet and res.returncode:
        log(f"  (ignored) {' '.join(argv)}: {(res.stderr or res.stdout).strip()[-300:]}")
    return res.stdout


def run_group(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run fio in its own process group; on timeout, error or interrupt stop
    the whole group (fio forks its job processes) before going on."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
        return p.returncode, err
    except BaseException:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the group may outlive its leader for a moment
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        raise


def pxctl(api: str, *args: str, timeout: float = 180, check: bool = True) -> str:
    return run([*PXCTL, "--host", api, *args], timeout=timeout, check=check)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def mounts_under(prefix: str) -> list[str]:
    prefix = prefix.rstrip("/") + "/"
    out = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            tgt = line.split()[1].encode().decode("unicode_escape")
            if tgt.startswith(prefix):
                out.append(tgt)
    return out


def loops_under(prefix: str) -> list[str]:
    prefix = prefix.rstrip("/") + "/"
    text = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True,
                          text=True).stdout
    out = []
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(prefix):
            out.append(parts[0])
    return out


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)        # idle + iowait
    return sum(f) - idle, sum(f)


def cpu_times(pid: int | None) -> tuple[float, float] | None:
    """(utime, stime) seconds of a process (all threads)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        hz = os.sysconf("SC_CLK_TCK")
        return int(f[11]) / hz, int(f[12]) / hz
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int | None) -> float | None:
    t = cpu_times(pid)
    return None if t is None else t[0] + t[1]


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = os.path.abspath(args.workdir)
        self.cluster_dir = os.path.join(self.workdir, "cluster")
        self.base_dir = os.path.join(self.workdir, "baseline")
        self.mnt = {t: os.path.join(self.workdir, "mnt", t) for t in ORDER}
        self.vol_gib = max(2, math.ceil(args.size * 1.25 / GiB) + 1)
        self.loopdev: str | None = None
        self.base_mounted = False
        self.cluster: dict | None = None
        self.cluster_started = False
        self.volumes: dict[str, str] = {}       # target -> volume name
        self.mounted: dict[str, str] = {}       # target -> mount path (pxfs)
        self.results: dict = {t: {} for t in ORDER}
        self.pt_dir = os.path.join(self.workdir, "passthrough")
        self.pt_proc: subprocess.Popen | None = None
        self.pt_loopdev: str | None = None
        self.pt_mounted = False
        self.info: dict = {}
        self.profiles: dict = {}
        self.anomalies: dict[str, list[str]] = {}
        self.t0 = time.monotonic()

    # -- setup ---------------------------------------------------------------
    def setup_baseline(self) -> None:
        os.makedirs(self.base_dir, exist_ok=True)
        img = os.path.join(self.base_dir, "disk.img")
        run(["truncate", "-s", f"{self.vol_gib}G", img])
        self.loopdev = self._ext4_on_loop(img, "a", "baseline")
        self.base_mounted = True

    def _ext4_on_loop(self, img: str, target: str, what: str) -> str:
        """A direct-I/O loop device over ``img``, formatted as pxfs formats
        its volumes and mounted at the target's mount point; the device."""
        dev = run(["losetup", "--find", "--show", "--direct-io=on", img]).strip()
        # a loop device left in "write through" mode drops flushes: the
        # baseline's fsyncs would be free (pxfs insists on the same for its own)
        insist_write_back(dev)
        log(f"({target}) {what}: {img} on {dev} (direct-io), {self.vol_gib} GiB")
        # the same mkfs options pxfs uses for its never-written volumes
        # (pxfs/volume/hostdev.py); a fresh sparse file reads as zeros too
        run(["mkfs.ext4", "-q", "-F", "-L", f"bench-{target}", "-E",
             "nodiscard,lazy_itable_init=1,assume_storage_prezeroed=1",
             *self.args.baseline_mkfs_opts.split(), dev], timeout=300)
        trio.run(write_journal, dev)      # as pxfs does after that mkfs
        os.makedirs(self.mnt[target], exist_ok=True)
        opts = ["-o", self.args.baseline_mount_opts] if self.args.baseline_mount_opts else []
        run(["mount", "-t", "ext4", *opts, dev, self.mnt[target]])
        return dev

    def setup_passthrough(self) -> None:
        """(p): the baseline's setup, with its image file in a bare pyfuse3
        passthrough mount (benchmarks/passthroughfs.py) of a directory on
        the local disk."""
        src, mnt = os.path.join(self.pt_dir, "src"), os.path.join(self.pt_dir, "fuse")
        os.makedirs(src, exist_ok=True)
        os.makedirs(mnt, exist_ok=True)
        run(["truncate", "-s", f"{self.vol_gib}G", os.path.join(src, "disk.img")])
        self.pt_proc = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "passthroughfs.py"), src, mnt],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.pt_dir, "log"), "w"))
        for _ in range(100):
            if os.path.ismount(mnt):
                break
            if self.pt_proc.poll() is not None:
                raise RuntimeError(f"passthroughfs.py exited ({self.pt_proc.returncode}); "
                                   f"see {self.pt_dir}/log")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"passthroughfs.py did not mount {mnt}")
        self.pt_loopdev = self._ext4_on_loop(os.path.join(mnt, "disk.img"), "p", "passthrough")
        self.pt_mounted = True

    def setup_cluster(self) -> None:
        os.makedirs(self.cluster_dir, exist_ok=True)
        log(f"starting a 3-node pxfs cluster in {self.cluster_dir}")
        self.cluster_started = True
        argv = [*PXFS_CLUSTER, "up", "--nodes", "3", "--workdir", self.cluster_dir]
        if self.args.drives == "dir":
            argv.append("--dir-drives")
        out = run(argv, timeout=180)
        self.cluster = json.loads(out.strip().splitlines()[-1])
        self.node1 = self.cluster["nodes"][0]
        self.api = self.node1["api"]
        for target, repl in (("b", 1), ("c", 2)):
            if target not in self.args.targets:
                continue
            name = f"bench-r{repl}"
            extra = []
            if self.args.placement == "local":
                extra = ["--nodes", ",".join(n["id"] for n in self.cluster["nodes"][:repl])]
            pxctl(self.api, "volume", "create", name, "--size", str(self.vol_gib), "--repl", str(repl),
                  *extra)
            self.volumes[target] = name
            os.makedirs(self.mnt[target], exist_ok=True)
            t = time.monotonic()
            pxctl(self.api, "host", "mount", name, "--path", self.mnt[target])
            self.mounted[target] = self.mnt[target]
            desc = json.loads(pxctl(self.api, "-j", "volume", "inspect", name))
            reps = [f"{r['node']}:{r['state']}" for r in desc["replicas"]]
            self.info[f"volume_{target}"] = {"name": name, "id": desc["id"], "repl": repl,
                                            "replicas": reps, "device": desc["device_path"],
                                            "data_local": desc.get("data_local")}
            log(f"({target}) volume {name} repl={repl} on {', '.join(reps)} -> {desc['device_path']},"
                f" mounted at {self.mnt[target]} in {time.monotonic() - t:.1f}s")

    def settle(self) -> None:
        """Let ext4's lazy inode-table init and the journal settle: wait until the
        pxfs volumes stop receiving writes (at most --settle seconds)."""
        if not self.volumes or self.args.settle <= 0:
            return
        deadline = time.monotonic() + self.args.settle
        last, quiet_since = None, time.monotonic()
        while time.monotonic() < deadline:
            cur = []
            for name in self.volumes.values():
                io = json.loads(pxctl(self.api, "-j", "volume", "inspect", name)).get("io") or {}
                cur.append(io.get("bytes_written", 0))
            if cur != last:
                last, quiet_since = cur, time.monotonic()
            elif time.monotonic() - quiet_since >= 3:
                return
            time.sleep(1)
        log("  volumes still receiving background writes; going on anyway")

    def health(self, target: str) -> list[str]:
        """What is wrong with the cluster as seen by this target's volume: dead
        nodes, replicas not in sync (a repl=2 volume would silently run as
        repl=1)."""
        problems = []
        if target not in self.volumes:
            return problems
        try:
            with open(os.path.join(self.cluster_dir, "cluster.json")) as fh:
                state = json.load(fh)
            for n in state["nodes"]:
                if not n.get("pid") or not _not_zombie(n["pid"]):
                    problems.append(f"{n['id']} is not running (see {n['log']})")
            desc = json.loads(pxctl(self.api, "-j", "volume", "inspect", self.volumes[target]))
            for r in desc["replicas"]:
                if r["state"] != "in_sync":
                    problems.append(f"replica on {r['node']} is {r['state']}")
        except Exception as exc:        # noqa: BLE001 - reported, not fatal
            problems.append(f"health check failed: {exc}")
        return problems

    # -- jobs ------------------------------------------------------------------
    def node_pids(self, with_etcd: bool = False) -> dict[str, int]:
        path = os.path.join(self.cluster_dir, "cluster.json")
        if not os.path.exists(path):
            return {}
        with open(path) as fh:
            state = json.load(fh)
        pids = {n["id"]: n["pid"] for n in state["nodes"] if n.get("pid")}
        if with_etcd and state.get("etcd_pid"):
            pids["etcd"] = state["etcd_pid"]
        return pids

    def budget_left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def fio(self, target: str, job: dict, size: int) -> dict:
        path = os.path.join(self.mnt[target], DATAFILE)
        out = os.path.join(self.workdir, f"fio-{target}-{job['key']}.json")
        argv = ["fio", f"--name={job['key']}", f"--filename={path}", f"--size={size}",
                f"--runtime={self.args.runtime}", "--group_reporting", "--numjobs=1",
                "--output-format=json", f"--output={out}", *job["args"]]
        if job["time_based"]:
            argv.append("--time_based")
        if job["drop_caches"]:
            drop_caches()
        pids = self.node_pids() if target in "bc" else {}
        cpu0 = {n: cpu_times(p) for n, p in pids.items()}
        host0 = host_cpu()
        prof = None
        if (self.args.profile and target == "c" and job["key"] in self.args.profile_jobs
                and not any(k.startswith(job["key"] + "-") for k in self.profiles)):
            prof = self.start_profile(job["key"], pids)
        t = time.monotonic()
        try:
            rc, err = run_group(argv, timeout=self.args.runtime * 3 + 120)
        finally:
            if prof:
                self.stop_profile(job["key"], prof)
        wall = time.monotonic() - t
        if rc:
            raise RuntimeError(f"fio {job['key']} on ({target}) failed: {err.strip()[-1500:]}")
        with open(out) as fh:
            text = fh.read()
        data = json.loads(text[text.index("{"):])       # fio may prefix warnings
        j = data["jobs"][0]
        d = j[job["dir"]]
        r = {"bw_mib_s": d["bw_bytes"] / MiB, "iops": d["iops"], "io_bytes": d["io_bytes"],
             "runtime_s": d["runtime"] / 1000, "wall_s": wall,
             "lat_ms": {"mean": d["lat_ns"]["mean"] / 1e6},
             "fio_cpu": {"usr": j["usr_cpu"], "sys": j["sys_cpu"]}}
        pct = d.get("clat_ns", {}).get("percentile") or {}
        for k, name in (("50.000000", "p50"), ("99.000000", "p99")):
            if k in pct:
                r["lat_ms"][name] = pct[k] / 1e6
        sync = j.get("sync") or {}
        if sync.get("total_ios"):
            r["fsync_lat_ms"] = {"mean": sync["lat_ns"]["mean"] / 1e6}
        host1 = host_cpu()
        r["host_cpu_busy_pct"] = round(100 * (host1[0] - host0[0]) / max(1, host1[1] - host0[1]), 1)
        if pids:
            r["node_cpu_pct"], r["node_cpu_sys_pct"] = {}, {}
            for n, p in pids.items():
                c1 = cpu_times(p)
                if c1 is not None and cpu0.get(n) is not None:
                    r["node_cpu_pct"][n] = round(100 * (sum(c1) - sum(cpu0[n])) / wall, 1)
                    r["node_cpu_sys_pct"][n] = round(100 * (c1[1] - cpu0[n][1]) / wall, 1)
        r["value"] = r["bw_mib_s"] if job["unit"] == "MiB/s" else r["iops"]
        return r

    def run_all(self) -> None:
        """Every job, round after round; within a round the targets run one
        right after the other, so that each ratio compares figures taken
        seconds apart (this machine's speed drifts by 10-20 % within minutes)."""
        targets = self.args.targets
        for t in targets:
            self._check(t, "before its jobs")
            path = os.path.join(self.mnt[t], DATAFILE)
            if os.path.exists(path):
                os.unlink(path)
        sizes = {t: self.args.size for t in targets}
        try:
            for job in JOBS:
                if job["key"] not in self.args.jobs:
                    continue
                for rnd in range(self.args.rounds):
                    for t in targets:
                        self._run_one(t, job, rnd, sizes)
        finally:
            for t in targets:
                self._check(t, "after its jobs")
        for t in targets:
            self.results[t]["effective_size"] = sizes[t]
            for job in JOBS:
                entry = self.results[t].get(job["key"])
                if entry and entry.get("rounds"):
                    entry["value"] = statistics.median(r["value"] for r in entry["rounds"])

    def _check(self, target: str, when: str) -> None:
        bad = self.health(target)
        if bad:
            self.anomalies.setdefault(target, []).extend(bad)
            log(f"  WARNING ({target}) {when}: {'; '.join(bad)}: its figures are not valid")

    def _run_one(self, target: str, job: dict, rnd: int, sizes: dict) -> None:
        entry = self.results[target].setdefault(job["key"], {"rounds": []})
        if self.budget_left() < self.args.runtime + 30:
            log(f"  time budget used up: skipping {job['key']} round {rnd + 1} on ({target})")
            entry["skipped"] = "time budget"
            return
        path = os.path.join(self.mnt[target], DATAFILE)
        if job["key"] != "seqwrite" and not os.path.exists(path):
            self.prepare_file(target, sizes[target])
        r = self.fio(target, job, sizes[target])
        r["round"] = rnd + 1
        entry["rounds"].append(r)
        extra = f"  host CPU {r['host_cpu_busy_pct']:.0f}%"
        if "node_cpu_pct" in r:
            extra += ", pxfsd " + " ".join(f"{n}={v:.0f}%" for n, v in r["node_cpu_pct"].items())
        log(f"  ({target}) {job['key']:9s} round {rnd + 1}: {r['value']:10.1f} {job['unit']:5s} "
            f"(p50 {r['lat_ms'].get('p50', float('nan')):.2f} ms, {r['runtime_s']:.1f}s){extra}")
        if job["key"] == "seqwrite" and r["io_bytes"] < sizes[target]:
            # the write hit --runtime: later jobs use only what was written
            # (the rest of the file is preallocated, reads of it would be free)
            sizes[target] = max(MiB, r["io_bytes"] // MiB * MiB)
            log(f"  seqwrite stopped at --runtime on ({target}); later jobs use the first "
                f"{sizes[target] // MiB} MiB")

    def prepare_file(self, target: str, size: int) -> None:
        path = os.path.join(self.mnt[target], DATAFILE)
        log(f"  laying out {size // MiB} MiB in {path}")
        rc, err = run_group(["fio", "--name=prep", f"--filename={path}", f"--size={size}",
                             "--rw=write", "--bs=1M", "--ioengine=libaio", "--iodepth=4",
                             "--direct=1", "--end_fsync=1", "--output-format=terse"],
                            timeout=max(60, self.budget_left()))
        if rc:
            raise RuntimeError(f"laying out {path} failed: {err.strip()[-1500:]}")

    # -- profiling (py-spy on node1 while jobs run against (c)) --------------
    def start_profile(self, key: str, pids: dict[str, int]):
        # on the PATH, or in pxfs's venv beside this Python (pip install py-spy)
        spy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=os.path.dirname(sys.executable))
        if spy is None:
            log("  py-spy not installed (pip install py-spy): not profiling")
            return None
        os.makedirs(self.args.profile, exist_ok=True)
        procs = []
        for node in self.args.profile_nodes:
            pid = pids.get(node)
            if not pid:
                continue
            base = os.path.join(self.args.profile, f"{key}-{node}")
            common = [spy, "record", "-p", str(pid), "-r", str(self.args.profile_rate), "-d",
                      str(self.args.runtime), "--nonblocking"]
            if self.args.profile_idle:
                common.append("--idle")
            # raw collapsed stacks (summarised below) and a flame graph to look at;
            # --nonblocking lets two samplers share the process and perturbs it less
            for argv, suffix in ((common + ["--threads", "-f", "raw", "-o", base + ".txt"], ".log"),
                                 (common + ["-f", "flamegraph", "-o", base + ".svg"], ".svg.log")):
                procs.append((node, base, subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                           stderr=open(base + suffix, "w")),
                              time.monotonic()))
        return procs

    def stop_profile(self, key: str, procs) -> None:
        started = procs[0][3] if procs else time.monotonic()
        for node, base, p, _t in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)      # the job ended early: py-spy writes out on SIGINT
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if os.path.exists(base + ".txt") and f"{key}-{node}" not in self.profiles:
                prof = summarize_profile(base + ".txt", self.args.profile_rate)
                prof["duration"] = time.monotonic() - started
                self.profiles[f"{key}-{node}"] = prof

    # -- teardown ----------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Undo everything; returns what could not be undone."""
        if self.cluster:
            for target in list(self.mounted):
                try:
                    pxctl(self.api, "host", "unmount", self.volumes[target], timeout=90, check=False)
                    pxctl(self.api, "host", "detach", self.volumes[target], timeout=90, check=False)
                except Exception as exc:       # noqa: BLE001 - cleanup goes on
                    log(f"  cleanup: {target}: {exc}")
                self.mounted.pop(target, None)
        node_pids = self.node_pids_safe()
        if self.cluster_started and os.path.exists(os.path.join(self.cluster_dir, "cluster.json")):
            try:
                log("stopping the cluster (pxfs-cluster down)")
                run([*PXFS_CLUSTER, "down", "--workdir", self.cluster_dir], timeout=180, check=False)
            except Exception as exc:           # noqa: BLE001
                log(f"  cleanup: pxfs-cluster down: {exc}")
        if self.pt_mounted:
            run(["umount", self.mnt["p"]], check=False, timeout=120)
            self.pt_mounted = False
        if self.pt_loopdev:
            run(["losetup", "-d", self.pt_loopdev], check=False, timeout=60)
            self.pt_loopdev = None
        if self.pt_proc is not None:
            run(["umount", os.path.join(self.pt_dir, "fuse")], check=False, timeout=60)
            try:
                self.pt_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.pt_proc.kill()
                self.pt_proc.wait()
            self.pt_proc = None
        if self.base_mounted:
            run(["umount", self.mnt["a"]], check=False, timeout=120)
            self.base_mounted = False
        if self.loopdev:
            run(["losetup", "-d", self.loopdev], check=False, timeout=60)
            self.loopdev = None
        # last resort: anything still mounted / attached under our work dir
        for _ in range(3):
            left = mounts_under(self.workdir)
            if not left:
                break
            for tgt in sorted(left, key=len, reverse=True):
                subprocess.run(["umount", "-l", tgt], capture_output=True)
        for dev in loops_under(self.workdir):
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        problems = [f"still mounted: {m}" for m in mounts_under(self.workdir)]
        problems += [f"loop device still attached: {d}" for d in loops_under(self.workdir)]
        for nid, pid in node_pids.items():
            if pid and cpu_seconds(pid) is not None and _not_zombie(pid):
                problems.append(f"{nid} (pid {pid}) still running")
        return problems

    def node_pids_safe(self) -> dict[str, int]:
        try:
            return self.node_pids(with_etcd=True)
        except (OSError, ValueError):
            return {}


# --------------------------------------------------------------------------- profiles
# Leaf frames that mean "waiting, not working" (py-spy's own idle detection
# misses these inside this VM): trio's epoll wait, an idle worker thread.
IDLE = re.compile(r"EpollIOManager\.get_events|WorkerThread\._work \(|Condition\.wait|"
                  r"_wait_once|_thread_cache\.py:1[56]\d\)$|queue\.py|SimpleQueue|Thread\._bootstrap|"
                  r"threading\.py:\d+\)$")
# Leaf-first: the first frame that matches a rule names the sample's category.
RULES = [
    ("msgpack", re.compile(r"msgpack/|pxfs/codec\.py")),
    ("RPC framing/sockets", re.compile(r"pxfs/rpc/|trio/_socket\.py|trio/_highlevel_socket\.py")),
    ("thread offload (to_thread)", re.compile(r"trio/_threads\.py|_thread_cache\.py|"
                                              r"_wakeup_socketpair\.py|_entry_queue\.py|outcome/")),
    ("FUSE dispatch (pyfuse3)", re.compile(r"pyfuse3|pxfs/fuse/")),
    ("replication/volume logic", re.compile(r"pxfs/replication/|pxfs/volume/")),
    ("chunk store (python)", re.compile(r"pxfs/chunk/")),
    ("etcd/grpc", re.compile(r"grpc/|etcd3/|pxfs/meta/")),
    ("trio scheduler", re.compile(r"trio/")),
]
_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


def _pkg_root() -> str:
    """Where the pxfs the nodes run comes from (PYTHONPATH may point elsewhere)."""
    import importlib.util
    spec = importlib.util.find_spec("pxfs")
    if spec and spec.origin:
        return os.path.dirname(os.path.dirname(spec.origin))
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_PKG_ROOT = _pkg_root()
_src_cache: dict[str, list[str]] = {}


def _source_line(file: str, line: int) -> str:
    if not file.startswith("pxfs/"):
        return ""
    if file not in _src_cache:
        try:
            with open(os.path.join(_PKG_ROOT, file)) as fh:
                _src_cache[file] = fh.read().splitlines()
        except OSError:
            _src_cache[file] = []
    lines = _src_cache[file]
    return lines[line - 1] if 0 < line <= len(lines) else ""


def _syscall(frame: str) -> str | None:
    """'fsync', 'pwrite', ... when a pxfs frame's source line makes that call."""
    m = _FRAME.match(frame)
    if not m:
        return None
    src = _source_line(m["file"], int(m["line"]))
    for word, cat in (("crc32", "crc32 (zlib)"), ("fdatasync", "fsync/fdatasync"),
                      ("fsync", "fsync/fdatasync"), ("pwrite", "pwrite"), ("pread", "pread"),
                      ("os.open", "open/close"), ("os.close", "open/close")):
        if word in src:
            return cat
    return None


def _category(frames: list[str]) -> str:
    sc = _syscall(frames[-1]) if frames else None
    if sc:
        return sc
    for f in reversed(frames):
        for name, rx in RULES:
            if rx.search(f):
                return name
    return "other"


def _role(thread: str, frames: list[str]) -> str:
    if "MainThread" in thread or any("trio/_core/_run.py" in f for f in frames):
        return "main (trio)"
    if any(re.search(r"grpc/|etcd3/|pxfs/meta/", f) for f in frames) or "grpc" in thread:
        return "other threads"
    return "workers"


def summarize_profile(path: str, rate: int = 100, top: int = 10) -> dict:
    """Summarise py-spy's collapsed stacks ('thread (tid): name;frame;...;leaf count'):
    per thread role, the share of busy samples per category, the hottest leaf
    frames and the hottest (trimmed) stacks."""
    roles: dict[str, dict] = {}
    with open(path) as fh:
        for line in fh:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            n = int(n)
            frames = stack.split(";")
            thread = frames.pop(0) if frames and frames[0].startswith(("thread", "process")) else ""
            role = _role(thread, frames)
            r = roles.setdefault(role, {"samples": 0, "idle": 0, "cats": collections.Counter(),
                                        "leaf": collections.Counter(),
                                        "stacks": collections.Counter()})
            r["samples"] += n
            if frames and IDLE.search(frames[-1]):
                r["idle"] += n
                continue
            r["cats"][_category(frames)] += n
            if frames:
                r["leaf"][frames[-1]] += n
            # trim the runner/bootstrap prefix: keep the last pxfs-relevant frames
            keep = [f for f in frames if not re.search(r"runpy|threading\.py|trio/_core/_run\.py|"
                                                       r"pxfs/node\.py|_ki\.py", f)]
            if not keep:
                keep = frames[-1:] or ["(no frames)"]
            r["stacks"][" <- ".join(re.sub(r" \((?:.*/)?([^/]+\.py):(\d+)\)$", r" \1:\2", f)
                                    for f in reversed(keep[-5:]))] += n
    out = {"file": path, "rate": rate, "roles": {}}
    for role, r in sorted(roles.items()):
        busy = r["samples"] - r["idle"]
        pct = (lambda c, b=busy: round(100 * c / b, 1) if b else 0.0)
        out["roles"][role] = {
            "samples": r["samples"], "busy_samples": busy,
            "categories_pct_of_busy": {k: pct(v) for k, v in r["cats"].most_common()},
            "top_leaf_pct_of_busy": [(f, pct(v)) for f, v in r["leaf"].most_common(top)],
            "top_stacks_pct_of_busy": [(f, pct(v)) for f, v in r["stacks"].most_common(top)]}
    return out


# --------------------------------------------------------------------------- report
def round_ratios(results: dict, target: str, key: str) -> list[float]:
    """target/a for each round that both completed."""
    mine = (results.get(target, {}).get(key) or {}).get("rounds") or []
    base = {r["round"]: r["value"] for r in (results.get("a", {}).get(key) or {}).get("rounds") or []}
    return [m["value"] / base[m["round"]] for m in mine if base.get(m["round"])]


def table(bench: Bench) -> str:
    res = bench.results
    shown = [t for t in "pbc" if t in bench.args.targets]
    head = ["job", "unit", TARGETS["a"]]
    for t in shown:
        head += [TARGETS[t], f"ratio {t}/a"]
    head.append("c/a per round")
    rows = [head]

    def val(t, k):
        r = res.get(t, {}).get(k)
        return r.get("value") if isinstance(r, dict) else None

    for job in JOBS:
        if job["key"] not in bench.args.jobs:
            continue
        fmt = (lambda v: "-" if v is None else f"{v:.1f}") if job["unit"] == "MiB/s" else \
              (lambda v: "-" if v is None else f"{v:.0f}")

        def ratio(t):
            rs = round_ratios(res, t, job["key"])
            return f"{statistics.median(rs):.2f}" if rs else "-"
        mark = (lambda t, txt: txt + " !" if bench.anomalies.get(t) and txt != "-" else txt)
        per_round = " ".join(f"{x:.2f}" for x in round_ratios(res, "c", job["key"])) or "-"
        row = [job["label"], job["unit"], mark("a", fmt(val("a", job["key"])))]
        for t in shown:
            row += [mark(t, fmt(val(t, job["key"]))), ratio(t)]
        rows.append(row + [per_round])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for t, probs in bench.anomalies.items():
        lines.append(f"! ({t}) NOT VALID: {'; '.join(probs)}")
    return "\n".join(lines)


def print_profiles(profiles: dict) -> None:
    for name, p in profiles.items():
        print(f"\npy-spy {name} ({p['file']}, {p.get('duration', 0):.0f}s at {p['rate']} Hz)")
        for role, r in p["roles"].items():
            if role == "other threads" or not r["busy_samples"]:
                continue
            busy = r["busy_samples"] / p["rate"] / max(p.get("duration") or 1, 1e-9)
            print(f"  {role}: busy {busy:.2f} thread-seconds per second ({r['busy_samples']} samples)")
            print("    " + ", ".join(f"{k} {v}%" for k, v in r["categories_pct_of_busy"].items()))
            for f, v in r["top_stacks_pct_of_busy"][:6]:
                print(f"    {v:5.1f}%  {f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"),
                    help="size of the fio data file per target (default 1G)")
    ap.add_argument("--runtime", type=int, default=15, help="seconds per fio job (default 15)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="run every job this many times on each target, the targets one right "
                         "after the other; figures are medians, ratios medians of each round's "
                         "ratio (default 3)")
    ap.add_argument("--workdir", default=None,
                    help="work directory on the local disk (default: a new /var/tmp/pxfs-bench-*)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument("--json-file", metavar="FILE", help="also write the JSON results to FILE")
    ap.add_argument("--targets", default=ORDER,
                    help=f"subset of a,p,b,c to run (default {ORDER}; the ratios need a)")
    ap.add_argument("--jobs", default=",".join(JOB_KEYS),
                    help=f"subset of {','.join(JOB_KEYS)} (default all)")
    ap.add_argument("--placement", choices=("local", "auto"), default="local",
                    help="local: pin the replicas to node1 (and node2 for repl=2), so that (b) "
                         "is local to the attaching node; auto: let pxfs place them (default local)")
    ap.add_argument("--drives", choices=("image", "dir"), default="image",
                    help="the nodes' drives: image (a sparse image file each, formatted XFS by "
                         "pxfs and mounted through a loop device, as the quickstart does; the "
                         "default) or dir (a plain directory on the local disk's filesystem: "
                         "no pool filesystem and loop device of its own, closer to a pool on a "
                         "raw device of its own; not the setup the targets are set for)")
    ap.add_argument("--settle", type=float, default=60,
                    help="wait up to this many seconds for the pxfs volumes to go quiet after "
                         "mkfs/mount (default 60)")
    ap.add_argument("--budget", type=float, default=1500,
                    help="skip remaining jobs once this many seconds have passed (default 1500)")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="py-spy record node1 while the write jobs run against (c); raw stacks in DIR")
    ap.add_argument("--profile-jobs", default="seqwrite,randwrite",
                    help="jobs to profile (default seqwrite,randwrite)")
    ap.add_argument("--profile-nodes", default="node1", help="nodes to sample, e.g. node1,node2")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--profile-idle", action="store_true", help="include idle threads (wall-clock view)")
    ap.add_argument("--baseline-mkfs-opts", default="",
                    help="extra mkfs.ext4 options for (a), to match a pxfs that formats differently "
                         "(e.g. '-J size=128'); by default (a) is formatted like pxfs/volume/hostdev.py")
    ap.add_argument("--baseline-mount-opts", default="", help="mount -o options for (a)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, fio output)")
    args = ap.parse_args(argv)
    args.targets = "".join(t for t in ORDER if t in args.targets)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.jobs = [k for k in JOB_KEYS if k in args.jobs.split(",")]
    args.profile_jobs = args.profile_jobs.split(",")
    args.profile_nodes = args.profile_nodes.split(",")
    if args.profile:
        args.profile = os.path.abspath(args.profile)
    if os.geteuid() != 0:
        ap.error("must run as root (loop devices, mounts, drop_caches)")
    for binary in ("fio", "losetup", "mkfs.ext4", "etcd"):
        if shutil.which(binary) is None:
            ap.error(f"{binary} is not installed")
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = tempfile.mkdtemp(prefix="pxfs-bench-", dir="/var/tmp")
    else:
        os.makedirs(args.workdir, exist_ok=True)

    bench = Bench(args)
    others = subprocess.run(["pgrep", "-f", "pxfs.node"], capture_output=True, text=True).stdout.split()
    rev = subprocess.run(["git", "-C", _PKG_ROOT, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    bench.info.update({"pxfs_source": _PKG_ROOT, "git": rev or None, "size": args.size,
                       "runtime": args.runtime, "volume_gib": bench.vol_gib,
                       "placement": args.placement, "drives": args.drives, "workdir": bench.workdir,
                       "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                       "other_pxfsd_running": len(others),
                       "jobs": {j["key"]: " ".join(j["args"]) + (" --time_based" if j["time_based"] else "")
                                for j in JOBS}})
    if others:
        log(f"note: {len(others)} other pxfsd processes are running on this machine: figures will be noisy")
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    ok = False
    problems: list[str] = []
    try:
        if "a" in args.targets:
            bench.setup_baseline()
        if "p" in args.targets:
            bench.setup_passthrough()
        if "b" in args.targets or "c" in args.targets:
            bench.setup_cluster()
            bench.settle()
        bench.info["loadavg_before_jobs"] = os.getloadavg()
        bench.run_all()
        ok = True
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({str(exc) or 'Ctrl-C'}): cleaning up")
    except Exception as exc:      # noqa: BLE001 - report, clean up, exit 1
        log(f"error: {exc}")
        if bench.cluster:
            for n in bench.cluster["nodes"]:
                log(f"  log of {n['id']}: {n['log']}")
    finally:
        # no interruptions while tearing down
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        try:
            problems = bench.cleanup()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for s, h in old.items():
                signal.signal(s, h)
        for p in problems:
            log(f"CLEANUP PROBLEM: {p}")
        if own_workdir and ok and not problems and not bench.anomalies and not args.keep:
            shutil.rmtree(bench.workdir, ignore_errors=True)
        elif not problems:
            for root, _dirs, files in os.walk(bench.workdir):   # drop the big sparse images
                for f in files:
                    if f.endswith(".img") and not args.keep:
                        os.unlink(os.path.join(root, f))
            log(f"work directory kept: {bench.workdir}")

    out = {"info": bench.info, "results": bench.results, "profiles": bench.profiles,
           "complete": ok, "cleanup_problems": problems, "anomalies": bench.anomalies,
           "ratios": {k: {f"{t}/a": statistics.median(rs) for t in "pbc"
                          if (rs := round_ratios(bench.results, t, k))} for k in args.jobs},
           "ratios_per_round": {k: {f"{t}/a": round_ratios(bench.results, t, k) for t in "pbc"}
                                for k in args.jobs}}
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump(out, fh, indent=2, default=str)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(f"\nfio on ext4, file {args.size // MiB} MiB, runtime {args.runtime}s, "
              f"volumes {bench.vol_gib} GiB, placement {args.placement}, drives {args.drives}")
        print(table(bench))
        if bench.profiles:
            print_profiles(bench.profiles)
    return 0 if ok and not problems and not bench.anomalies else 1


if __name__ == "__main__":
    sys.exit(main())
