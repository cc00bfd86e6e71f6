"""Load and validate a node's config.json into a frozen dataclass.

The keys shared with Portworx's config.json are ``clusterid``, ``kvdb``,
``storage.devices``, ``mgtiface`` and ``dataiface``; the rest are pxfs's own
(see conf/config.json).  Every problem raises ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import socket
import stat
import struct

from .errors import ConfigError

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_LEVELS = ("debug", "info", "warning", "error")
#: Portworx's keys that pxfs reads but does not use (a Portworx config
#: file still loads; their values must have Portworx's form)
UNUSED = ("loggingurl", "alertingurl", "scheduler", "secret")
_SCHEDULERS = ("", "none", "kubernetes", "mesos", "swarm")
_SECRET_TYPES = ("aws", "dcos", "docker", "k8s", "kvdb", "vault")
_KNOWN = {
    "clusterid", "kvdb", "storage", "mgtiface", "dataiface", "node_id",
    "api_address", "data_address", "data_dir", "fuse_mountpoint", "osd_root",
    "log_level", "lease_ttl", "docker_socket", "loggingurl", "alertingurl",
    "secret", "scheduler",
}


@dataclasses.dataclass(frozen=True)
class Config:
    clusterid: str
    kvdb: tuple[tuple[str, int], ...]
    devices: tuple[str, ...]
    node_id: str
    api_host: str
    api_port: int
    data_host: str
    data_port: int
    data_dir: str
    fuse_mountpoint: str
    osd_root: str
    log_level: str
    lease_ttl: int
    path: str = ""
    docker_socket: str = "/run/docker/plugins/pxd.sock"   # "" = no Docker plugin
    unused: tuple[str, ...] = ()        # Portworx keys given that pxfs does not use

    @property
    def api_url(self) -> str:
        return f"http://{_urlhost(self.api_host)}:{self.api_port}"

    @property
    def kvdb_text(self) -> str:
        """The etcd endpoints as messages name them."""
        return ", ".join(f"{h}:{p}" for h, p in self.kvdb)

    @property
    def data_addr(self) -> str:
        return f"{self.data_host}:{self.data_port}"


def _urlhost(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def iface_address(name: str) -> str:
    """IPv4 address of a network interface (SIOCGIFADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = struct.pack("256s", name.encode()[:15])
        res = fcntl.ioctl(s.fileno(), 0x8915, packed)
    return socket.inet_ntoa(res[20:24])


def parse_kvdb_url(url: object, key: str = "kvdb") -> tuple[str, int]:
    if not isinstance(url, str) or not url:
        raise ConfigError(key, "expected an etcd URL such as 'etcd:http://127.0.0.1:2379'")
    m = re.fullmatch(r"(?:etcd:)?(?:(?:etcd|https?)://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})/?", url)
    if not m:
        raise ConfigError(key, f"{url!r} is not an etcd URL such as 'etcd:http://127.0.0.1:2379'")
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise ConfigError(key, f"port {port} out of range in {url!r}")
    return m.group(1).strip("[]"), port


def _address(raw: dict, key: str, default: str, iface: str | None) -> tuple[str, int]:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(key, "expected 'HOST:PORT', e.g. '127.0.0.1:9001'")
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(key, f"{value!r} is not 'HOST:PORT' with a port in 1..65535")
    host = host.strip("[]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(key, f"{host!r} is not an IP address") from None
    if iface:
        host = iface
    return host, int(port)


def _str(raw: dict, key: str, default: str | None = None, *, absolute=False) -> str:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(key, "is required" if default is None else
                          f"expected a non-empty string (leave the key out for {default!r})")
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "expected a non-empty string")
    if absolute and not os.path.isabs(value):
        raise ConfigError(key, f"expected an absolute path, got {value!r}")
    return value


def _iface(raw: dict, key: str) -> str | None:
    name = raw.get(key)
    if name in (None, ""):
        return None
    if not isinstance(name, str):
        raise ConfigError(key, "expected a network interface name such as 'eth0'")
    try:
        return iface_address(name)
    except OSError:
        raise ConfigError(key, f"no IPv4 address on network interface {name!r}") from None


def _check_unused(raw: dict) -> None:
    for key in ("loggingurl", "alertingurl"):
        v = raw.get(key, "")
        if not isinstance(v, str) or (v and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v)):
            raise ConfigError(key, "expected an http:// or https:// URL, or \"\"")
    v = raw.get("scheduler", "")
    if v not in _SCHEDULERS:
        raise ConfigError("scheduler", "expected one of " + ", ".join(repr(x) for x in _SCHEDULERS))
    v = raw.get("secret", {})
    if not isinstance(v, dict):
        raise ConfigError("secret", "expected an object such as {\"secret_type\": \"kvdb\"}")
    if v.get("secret_type", "kvdb") not in _SECRET_TYPES:
        raise ConfigError("secret.secret_type", "expected one of " + ", ".join(_SECRET_TYPES))
    if not isinstance(v.get("cluster_secret_key", ""), str):
        raise ConfigError("secret.cluster_secret_key", "expected a string")


def _overlap(a: str, b: str) -> bool:
    """Whether listeners on hosts ``a`` and ``b`` with one port collide:
    the same address, or a wildcard of the other's family (``::`` may be
    dual-stack, so it collides with anything)."""
    def addr(h):
        try:
            ip = ipaddress.ip_address(h.strip("[]"))
        except ValueError:
            return None                     # a host name: compared as written
        return ip.ipv4_mapped or ip if ip.version == 6 else ip
    x, y = addr(a), addr(b)
    if a == b or (x is not None and x == y):
        return True
    for p, q in ((x, y), (y, x)):
        if p is not None and p.is_unspecified:
            # '::' may be dual-stack; '0.0.0.0' takes every IPv4 address
            if p.version == 6 or q is None or q.version == 4:
                return True
    return False


def _check_socket_path(path: str) -> None:
    """The node removes a stale socket at ``path`` before it listens there:
    anything else found there must stay, and the directory must be one the
    node can make."""
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigError("docker_socket", f"{path} exists and is not a unix socket")
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    real = os.path.realpath(parent)
    if not os.path.isdir(real) or real == "/proc" or real.startswith(("/proc/", "/sys/")) \
            or real == "/sys" or not os.access(real, os.W_OK):
        raise ConfigError("docker_socket", f"cannot make {path}: {parent} is not a writable "
                                           "directory")


def _check_dir(key: str, path: str) -> None:
    """ConfigError unless ``path`` is a directory, or can be made as one
    (its nearest existing parent a directory), outside /proc, /sys and /dev.  A
    dead FUSE mount ("not connected") passes: the node cleans it up."""
    real = os.path.realpath(path)
    for special in ("/proc", "/sys", "/dev"):
        if real == special or real.startswith(special + "/"):
            raise ConfigError(key, f"{path} lies in {special}, which holds the kernel's files, "
                                   "not pxfs's")
    probe = path
    while True:
        try:
            st = os.stat(probe)
        except FileNotFoundError:
            parent = os.path.dirname(probe)
            if parent == probe:
                return
            probe = parent
            continue
        except NotADirectoryError:
            parent = os.path.dirname(probe)
            while parent != probe and not os.path.isfile(parent):
                probe, parent = parent, os.path.dirname(parent)
            raise ConfigError(key, f"cannot make {path}: {parent} is a file") from None
        except OSError as exc:
            if probe == path:
                return                      # a dead mount there: cleaned up at start
            raise ConfigError(key, f"cannot use {path}: {probe}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(key, f"{path} is a file, not a directory" if probe == path
                              else f"cannot make {path}: {probe} is a file")
        return


def _inside(inner: str, outer: str) -> bool:
    return (os.path.normpath(inner) + "/").startswith(os.path.normpath(outer) + "/")


def parse(raw: object, path: str = "") -> Config:
    """Validate a decoded config.json."""
    if not isinstance(raw, dict):
        raise ConfigError("<top>", "expected a JSON object")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise ConfigError(unknown[0], "unknown key; known keys: " + ", ".join(sorted(_KNOWN)))
    _check_unused(raw)

    clusterid = _str(raw, "clusterid")
    if not _ID_RE.match(clusterid):
        raise ConfigError("clusterid", "expected 1-63 letters, digits, '.', '_' or '-'")

    kvdb = raw.get("kvdb")
    if kvdb is None:
        raise ConfigError("kvdb", "is required: a list of etcd URLs such as ['etcd:http://127.0.0.1:2379']")
    if isinstance(kvdb, str):
        kvdb = [kvdb]
    if not isinstance(kvdb, list) or not kvdb:
        raise ConfigError("kvdb", "expected a non-empty list of etcd URLs")
    endpoints = tuple(parse_kvdb_url(u) for u in kvdb)

    storage = raw.get("storage")
    if not isinstance(storage, dict):
        raise ConfigError("storage", "is required: an object with a 'devices' list")
    extra = sorted(set(storage) - {"devices"})
    if extra:
        raise ConfigError(f"storage.{extra[0]}", "unknown key; 'storage' takes only 'devices'")
    devices = storage.get("devices")
    if not isinstance(devices, list) or not devices:
        raise ConfigError("storage.devices", "expected a non-empty list of device, image-file or directory paths")
    for dev in devices:
        if not isinstance(dev, str) or not os.path.isabs(dev):
            raise ConfigError("storage.devices", f"{dev!r} is not an absolute path")
        if not os.path.exists(dev):
            raise ConfigError("storage.devices", f"{dev} does not exist")
        mode = os.stat(dev).st_mode
        if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ConfigError("storage.devices", f"{dev} is not a block device, image file or directory")
    if len({os.path.realpath(d) for d in devices}) != len(devices):
        raise ConfigError("storage.devices", "lists a device twice")

    node_id = _str(raw, "node_id", socket.gethostname().split(".")[0])
    if not _ID_RE.match(node_id):
        raise ConfigError("node_id", "expected 1-63 letters, digits, '.', '_' or '-'")
    api_host, api_port = _address(raw, "api_address", "127.0.0.1:9001", _iface(raw, "mgtiface"))
    data_host, data_port = _address(raw, "data_address", "127.0.0.1:9002", _iface(raw, "dataiface"))
    if api_port == data_port and _overlap(api_host, data_host):
        raise ConfigError("data_address", f"{data_host}:{data_port} is api_address's too: the API "
                                          "and the data port need ports of their own")
    data_dir = _str(raw, "data_dir", "/var/lib/pxfs", absolute=True)
    fuse = _str(raw, "fuse_mountpoint", os.path.join(data_dir, "fuse"), absolute=True)
    osd_root = _str(raw, "osd_root", "/var/lib/osd", absolute=True)
    for outer, okey in ((data_dir, "data_dir"), (fuse, "fuse_mountpoint")):
        if _inside(osd_root, outer):
            raise ConfigError("osd_root", f"must not lie in {okey} ({outer}): volumes are "
                                          "mounted under it")
    if _inside(data_dir, fuse):
        # the node's own view would hide its pools and lock file: every
        # look at them would wait for the node itself
        raise ConfigError("fuse_mountpoint", f"must not be data_dir or hold it ({data_dir}): "
                                             "the node's FUSE view is mounted there")
    for key, value in (("data_dir", data_dir), ("fuse_mountpoint", fuse), ("osd_root", osd_root)):
        _check_dir(key, value)
    level = raw.get("log_level", "info")
    if level not in _LEVELS:
        raise ConfigError("log_level", "expected one of " + ", ".join(_LEVELS))
    ttl = raw.get("lease_ttl", 5)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 2 <= ttl <= 60:
        raise ConfigError("lease_ttl", "expected whole seconds between 2 and 60")
    docker_socket = raw.get("docker_socket", "/run/docker/plugins/pxd.sock")
    if docker_socket is None:
        docker_socket = ""
    if not isinstance(docker_socket, str) or (docker_socket and not os.path.isabs(docker_socket)):
        raise ConfigError("docker_socket", "expected an absolute path of a unix socket, or \"\" "
                          "for no Docker plugin")
    if len(docker_socket.encode()) > 107:
        raise ConfigError("docker_socket", "path too long for a unix socket (at most 107 bytes)")
    if docker_socket:
        _check_socket_path(docker_socket)
    return Config(clusterid, endpoints, tuple(devices), node_id, api_host, api_port,
                  data_host, data_port, data_dir, fuse, osd_root, level, ttl, path, docker_socket,
                  tuple(k for k in UNUSED if k in raw))


def load(path: str) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ConfigError("<file>", f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("<file>", f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError("<file>", f"{path} is not valid JSON: {exc}") from None
    return parse(raw, path)
