#!/usr/bin/env bash
# Install everything pxfs needs on Debian 12 (system packages + Python packages).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then echo "run as root (FUSE, loop devices and mounts need it)" >&2; exit 1; fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    etcd-server fuse3 libfuse3-dev pkg-config gcc python3-dev \
    e2fsprogs xfsprogs util-linux mount fio iproute2 procps >/dev/null
# Docker (the pxd volume plugin and its tests) and busybox-static (the tests' image)
if ! command -v dockerd >/dev/null; then
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# the packaged etcd starts a service on the default port; pxfs-cluster runs its own
systemctl disable --now etcd >/dev/null 2>&1 || true
# mount -t fuse.pxfs runs `pxfs` through mount.fuse3 with the system PATH
syspath=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if ! PATH=$syspath command -v pxfs >/dev/null; then
    scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    ln -sf "$scripts/pxfs" /usr/local/bin/pxfs
fi
echo "pxfs installed: $(command -v pxctl) $(command -v pxfsd) $(command -v pxfs-cluster)"
