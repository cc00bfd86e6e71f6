#!/usr/bin/env bash
# One command: install pxfs, start a local 3-node cluster (etcd + 3 nodes on
# loopback, sparse-file drives) under $PXFS_DEMO (default /var/tmp/pxfs-demo),
# create a volume with --repl 2, attach and mount it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash pxfs_tools/install-deps.sh
DEMO=${PXFS_DEMO:-/var/tmp/pxfs-demo}
if [ -f "$DEMO/cluster.json" ]; then pxfs-cluster down --workdir "$DEMO" || true; fi
rm -rf "$DEMO"
info=$(pxfs-cluster up --nodes 3 --workdir "$DEMO")
api1=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["nodes"][0]["api"])' "$info")
api2=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["nodes"][1]["api"])' "$info")
export PXCTL_HOST=$api1
# replicas on node1, where it is mounted, and node2, which takes over below
pxctl volume create demovol --size 2 --repl 2 --nodes node1,node2 --label app=demo
pxctl host attach demovol
pxctl host mount demovol --path "$DEMO/mnt/demovol"
echo
pxctl status
echo
pxctl volume list
cat <<MSG

pxfs is running: 3 nodes under $DEMO (logs: $DEMO/node*/pxfsd.log).
The volume 'demovol' (2 GiB, replicas on node1 and node2) is mounted at $DEMO/mnt/demovol.

Try:
  export PXCTL_HOST=$api1
  pxctl volume inspect demovol
  echo hello > $DEMO/mnt/demovol/hello && sync
  pxctl --host $api2 volume list          # any node has the same view
  pxfs-cluster stop-node node1 --workdir $DEMO --kill    # node1 dies...
  sleep 6                                                  # its lease (5 s) runs out
  pxctl --host $api2 host attach demovol                   # ...node2 takes over
  umount -l $DEMO/mnt/demovol                              # node1's mount died with it
  pxctl --host $api2 host mount demovol --path $DEMO/mnt/demovol   # same data, via node2
A shared volume, mounted through two nodes:
  pxctl volume create ws --shared --size 1 --repl 2
  mkdir -p $DEMO/ws1 $DEMO/ws2
  mount -t fuse.pxfs ws $DEMO/ws1 -o node=$api1
  mount -t fuse.pxfs ws $DEMO/ws2 -o node=$api2
From Docker (driver pxd), with your dockerd pointed at node1's plugin socket:
  mkdir -p /etc/docker/plugins
  echo unix://$DEMO/node1/docker/pxd.sock > /etc/docker/plugins/pxd.spec
  docker volume create -d pxd --name dbvol --opt size=1 --opt repl=2
Stop everything with:  pxfs-cluster down --workdir $DEMO
MSG
