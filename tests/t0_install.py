"""The install layout (pxfs_tools/install-deps.sh): pxfs lives in its own
venv; the commands on the system PATH and the top-level ./pxctl script run
there whatever python3 the caller has."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSPATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_commands_are_on_the_system_path():
    for cmd in ("pxctl", "pxfsd", "pxfs-cluster", "pxfs", "pxfs-fsck"):
        assert shutil.which(cmd, path=SYSPATH), \
            f"{cmd} is not on the system PATH (install-deps links it)"
    res = subprocess.run(["pxctl", "--help"], env={"PATH": SYSPATH}, capture_output=True,
                         text=True)
    assert res.returncode == 0 and "volume" in res.stdout, res.stderr


def test_top_level_pxctl_moves_to_the_venv_from_another_python():
    other = "/usr/bin/python3"
    if not os.path.exists(other) or os.path.realpath(sys.prefix) == "/usr":
        pytest.skip("no other python3 to start ./pxctl with")
    if subprocess.run([other, "-c", "import click, httpx"], capture_output=True).returncode == 0:
        pytest.skip(f"{other} has pxctl's packages itself: no venv switch to show")
    venv = sys.prefix     # the tests run in pxfs's venv (README's test command)
    res = subprocess.run([other, os.path.join(ROOT, "pxctl"), "--help"],
                         env=dict(os.environ, PXFS_VENV=venv), capture_output=True, text=True)
    assert res.returncode == 0 and "volume" in res.stdout, res.stderr
    # without a venv to move to, the import error stays (no silent success)
    res = subprocess.run([other, os.path.join(ROOT, "pxctl"), "--help"],
                         env=dict(os.environ, PXFS_VENV="/nonexistent"), capture_output=True,
                         text=True)
    assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr
