"""The node daemon keeps freed I/O buffers for the next request
(pxfs.node._keep_io_buffers): a fresh 1 MiB buffer per FUSE write or
data-port payload must not be faulted in and zeroed again each time."""

import subprocess
import sys

import pytest

PROG = r"""
import collections, os, resource, sys
if sys.argv[1] == "on":
    from pxfs.node import _keep_io_buffers
    _keep_io_buffers()
src = os.urandom(1 << 20)
live = collections.deque()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(500):
    live.append(bytes(bytearray(src)))   # a new 1 MiB buffer, as pyfuse3 makes one
    if len(live) > i % 7:                # up to 6 in flight, freed oldest first
        while len(live) > i % 3:
            live.popleft()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 500)
"""


def faults_per_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROG, mode], capture_output=True, text=True,
                         check=True).stdout
    return float(out)


def test_io_buffers_are_reused_not_faulted_in_again():
    # without the setting, glibc (Debian 12's) maps and unmaps, or trims,
    # such buffers: about one fault per 4 KiB page, which the setting removes
    if faults_per_mib("off") < 64:
        pytest.skip("this C library reuses such buffers by itself: nothing to show")
    assert faults_per_mib("on") < 8
