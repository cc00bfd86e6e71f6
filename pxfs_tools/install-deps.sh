#!/usr/bin/env bash
# Install everything pxfs needs on Debian 12 (system packages + Python packages).
#
# pxfs goes into its own virtual environment, $PXFS_VENV (default /opt/pxfs),
# made from Debian's python3: Debian 12 refuses pip installs into its system
# Python (PEP 668), and its build (PGO + LTO) runs pxfs's Python code about a
# quarter faster than a plain source build of the same version (README,
# "Benchmarks").  The commands are linked into /usr/local/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then echo "run as root (FUSE, loop devices and mounts need it)" >&2; exit 1; fi
VENV=${PXFS_VENV:-/opt/pxfs}
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    etcd-server fuse3 libfuse3-dev pkg-config gcc python3 python3-dev python3-venv \
    e2fsprogs xfsprogs util-linux mount fio iproute2 iptables procps >/dev/null
# Docker (the pxd volume plugin and its tests) and busybox-static (the tests' image)
if ! command -v dockerd >/dev/null; then
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
# the packaged etcd starts a service on the default port; pxfs-cluster runs its own
systemctl disable --now etcd >/dev/null 2>&1 || true
# on the system PATH: mount -t fuse.pxfs runs `pxfs` through mount.fuse3 with it
for cmd in pxfsd pxfs-cluster pxctl pxfs pxfs-fsck; do
    ln -sf "$VENV/bin/$cmd" "/usr/local/bin/$cmd"
done
echo "pxfs installed in $VENV: pxctl, pxfsd, pxfs-cluster, pxfs and pxfs-fsck in /usr/local/bin;"
echo "tests: $VENV/bin/python -m pytest -n 2 tests"
