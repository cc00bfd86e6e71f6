"""The etcd key schema.  Keys are built only by the functions below.

| key                                    | value (msgpack record)                      | lease      |
|----------------------------------------|---------------------------------------------|------------|
| /pxfs/<cid>/node/<node>                | node: addresses, pool capacity/used, version | none       |
| /pxfs/<cid>/alive/<node>               | alive marker: started-at                     | node lease |
| /pxfs/<cid>/vol/<volid>                | volume: spec, replicas + states, gen, term  | none       |
| /pxfs/<cid>/volname/<name>             | volid (the name's reservation)               | none       |
| /pxfs/<cid>/attach/<volid>             | attach: node, term, device, mount path       | node lease |
| /pxfs/<cid>/resync/<volid>/<node>      | resync progress: done/total bytes            | node lease |
"""

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
