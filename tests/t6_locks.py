"""Advisory locks on shared volumes end to end: `flock` and `fcntl` locks
taken through real mounts on different nodes exclude each other, wait,
report their holder, are interrupted by signals, go with the process that
closed or died, and with a mount that was killed."""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

from conftest import needs_mounts


pytestmark = needs_mounts


def py(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen, timeout: float = 30) -> str:
    """The child's next line of output; the child is killed if none comes."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    fut = pool.submit(proc.stdout.readline)
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        # not waiting for the reader: a child stuck in a lock request dies
        # only once the request is answered (the test's cleanup frees it)
        proc.kill()
        raise AssertionError(f"child said nothing for {timeout} s") from None
    finally:
        pool.shutdown(wait=False)


def wait_line(proc: subprocess.Popen, want: str, timeout: float = 30) -> None:
    """Read the child's stdout until the line ``want`` (it says where it is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = read_line(proc, max(0.1, deadline - time.monotonic()))
        if line.strip() == want:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"child did not say {want!r}: {proc.stderr.read()}")


def two_mounts(shared, vol: str, *files: str):
    """(cluster, m1, m2): shared volume ``vol`` mounted through node1 and
    node2, with empty ``files`` made on m1 and visible on m2."""
    c, mount = shared
    c.pxctl("node1", "volume", "create", vol, "--shared", "--size", "1", "--repl", "2")
    m1 = mount("node1", vol, os.path.join(c.workdir, vol + "1"))
    m2 = mount("node2", vol, os.path.join(c.workdir, vol + "2"))
    for f in files:
        open(f"{m1}/{f}", "w").close()
    c.wait_for(lambda: all(os.path.exists(f"{m2}/{f}") for f in files), timeout=10,
               what="files on node2")
    return c, m1, m2


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
if sys.argv[2] == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX, int(sys.argv[4]), int(sys.argv[3]))
print("held", flush=True)
time.sleep(600)
"""

TRY = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    if sys.argv[2] == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, int(sys.argv[4]), int(sys.argv[3]))
    print("got")
except BlockingIOError:
    print("busy")
"""


def try_lock(path: str, kind: str = "flock", start: int = 0, length: int = 0) -> str:
    r = py(TRY, path, kind, str(start), str(length))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_locks_hold_across_nodes(shared):
    c, m1, m2 = two_mounts(shared, "lk", "lockfile")

    # flock: one holder in the cluster; a blocked waiter on the other node
    # gets the lock once the holder's process ends (its files are closed)
    holder = spawn(HOLD, f"{m1}/lockfile", "flock")
    waiter = None
    try:
        wait_line(holder, "held")
        assert try_lock(f"{m2}/lockfile") == "busy"
        assert try_lock(f"{m1}/lockfile") == "busy"          # another open file, same node
        # a node's own mount of the volume (pxctl host mount, the Docker plugin's) too
        c.pxctl("node3", "host", "mount", "lk")
        pxns = os.path.join(c.nodes["node3"]["osd_root"], "pxns", "lk")
        try:
            assert try_lock(f"{pxns}/lockfile") == "busy"
        finally:
            c.pxctl("node3", "host", "unmount", "lk")
        waiter = spawn("""
            import fcntl, os, sys, time
            fd = os.open(sys.argv[1], os.O_RDWR)
            print("waiting", flush=True)
            t = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("got %.3f" % (time.monotonic() - t), flush=True)
            """, f"{m2}/lockfile")
        wait_line(waiter, "waiting")
        time.sleep(1.0)
        assert waiter.poll() is None, "the waiter got the lock while it was held"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        out, err = waiter.communicate(timeout=30)
        assert out.startswith("got"), err
        c.wait_for(lambda: try_lock(f"{m1}/lockfile") == "got", timeout=5,
                   what="lock free once the waiter exited")
    finally:
        holder.kill()
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.wait()

    # fcntl byte ranges: disjoint ranges on two nodes, an overlap refused,
    # F_GETLK on node2 names node1's lock
    holder = spawn(HOLD, f"{m1}/lockfile", "fcntl", "0", "100")
    try:
        wait_line(holder, "held")
        assert try_lock(f"{m2}/lockfile", "fcntl", 100, 100) == "got"
        assert try_lock(f"{m2}/lockfile", "fcntl", 99, 2) == "busy"
        assert try_lock(f"{m2}/lockfile", "flock") == "got"   # flock does not see fcntl locks
        r = py("""
            import fcntl, os, struct, sys
            fd = os.open(sys.argv[1], os.O_RDWR)
            fmt = "hhqqi"
            q = struct.pack(fmt, fcntl.F_RDLCK, os.SEEK_SET, 50, 10, 0)
            t, w, start, length, pid = struct.unpack(fmt, fcntl.fcntl(fd, fcntl.F_GETLK, q)[:struct.calcsize(fmt)])
            q = struct.pack(fmt, fcntl.F_RDLCK, os.SEEK_SET, 500, 10, 0)
            t2 = struct.unpack(fmt, fcntl.fcntl(fd, fcntl.F_GETLK, q)[:struct.calcsize(fmt)])[0]
            print(t == fcntl.F_WRLCK, start, length, t2 == fcntl.F_UNLCK)
            """, f"{m2}/lockfile")
        assert r.stdout.split() == ["True", "0", "100", "True"], r.stderr
    finally:
        holder.kill()
        holder.wait()
    c.wait_for(lambda: try_lock(f"{m2}/lockfile", "fcntl", 0, 100) == "got", timeout=5,
               what="range free after the holder died")

    # an open file description's own lock (F_OFD_SETLK) goes with its last close
    fmt = "hhqqi"
    fd = os.open(f"{m1}/lockfile", os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    dup = os.dup(fd)
    os.close(fd)
    assert try_lock(f"{m2}/lockfile", "fcntl", 0, 10) == "busy"     # still open through dup
    os.close(dup)
    c.wait_for(lambda: try_lock(f"{m2}/lockfile", "fcntl", 0, 10) == "got", timeout=5,
               what="OFD lock released at the last close")


def test_a_blocked_lock_is_interrupted_by_a_signal(shared):
    c, m1, m2 = two_mounts(shared, "li", "f")
    holder = spawn(HOLD, f"{m1}/f", "fcntl", "0", "0")
    # the interrupted process stays alive with the file open: a lock granted
    # behind its back would stay held by it
    waiter = spawn("""
        import fcntl, os, signal, sys, time
        class Alarm(Exception):
            pass
        def ring(*_):
            raise Alarm()
        signal.signal(signal.SIGALRM, ring)
        fd = os.open(sys.argv[1], os.O_RDWR)
        sys.stdin.readline()
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        t = time.monotonic()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            print("got", flush=True)
        except Alarm:
            print("interrupted %.2f" % (time.monotonic() - t), flush=True)
        time.sleep(600)
        """, f"{m2}/f")
    try:
        wait_line(holder, "held")
        waiter.stdin.write("go\n")
        waiter.stdin.flush()
        word, secs = read_line(waiter, 10).split()
        assert word == "interrupted" and float(secs) < 5, word
        holder.kill()
        holder.wait()
        c.wait_for(lambda: try_lock(f"{m1}/f", "fcntl", 0, 0) == "got", timeout=5,
                   what="lock free after the holder died")
        time.sleep(2.5)          # a wait that went on behind the interrupt would have won by now
        assert try_lock(f"{m1}/f", "fcntl", 0, 0) == "got"
    finally:
        holder.kill()
        waiter.kill()
        holder.wait()
        waiter.wait()


APPENDER = """
import fcntl, os, sys
lockfile, data, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lk = os.open(lockfile, os.O_RDWR)
for i in range(n):
    fcntl.flock(lk, fcntl.LOCK_EX)
    fd = os.open(data, os.O_RDWR)          # opened under the lock: close-to-open
    size = os.fstat(fd).st_size
    os.pwrite(fd, ("%s %04d\\n" % (tag, i)).encode() * 4, size)
    os.close(fd)
    fcntl.flock(lk, fcntl.LOCK_UN)
print("done", flush=True)
"""


def test_racing_appends_guarded_by_flock(shared):
    """Two writers on two nodes append records to one file, each one reading
    the size and writing after it under an flock: no record is lost or torn.
    (Without locks across nodes both read the same size and overwrite.)"""
    c, m1, m2 = two_mounts(shared, "la", "lock", "log")
    n = 40
    procs = [spawn(APPENDER, f"{m}/lock", f"{m}/log", tag, str(n))
             for m, tag in ((m1, "A"), (m2, "B"))]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "done", err
    text = open(f"{m2}/log").read()
    records = [text[i:i + 28] for i in range(0, len(text), 28)]
    assert len(text) == 2 * n * 28, f"{len(text)} bytes: records were overwritten"
    for rec in records:
        line = rec[:7]
        assert rec == line * 4, f"torn record {rec!r}"
    for tag in "AB":
        assert sorted(r[:7] for r in records if r.startswith(tag)) == \
            [f"{tag} {i:04d}\n" for i in range(n)]


def test_flock_tool_guards_shell_appends(shared):
    """What a build script does: `flock LOCKFILE -c 'echo ... >> LOG'` in a
    loop on two hosts.  Every line lands (without the lock, appends through
    two mounts overwrite each other)."""
    c, m1, m2 = two_mounts(shared, "lf", ".lock", "builds.log")
    loop = 'for i in $(seq 1 25); do flock "$1/.lock" -c "echo $2 $i >> $1/builds.log"; done'
    procs = [subprocess.Popen(["sh", "-c", loop, "sh", m, tag], stderr=subprocess.PIPE,
                              text=True) for m, tag in ((m1, "A"), (m2, "B"))]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    lines = open(f"{m2}/builds.log").read().splitlines()
    assert sorted(lines) == sorted(f"{t} {i}" for t in "AB" for i in range(1, 26)), lines


def test_locks_of_a_killed_mount_expire(shared):
    """SIGKILL of a mount's own process (the node's view of the volume dies
    with it): its locks go when its etcd lease expires."""
    c, m1, m2 = two_mounts(shared, "lx", "f")
    holder = spawn(HOLD, f"{m1}/f", "flock")
    try:
        wait_line(holder, "held")
        assert try_lock(f"{m2}/f") == "busy"
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", f"pxfs.mount lx {m1}"],
                                               capture_output=True, text=True).stdout.split()]
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        c.wait_for(lambda: try_lock(f"{m2}/f") == "got", timeout=30,
                   what="lock of the dead mount released")
        assert time.monotonic() - t0 < 20
    finally:
        holder.kill()
        holder.wait()
        subprocess.run(["umount", "-l", m1], capture_output=True)


LOG_WRITER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_APPEND)      # open the whole time
for i in range(int(sys.argv[3])):
    fcntl.lockf(fd, fcntl.LOCK_EX)
    size = os.fstat(fd).st_size
    seen = os.pread(fd, size, 0)
    assert len(seen) == size and seen.endswith(b"\\n") or not seen, seen[-40:]
    os.write(fd, b"%s %d\\n" % (sys.argv[2].encode(), i))
    fcntl.lockf(fd, fcntl.LOCK_UN)
os.close(fd)
"""


def test_long_lived_writers_take_turns_under_fcntl_locks(shared):
    """Two processes on two nodes keep one log open and append to it in turns
    under fcntl locks on it, as a database or a log shipper does: what one
    wrote under the lock is recorded before the unlock, and the other's open
    file takes the new size at its lock (as NFS does), so no line is lost
    and each sees whole lines."""
    c, m1, m2 = two_mounts(shared, "ll", "log")
    procs = [spawn(LOG_WRITER, f"{m}/log", tag, "30") for m, tag in ((m1, "A"), (m2, "B"))]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    lines = open(f"{m1}/log").read().splitlines()
    assert sorted(lines) == sorted(f"{t} {i}" for t in "AB" for i in range(30)), lines


def test_a_lock_shows_what_the_last_holder_wrote(shared):
    """A reader on another node keeps the file open and cached; after it
    takes the lock the holder just released, it reads the holder's new bytes
    in place, at once (not a second later)."""
    c, m1, m2 = two_mounts(shared, "lr", "db")
    with open(f"{m1}/db", "wb") as fh:
        fh.write(b"0" * 8192)
    c.wait_for(lambda: os.path.getsize(f"{m2}/db") == 8192, timeout=5, what="size on node2")
    rfd = os.open(f"{m2}/db", os.O_RDWR)
    wfd = os.open(f"{m1}/db", os.O_RDWR)
    try:
        assert os.pread(rfd, 8192, 0) == b"0" * 8192            # now in node2's page cache
        for i in range(1, 6):
            fcntl.lockf(wfd, fcntl.LOCK_EX)
            os.pwrite(wfd, str(i).encode() * 4096, 0)
            os.pwrite(wfd, str(i).encode() * 100, 8192)         # and it grows
            fcntl.lockf(wfd, fcntl.LOCK_UN)
            fcntl.lockf(rfd, fcntl.LOCK_SH)
            got = os.pread(rfd, 1 << 20, 0)
            fcntl.lockf(rfd, fcntl.LOCK_UN)
            assert got == str(i).encode() * 4096 + b"0" * 4096 + str(i).encode() * 100, (
                i, got[:8], len(got))
    finally:
        os.close(rfd)
        os.close(wfd)


def test_a_downgrade_shows_what_was_written(shared):
    """A writer that downgrades its lock to a shared one lets readers in:
    what it wrote under the exclusive lock is recorded first, so a reader on
    another node that gets the shared lock reads it (size included)."""
    c, m1, m2 = two_mounts(shared, "ld", "db")
    writer = spawn("""
        import fcntl, os, sys
        fd = os.open(sys.argv[1], os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"w" * 5000, 0)
        fcntl.lockf(fd, fcntl.LOCK_SH)                  # downgrade, keep the file open
        print("downgraded", flush=True)
        sys.stdin.readline()
        """, f"{m1}/db")
    try:
        wait_line(writer, "downgraded")
        fd = os.open(f"{m2}/db", os.O_RDONLY)
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH)
            assert os.pread(fd, 1 << 16, 0) == b"w" * 5000
        finally:
            os.close(fd)
    finally:
        writer.kill()
        writer.wait()
