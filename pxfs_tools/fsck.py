"""pxfs-fsck: check and repair a shared volume.

    pxfs-fsck VOLUME [--host URL] [-n] [-j]

Reads the whole namespace from etcd and the chunk lists of every replica,
then checks, in order:

  * entries whose inode is missing (removed);
  * inodes no entry reaches: unlinked-while-open files whose node died
    (``nlink`` 0 or listed as orphans) are deleted with their data; others
    are linked into ``/lost+found``;
  * link counts (files: number of entries; directories: 2 + subdirectories)
    and directories' parent pointers;
  * chunks no file references (no such inode, or past the end of its file):
    dropped on every replica;
  * chunks present on some replicas of a file and missing on others: copied
    from a replica that has them;
  * the usage records statfs sums: recomputed.

Repairs need the volume unmounted everywhere (a mount changes what fsck
reads); ``-n`` only reports.  Exit status as e2fsck's: 0 clean, 1 errors
corrected, 4 errors left uncorrected, 8 operational error.
"""

from __future__ import annotations

import collections
import json
import stat
import sys
import time

import click
import trio

from pxfs import CHUNK_SIZE, codec
from pxfs.config import parse_kvdb_url
from pxfs.errors import PxfsError
from pxfs.meta import keys
from pxfs.meta.etcd import EtcdKV
from pxfs.meta.kv import Delete, Put
from pxfs.meta.lease import list_nodes
from pxfs.namespace.records import ROOT_INO, Inode, pack_ino, unpack_ino
from pxfs.namespace.shared import CHUNK_BITS
from pxfs.replication.targets import RemoteReplica
from pxfs.rpc.client import PeerBook

from .client import ApiError, Client

LOST = b"lost+found"


class Fsck:
    def __init__(self, kv, cid: str, rec: dict, repair: bool, quiet: bool = False):
        self.kv, self.cid, self.rec, self.repair, self.quiet = kv, cid, rec, repair, quiet
        self.volid = rec["id"]
        self.found: list[str] = []
        self.fixed = 0
        self.peers: dict[str, RemoteReplica] = {}

    def note(self, what: str) -> None:
        self.found.append(what)
        if not self.quiet:
            print(("fixed: " if self.repair else "found: ") + what, flush=True)

    async def _apply(self, ops) -> None:
        if self.repair and ops:
            for i in range(0, len(ops), 64):          # etcd's default txn op limit is 128
                await self.kv.txn([], ops[i:i + 64])
            self.fixed += 1

    # -- load ----------------------------------------------------------------------
    async def load(self) -> None:
        p = keys.ns_prefix(self.cid, self.volid)
        self.inodes: dict[int, Inode] = {}
        self.entries: list[tuple[int, bytes, int, str]] = []    # parent, name, child, key
        self.orphans: set[int] = set()
        self.xattr_inos: collections.defaultdict[int, list[str]] = collections.defaultdict(list)
        self.lock_inos: collections.defaultdict[int, list[str]] = collections.defaultdict(list)
        for it in await self.kv.range(p):
            rest = it.key[len(p):]
            kind, _, tail = rest.partition("/")
            if kind == "i":
                ino = int(tail, 16)
                self.inodes[ino] = Inode.unpack(ino, it.value, it.mod_rev)
            elif kind == "d":
                parent, _, name = tail.partition("/")
                self.entries.append((int(parent, 16), keys.decode_name(name), unpack_ino(it.value),
                                     it.key))
            elif kind == "orphan":
                self.orphans.add(int(tail, 16))
            elif kind == "x":
                self.xattr_inos[int(tail.partition("/")[0], 16)].append(it.key)
            elif kind == "l":
                self.lock_inos[int(tail.partition("/")[0], 16)].append(it.key)
        book = PeerBook()
        book.learn(await list_nodes(self.kv, self.cid))
        self.peers = {n: RemoteReplica(n, book.known(n)) for n in book.addrs}
        self.chunks: dict[str, dict[int, int]] = {}
        for r in self.rec["replicas"]:
            if r["state"] != "in_sync" or r["node"] not in self.peers:
                continue
            try:
                self.chunks[r["node"]] = await self.peers[r["node"]].list_chunks(self.volid, 0)
            except PxfsError as exc:
                print(f"warning: replica on {r['node']} not checked: {exc}", file=sys.stderr,
                      flush=True)

    # -- checks --------------------------------------------------------------------
    async def check_entries(self) -> None:
        ops = []
        kept = []
        for parent, name, child, key in self.entries:
            if child not in self.inodes or parent not in self.inodes:
                self.note(f"entry {name!r} in directory {parent} points to missing inode {child}")
                ops.append(Delete(key))
            else:
                kept.append((parent, name, child, key))
        self.entries = kept
        await self._apply(ops)

    async def check_reachable(self) -> None:
        linked = {child for _, _, child, _ in self.entries} | {ROOT_INO}
        doomed, lost = [], []
        for ino, node in sorted(self.inodes.items()):
            if ino in linked:
                continue
            if node.nlink == 0 or ino in self.orphans:
                doomed.append(node)
            else:
                lost.append(node)
        ops = []
        for node in doomed:
            self.note(f"orphan inode {node.ino} ({node.size} bytes) removed")
            ops.append(Delete(keys.ns_inode_key(self.cid, self.volid, node.ino)))
            ops += [Delete(k) for k in self.xattr_inos.get(node.ino, [])]
            ops += [Delete(k) for k in self.lock_inos.pop(node.ino, [])]
            del self.inodes[node.ino]
        for ino in sorted(set(self.lock_inos) - set(self.inodes)):
            self.note(f"lock records of missing inode {ino} removed")
            ops += [Delete(k) for k in self.lock_inos[ino]]
        for ino in self.orphans - set(self.inodes):
            ops.append(Delete(keys.ns_orphan_key(self.cid, self.volid, ino)))
        await self._apply(ops)
        if lost:
            lf = await self._lost_found()
            ops = []
            for node in lost:
                name = b"#%d" % node.ino
                self.note(f"unreachable inode {node.ino} linked as /lost+found/{name.decode()}")
                key = keys.ns_dentry_key(self.cid, self.volid, lf, name)
                ops.append(Put(key, pack_ino(node.ino)))
                self.entries.append((lf, name, node.ino, key))
            await self._apply(ops)

    async def _lost_found(self) -> int:
        for parent, name, child, _ in self.entries:
            if parent == ROOT_INO and name == LOST:
                return child
        item = await self.kv.get(keys.ns_next_key(self.cid, self.volid))
        ino = codec.unpack(item.value) if item else max(self.inodes) + 1
        now = time.time_ns()
        node = Inode(ino, stat.S_IFDIR | 0o700, nlink=2, atime=now, mtime=now, ctime=now,
                     parent=ROOT_INO)
        key = keys.ns_dentry_key(self.cid, self.volid, ROOT_INO, LOST)
        await self._apply([Put(keys.ns_next_key(self.cid, self.volid), codec.pack(ino + 1)),
                           Put(keys.ns_inode_key(self.cid, self.volid, ino), node.pack()),
                           Put(key, pack_ino(ino))])
        self.inodes[ino] = node
        self.entries.append((ROOT_INO, LOST, ino, key))
        return ino

    async def check_links(self) -> None:
        names = collections.Counter(child for _, _, child, _ in self.entries)
        subdirs = collections.Counter()
        parents = {}
        for parent, _, child, _ in self.entries:
            if self.inodes[child].is_dir:
                subdirs[parent] += 1
                parents[child] = parent
        ops = []
        for ino, node in self.inodes.items():
            want = 2 + subdirs[ino] if node.is_dir else names[ino]
            parent = parents.get(ino, ROOT_INO) if node.is_dir else node.parent
            if node.nlink != want or (node.is_dir and node.parent != parent):
                what = (f"inode {ino}: link count {node.nlink}, should be {want}"
                        if node.nlink != want else f"directory {ino}: parent {node.parent}, "
                        f"should be {parent}")
                self.note(what)
                node.nlink, node.parent = want, parent
                ops.append(Put(keys.ns_inode_key(self.cid, self.volid, ino), node.pack()))
        await self._apply(ops)

    async def check_writers(self) -> None:
        """Writer marks of mounts that are gone (killed before recording a
        file they created; an open elsewhere would clear them too)."""
        alive = {keys.last_part(i.key) for i in await self.kv.range(
            keys.nsmount_prefix(self.cid, self.volid))}
        ops = []
        for ino, node in self.inodes.items():
            if node.writer and node.writer not in alive:
                what = "held" if node.is_dir else "being written"
                self.note(f"inode {ino}: still marked as {what} by {node.writer}, a mount "
                          "that is gone (what it kept in memory was lost)")
                node.writer = ""
                ops.append(Put(keys.ns_inode_key(self.cid, self.volid, ino), node.pack()))
        await self._apply(ops)

    async def check_chunks(self) -> None:
        present: dict[int, set[str]] = collections.defaultdict(set)
        for node, chunks in self.chunks.items():
            for idx in chunks:
                present[idx].add(node)
        stray: dict[str, list[int]] = collections.defaultdict(list)
        partial = []
        for idx, where in sorted(present.items()):
            ino, n = idx >> CHUNK_BITS, idx & ((1 << CHUNK_BITS) - 1)
            node = self.inodes.get(ino)
            if node is None or not node.is_reg or n * CHUNK_SIZE >= max(node.size, 1):
                for r in where:
                    stray[r].append(idx)
            elif len(where) < len(self.chunks):
                partial.append((idx, where))
        if stray:
            total = sum(len(v) for v in stray.values())
            self.note(f"{total} chunk(s) that no file references dropped")
            if self.repair:
                for node, idxs in stray.items():
                    for idx in idxs:
                        await self.peers[node].drop_chunks(self.volid, idx, 1, self.rec["term"])
                self.fixed += 1
        for idx, where in partial:
            missing = sorted(set(self.chunks) - where)
            self.note(f"chunk {idx >> CHUNK_BITS}:{idx & ((1 << CHUNK_BITS) - 1)} missing on "
                      f"{', '.join(missing)}; copied from {sorted(where)[0]}")
            if self.repair:
                got = await self.peers[sorted(where)[0]].get_chunk(self.volid, idx)
                if got is not None:
                    for node in missing:
                        await self.peers[node].put_chunk(self.volid, idx, got[0], got[1], got[2],
                                                         self.rec["term"])
                self.fixed += 1

    async def check_usage(self) -> None:
        total = sum(n.size for n in self.inodes.values() if n.is_reg)
        count = len(self.inodes) - 1
        recorded_b = recorded_i = 0
        items = await self.kv.range(keys.ns_use_prefix(self.cid, self.volid))
        for it in items:
            b, i = codec.unpack(it.value)
            recorded_b, recorded_i = recorded_b + b, recorded_i + i
        if (recorded_b, recorded_i) != (total, count):
            self.note(f"usage records say {recorded_b} bytes in {recorded_i} inodes; "
                      f"the namespace holds {total} bytes in {count}")
            await self._apply([Delete(it.key) for it in items]
                              + [Put(keys.ns_use_key(self.cid, self.volid, "fsck"),
                                     codec.pack([total, count]))])

    async def run(self) -> dict:
        await self.load()
        await self.check_entries()
        await self.check_reachable()
        await self.check_links()
        await self.check_writers()
        await self.check_chunks()
        await self.check_usage()
        return {"volume": self.rec["name"], "inodes": len(self.inodes),
                "entries": len(self.entries), "problems": self.found,
                "repaired": self.repair and bool(self.found)}


async def _main(host: str, ref: str, repair: bool, quiet: bool) -> dict:
    client = Client(host)
    cluster = client.get("/v1/cluster/config")
    desc = client.get(f"/v1/volumes/{ref}")
    if not desc.get("shared"):
        raise PxfsError(f"volume {desc['name']!r} is a block volume: check its filesystem "
                        "with e2fsck/xfs_repair on the attached device")
    if repair and desc.get("mounts"):
        where = ", ".join(f"{m['node']}:{m['path']}" for m in desc["mounts"])
        raise PxfsError(f"volume {desc['name']!r} is mounted ({where}): unmount it first, "
                        "or check only with -n")
    kv = EtcdKV([parse_kvdb_url(u) for u in cluster["kvdb"]])
    try:
        item = await kv.get(keys.vol_key(cluster["clusterid"], int(desc["id"])))
        if item is None:
            raise PxfsError(f"volume {ref!r} vanished")
        rec = codec.unpack_record(item.value)
        return await Fsck(kv, cluster["clusterid"], rec, repair, quiet).run()
    finally:
        await kv.close()


@click.command()
@click.argument("volume")
@click.option("--host", envvar="PXCTL_HOST", default="http://127.0.0.1:9001", show_default=True,
              help="a node's API URL")
@click.option("-n", "check_only", is_flag=True, help="report only, change nothing")
@click.option("-j", "--json", "as_json", is_flag=True, help="print the result as JSON")
def main(volume, host, check_only, as_json):
    """Check and repair a shared volume."""
    try:
        res = trio.run(_main, host, volume, not check_only, as_json)
    except (PxfsError, ApiError) as exc:
        click.echo(f"pxfs-fsck: {exc}", err=True)
        sys.exit(8)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"{res['volume']}: {res['inodes']} inodes, {res['entries']} entries, "
                   f"{len(res['problems'])} problem(s)"
                   + (" repaired" if res["repaired"] else ""))
    if not res["problems"]:
        sys.exit(0)
    sys.exit(1 if res["repaired"] else 4)


if __name__ == "__main__":
    main()
