"""The etcd key schema.  Keys are built only by the functions below.

| key                                    | value (msgpack record)                      | lease      |
|----------------------------------------|---------------------------------------------|------------|
| /pxfs/<cid>/node/<node>                | node: addresses, pool capacity/used, version | none       |
| /pxfs/<cid>/alive/<node>               | alive marker: started-at                     | node lease |
| /pxfs/<cid>/vol/<volid>                | volume: spec, replicas + states, gen, term  | none       |
| /pxfs/<cid>/volname/<name>             | volid (the name's reservation)               | none       |
| /pxfs/<cid>/attach/<volid>             | attach: node, term, device, mount path       | node lease |
| /pxfs/<cid>/resync/<volid>/<node>      | resync progress: done/total bytes            | node lease |
| /pxfs/<cid>/ns/<volid>/i/<ino>         | shared volume inode (namespace/records.py)  | none       |
| /pxfs/<cid>/ns/<volid>/d/<ino>/<name>  | directory entry: child inode number         | none       |
| /pxfs/<cid>/ns/<volid>/x/<ino>/<name>  | extended attribute value                    | none       |
| /pxfs/<cid>/ns/<volid>/next            | next free inode number (taken in batches)   | none       |
| /pxfs/<cid>/ns/<volid>/orphan/<ino>    | unlinked inode still open on a node: node   | none       |
| /pxfs/<cid>/ns/<volid>/use/<node>      | bytes and inodes a node added (statfs)      | none       |
| /pxfs/<cid>/ns/<volid>/recall/<ino>    | a mount wants this held directory back      | none       |
| /pxfs/<cid>/nsmount/<volid>/<client>   | a mount of a shared volume: node, path, pid | mount lease|
| /pxfs/<cid>/docker/mount/<node>/<volid>| Docker mounts on a node: path, mount ids     | none       |
| /pxfs/<cid>/docker/alias/<name>        | volid of a volume Docker knows by another name | none     |

Inode numbers are hex in keys; names are kept as they are when they are
UTF-8 without ``%``, else percent-encoded (so the two never collide).
"""

import urllib.parse

ROOT = "/pxfs"


def cluster_prefix(cid: str) -> str:
    return f"{ROOT}/{cid}/"


def node_key(cid: str, node: str) -> str:
    return f"{ROOT}/{cid}/node/{node}"


def node_prefix(cid: str) -> str:
    return f"{ROOT}/{cid}/node/"


def alive_key(cid: str, node: str) -> str:
    return f"{ROOT}/{cid}/alive/{node}"


def alive_prefix(cid: str) -> str:
    return f"{ROOT}/{cid}/alive/"


def vol_key(cid: str, volid: int) -> str:
    return f"{ROOT}/{cid}/vol/{volid}"


def vol_prefix(cid: str) -> str:
    return f"{ROOT}/{cid}/vol/"


def volname_key(cid: str, name: str) -> str:
    return f"{ROOT}/{cid}/volname/{name}"


def attach_key(cid: str, volid: int) -> str:
    return f"{ROOT}/{cid}/attach/{volid}"


def attach_prefix(cid: str) -> str:
    return f"{ROOT}/{cid}/attach/"


def resync_key(cid: str, volid: int, node: str) -> str:
    return f"{ROOT}/{cid}/resync/{volid}/{node}"


def resync_prefix(cid: str) -> str:
    return f"{ROOT}/{cid}/resync/"


def last_part(key: str) -> str:
    return key.rsplit("/", 1)[1]


# -- shared volume namespaces ------------------------------------------------
def ns_prefix(cid: str, volid: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/"


def ns_inode_key(cid: str, volid: int, ino: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/i/{ino:x}"


def ns_dir_prefix(cid: str, volid: int, parent: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/d/{parent:x}/"


def ns_dentry_key(cid: str, volid: int, parent: int, name: bytes) -> str:
    return ns_dir_prefix(cid, volid, parent) + encode_name(name)


def ns_xattr_prefix(cid: str, volid: int, ino: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/x/{ino:x}/"


def ns_xattr_key(cid: str, volid: int, ino: int, name: bytes) -> str:
    return ns_xattr_prefix(cid, volid, ino) + encode_name(name)


def ns_next_key(cid: str, volid: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/next"


def ns_orphan_key(cid: str, volid: int, ino: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/orphan/{ino:x}"


def ns_orphan_prefix(cid: str, volid: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/orphan/"


def ns_recall_key(cid: str, volid: int, ino: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/recall/{ino:x}"


def ns_recall_prefix(cid: str, volid: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/recall/"


def ns_use_key(cid: str, volid: int, node: str) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/use/{node}"


def ns_use_prefix(cid: str, volid: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/use/"


def ns_lock_prefix(cid: str, volid: int, ino: int) -> str:
    return f"{ROOT}/{cid}/ns/{volid}/l/{ino:x}/"


def ns_lock_key(cid: str, volid: int, ino: int, client: str) -> str:
    return ns_lock_prefix(cid, volid, ino) + client


def encode_name(name: bytes) -> str:
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "%" not in text:
        return text
    return urllib.parse.quote_from_bytes(name, safe="")


def decode_name(part: str) -> bytes:
    if "%" in part:
        return urllib.parse.unquote_to_bytes(part)
    return part.encode("utf-8")


def nsmount_key(cid: str, volid: int, client: str) -> str:
    return f"{ROOT}/{cid}/nsmount/{volid}/{client}"


def nsmount_prefix(cid: str, volid: int | None = None) -> str:
    return f"{ROOT}/{cid}/nsmount/" + ("" if volid is None else f"{volid}/")


def docker_mount_key(cid: str, node: str, volid: int) -> str:
    return f"{ROOT}/{cid}/docker/mount/{node}/{volid}"


def docker_mount_prefix(cid: str, node: str | None = None) -> str:
    return f"{ROOT}/{cid}/docker/mount/" + ("" if node is None else f"{node}/")


def docker_alias_key(cid: str, name: str) -> str:
    return f"{ROOT}/{cid}/docker/alias/{encode_name(name.encode())}"


def docker_alias_prefix(cid: str) -> str:
    return f"{ROOT}/{cid}/docker/alias/"
