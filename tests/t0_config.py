"""Node configuration (pxfs/config.py): a valid config.json, then each key
wrong in turn.  Every problem is a ConfigError that names the key; pxfsd
turns it into a one-line message and exit status 2 before touching disk."""

import json
import os
import subprocess
import sys

import pytest

from pxfs import config
from pxfs.errors import ConfigError, InvalidArgument

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def raw(tmp_path):
    dev = tmp_path / "pool0"
    dev.mkdir()
    return {
        "clusterid": "c1",
        "kvdb": ["etcd:http://127.0.0.1:2379"],
        "storage": {"devices": [str(dev)]},
        "node_id": "n1",
        "api_address": "127.0.0.1:9001",
        "data_address": "127.0.0.1:9002",
        "data_dir": str(tmp_path / "data"),
        "osd_root": str(tmp_path / "osd"),
        "log_level": "info",
        "lease_ttl": 5,
    }


def bad(raw, key, **changes):
    """parse() of ``raw`` with ``changes`` (None deletes) must name ``key``."""
    cfg = dict(raw)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with pytest.raises(ConfigError) as ei:
        config.parse(cfg)
    assert ei.value.key == key
    assert f"config key {key!r}" in str(ei.value)
    return str(ei.value)


# -- valid --------------------------------------------------------------------------
def test_valid_config(raw, tmp_path):
    cfg = config.parse(raw, "/etc/pxfs/config.json")
    assert cfg.clusterid == "c1"
    assert cfg.kvdb == (("127.0.0.1", 2379),)
    assert cfg.devices == (str(tmp_path / "pool0"),)
    assert cfg.node_id == "n1"
    assert (cfg.api_host, cfg.api_port) == ("127.0.0.1", 9001)
    assert (cfg.data_host, cfg.data_port) == ("127.0.0.1", 9002)
    assert cfg.data_dir == str(tmp_path / "data")
    assert cfg.fuse_mountpoint == str(tmp_path / "data" / "fuse")
    assert cfg.log_level == "info" and cfg.lease_ttl == 5
    assert cfg.api_url == "http://127.0.0.1:9001" and cfg.data_addr == "127.0.0.1:9002"
    assert cfg.path == "/etc/pxfs/config.json"


def test_valid_config_defaults_and_forms(raw):
    for k in ("node_id", "api_address", "data_address", "log_level", "lease_ttl"):
        del raw[k]
    raw["kvdb"] = "http://[::1]:2379"          # a single string, IPv6, no etcd: prefix
    raw["api_address"] = "[::1]:9101"
    cfg = config.parse(raw)
    assert cfg.kvdb == (("::1", 2379),)
    assert cfg.node_id and cfg.lease_ttl == 5 and cfg.log_level == "info"
    assert cfg.api_url == "http://[::1]:9101"
    assert (cfg.data_host, cfg.data_port) == ("127.0.0.1", 9002)


def test_multiple_kvdb_endpoints(raw):
    raw["kvdb"] = ["etcd:http://10.0.0.1:2379", "etcd://10.0.0.2:2379", "10.0.0.3:2379/"]
    assert config.parse(raw).kvdb == (("10.0.0.1", 2379), ("10.0.0.2", 2379), ("10.0.0.3", 2379))


def test_mgtiface_sets_api_host(raw):
    raw["mgtiface"] = "lo"
    raw["api_address"] = "0.0.0.0:9001"
    assert config.parse(raw).api_host == "127.0.0.1"


def test_load_valid_file(raw, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    cfg = config.load(str(path))
    assert cfg.clusterid == "c1" and cfg.path == str(path)


# -- each key wrong in turn ------------------------------------------------------
def test_missing_clusterid(raw):
    assert "required" in bad(raw, "clusterid", clusterid=None)


@pytest.mark.parametrize("value", ["", "bad id", "-lead", "a" * 64, 7, "c/1"])
def test_bad_clusterid(raw, value):
    bad(raw, "clusterid", clusterid=value)


def test_missing_kvdb(raw):
    assert "required" in bad(raw, "kvdb", kvdb=None)


@pytest.mark.parametrize("value", ["", [], {}, 5, ["ftp://1.2.3.4:2379"], ["127.0.0.1"],
                                   ["http://127.0.0.1:2379/v3/x"], ["etcd:http://a b:1"], [5]])
def test_bad_kvdb_url(raw, value):
    bad(raw, "kvdb", kvdb=value)


@pytest.mark.parametrize("url", ["etcd:http://127.0.0.1:0", "etcd:http://127.0.0.1:65536",
                                 "etcd:http://127.0.0.1:99999", "etcd:http://127.0.0.1:123456"])
def test_kvdb_bad_port(raw, url):
    bad(raw, "kvdb", kvdb=[url])


@pytest.mark.parametrize("value", [None, "/dev/sdb", ["/dev/sdb"]])
def test_storage_missing_or_not_an_object(raw, value):
    bad(raw, "storage", storage=value)


def test_storage_devices_missing(raw):
    bad(raw, "storage.devices", storage={})


def test_storage_devices_empty(raw):
    bad(raw, "storage.devices", storage={"devices": []})


def test_storage_devices_relative(raw):
    assert "absolute" in bad(raw, "storage.devices", storage={"devices": ["pool0"]})


def test_storage_devices_not_a_string(raw):
    bad(raw, "storage.devices", storage={"devices": [3]})


def test_storage_devices_nonexistent(raw, tmp_path):
    missing = str(tmp_path / "nope")
    assert "does not exist" in bad(raw, "storage.devices", storage={"devices": [missing]})


def test_storage_devices_duplicated(raw):
    dev = raw["storage"]["devices"][0]
    assert "twice" in bad(raw, "storage.devices", storage={"devices": [dev, dev]})


def test_storage_devices_duplicated_spelled_differently(raw):
    # the same directory with a trailing slash is still the same pool root
    dev = raw["storage"]["devices"][0]
    assert "twice" in bad(raw, "storage.devices", storage={"devices": [dev, dev + "/"]})


@pytest.mark.parametrize("value", ["", "n 1", "-n", "n/1", "x" * 64, 1])
def test_bad_node_id(raw, value):
    bad(raw, "node_id", node_id=value)


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:", "localhost:9001", "127.0.0.1:http",
                                   "127.0.0.1:70000", "::1", 9001, "1.2.3.4:-1"])
def test_api_address_not_host_port(raw, value):
    bad(raw, "api_address", api_address=value)


def test_data_address_port_zero(raw):
    assert "1..65535" in bad(raw, "data_address", data_address="127.0.0.1:0")


@pytest.mark.parametrize("key", ["data_dir", "fuse_mountpoint", "osd_root"])
def test_relative_paths(raw, key):
    assert "absolute" in bad(raw, key, **{key: "var/lib/pxfs"})


@pytest.mark.parametrize("value", ["verbose", "", 10, "INFO "])
def test_bad_log_level(raw, value):
    bad(raw, "log_level", log_level=value)


@pytest.mark.parametrize("value", [0, 1, 61, 3600, -5, True, False, 5.0, "5"])
def test_bad_lease_ttl(raw, value):
    bad(raw, "lease_ttl", lease_ttl=value)


@pytest.mark.parametrize("value", [2, 60])
def test_lease_ttl_bounds_accepted(raw, value):
    raw["lease_ttl"] = value
    assert config.parse(raw).lease_ttl == value


def test_unknown_top_level_key(raw):
    msg = bad(raw, "clusterId", clusterId="c1")
    assert "unknown key" in msg and "clusterid" in msg


@pytest.mark.parametrize("key", ["mgtiface", "dataiface"])
def test_iface_naming_a_missing_interface(raw, key):
    assert "pxfs-no-such0" in bad(raw, key, **{key: "pxfs-no-such0"})


def test_osd_root_may_not_lie_in_the_data_dir(raw, tmp_path):
    """Volumes are mounted under osd_root, and never in the node's own data
    directory or FUSE view."""
    msg = bad(raw, "osd_root", osd_root=str(tmp_path / "data" / "osd"))
    assert "data_dir" in msg
    bad(raw, "osd_root", osd_root=str(tmp_path / "data"))
    assert config.parse(dict(raw, osd_root=str(tmp_path / "data-osd"))).osd_root


def test_fuse_mountpoint_may_not_hide_the_data_dir(raw, tmp_path):
    """The node's FUSE view over its own data_dir would make every look at
    its pools wait for the node itself (it hung at start)."""
    assert "data_dir" in bad(raw, "fuse_mountpoint", fuse_mountpoint=raw["data_dir"])
    bad(dict(raw, data_dir=str(tmp_path / "v" / "data")), "fuse_mountpoint",
        fuse_mountpoint=str(tmp_path / "v"))
    assert config.parse(dict(raw, fuse_mountpoint=str(tmp_path / "data" / "view")))


@pytest.mark.parametrize("key", ["data_dir", "fuse_mountpoint", "osd_root"])
def test_directories_that_cannot_be_made(raw, tmp_path, key):
    """A file where a directory goes, a path under a file, or one in /proc,
    /sys or /dev: refused by name, not a traceback once the node starts."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = dict(raw, fuse_mountpoint=str(tmp_path / "view"))
    assert "is a file" in bad(base, key, **{key: str(afile)})
    assert "afile is a file" in bad(base, key, **{key: str(afile / "sub" / "dir")})
    assert "/proc" in bad(base, key, **{key: "/proc/pxfs-qa"})
    assert "/sys" in bad(base, key, **{key: "/sys/pxfs-qa"})
    assert afile.read_text() == "x"
    assert config.parse(dict(base, **{key: str(tmp_path / "new" / "deep")}))


def test_null_for_a_key_with_a_default(raw):
    """null is not "the default": the message says how to get that."""
    with pytest.raises(ConfigError, match="leave the key out for '/var/lib/osd'") as ei:
        config.parse(dict(raw, osd_root=None))
    assert ei.value.key == "osd_root"


def test_unknown_key_in_storage(raw):
    assert "only 'devices'" in bad(raw, "storage.journal",
                                   storage=dict(raw["storage"], journal="/dev/sdc"))


@pytest.mark.parametrize("value", ["run/pxd.sock", 5, ["/x"], "/" + "s" * 120])
def test_bad_docker_socket(raw, value):
    bad(raw, "docker_socket", docker_socket=value)


def test_docker_socket_that_is_not_a_socket_is_refused_and_kept(raw, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert "exists and is not a unix socket" in bad(raw, "docker_socket",
                                                    docker_socket=str(precious))
    assert precious.read_text() == "keep me"
    assert "not a writable directory" in bad(raw, "docker_socket", docker_socket="/proc/nope/x.sock")
    assert "not a writable directory" in bad(raw, "docker_socket",
                                             docker_socket=str(precious / "x.sock"))
    ok = config.parse(dict(raw, docker_socket=str(tmp_path / "new" / "dir" / "pxd.sock")))
    assert ok.docker_socket.endswith("/new/dir/pxd.sock")


@pytest.mark.parametrize("api, data", [("127.0.0.1:9001", "127.0.0.1:9001"),
                                       ("0.0.0.0:9001", "127.0.0.1:9001"),
                                       ("127.0.0.2:9001", "0.0.0.0:9001"),
                                       ("[::]:9001", "127.0.0.1:9001"),
                                       ("[::1]:9001", "[::]:9001"),
                                       ("[::1]:9001", "[0::1]:9001"),        # one address
                                       ("0.0.0.0:9001", "[::ffff:127.0.0.1]:9001")])
def test_api_and_data_port_may_not_share_an_address(raw, api, data):
    assert "api_address's too" in bad(raw, "data_address", api_address=api, data_address=data)


@pytest.mark.parametrize("api, data", [("0.0.0.0:9001", "[::1]:9001"),
                                       ("127.0.0.1:9001", "127.0.0.2:9001")])
def test_one_port_on_addresses_that_do_not_collide(raw, api, data):
    cfg = config.parse(dict(raw, api_address=api, data_address=data))
    assert cfg.api_url.endswith(":9001")


def test_docker_socket_empty_means_none(raw):
    assert config.parse(dict(raw, docker_socket="")).docker_socket == ""


def test_portworx_keys_pxfs_does_not_use_load_and_are_named(raw):
    """A Portworx config.json still loads: its logging, alerting, scheduler
    and secrets keys are checked for Portworx's form and reported unused."""
    cfg = config.parse(dict(raw, loggingurl="http://lighthouse:8080/log",
                            alertingurl="https://alerts.example.com/px", scheduler="mesos",
                            secret={"secret_type": "vault", "cluster_secret_key": "k1",
                                    "vault": {"VAULT_ADDR": "http://v:8200"}}))
    assert cfg.unused == ("loggingurl", "alertingurl", "scheduler", "secret")
    assert config.parse(raw).unused == ()


@pytest.mark.parametrize("key, value, named", [
    ("loggingurl", "lighthouse:8080", "loggingurl"),
    ("loggingurl", 8080, "loggingurl"),
    ("alertingurl", "ftp://a/b", "alertingurl"),
    ("alertingurl", "http://", "alertingurl"),
    ("scheduler", "nomad", "scheduler"),
    ("scheduler", True, "scheduler"),
    ("secret", "vault", "secret"),
    ("secret", {"secret_type": "gpg"}, "secret.secret_type"),
    ("secret", {"cluster_secret_key": 7}, "secret.cluster_secret_key"),
])
def test_bad_portworx_keys_pxfs_does_not_use(raw, key, value, named):
    bad(raw, named, **{key: value})


def test_top_level_not_an_object():
    with pytest.raises(ConfigError) as ei:
        config.parse(["clusterid", "c1"])
    assert ei.value.key == "<top>"


def test_config_error_is_invalid_argument(raw):
    with pytest.raises(InvalidArgument):
        config.parse(dict(raw, lease_ttl=0))


# -- the file ----------------------------------------------------------------------
def test_file_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"clusterid": "c1",')
    with pytest.raises(ConfigError) as ei:
        config.load(str(path))
    assert ei.value.key == "<file>"
    assert str(path) in str(ei.value) and "not valid JSON" in str(ei.value)


def test_file_not_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"clusterid": "\xff\xfe"}')
    with pytest.raises(ConfigError) as ei:
        config.load(str(path))
    assert ei.value.key == "<file>" and str(path) in str(ei.value)


def test_file_missing(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as ei:
        config.load(str(path))
    assert ei.value.key == "<file>"
    assert str(path) in str(ei.value) and "does not exist" in str(ei.value)


def test_file_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as ei:
        config.load(str(tmp_path))
    assert ei.value.key == "<file>"


def test_load_names_the_bad_key(raw, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(raw, log_level="loud")))
    with pytest.raises(ConfigError) as ei:
        config.load(str(path))
    assert ei.value.key == "log_level"


# -- pxfsd refuses a bad config: exit 2, one line, nothing created --------------------
def run_pxfsd(path):
    return subprocess.run([sys.executable, "-m", "pxfs.node", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


#: one wrong value for every key pxfsd knows, run through the real daemon
PXFSD_BAD = [
    ({"clusterid": "bad id"}, "clusterid"),
    ({"kvdb": ["etcd:http://127.0.0.1:99999"]}, "kvdb"),
    ({"storage": {"devices": []}}, "storage.devices"),
    ({"mgtiface": "no-such-if0"}, "mgtiface"),
    ({"dataiface": "no-such-if0"}, "dataiface"),
    ({"node_id": "n/1"}, "node_id"),
    ({"api_address": "localhost"}, "api_address"),
    ({"data_address": "127.0.0.1:0"}, "data_address"),
    ({"data_address": "127.0.0.1:9001"}, "data_address"),      # api_address's
    ({"data_dir": "relative/dir"}, "data_dir"),
    ({"data_dir": "/proc/pxfs-qa"}, "data_dir"),
    ({"fuse_mountpoint": "/sys/pxfs-qa"}, "fuse_mountpoint"),
    ({"fuse_mountpoint": "fuse"}, "fuse_mountpoint"),
    ({"osd_root": "osd"}, "osd_root"),
    ({"log_level": "loud"}, "log_level"),
    ({"lease_ttl": 1}, "lease_ttl"),
    ({"docker_socket": "pxd.sock"}, "docker_socket"),
    ({"loggingurl": "lighthouse"}, "loggingurl"),
    ({"alertingurl": 1}, "alertingurl"),
    ({"secret": []}, "secret"),
    ({"scheduler": "nomad"}, "scheduler"),
    ({"unknown_thing": 1}, "unknown_thing"),
]


def test_every_key_has_a_pxfsd_case():
    assert {k.split(".")[0] for _, k in PXFSD_BAD} >= config._KNOWN


@pytest.mark.parametrize("change, key", PXFSD_BAD)
def test_pxfsd_bad_config_exits_2(raw, tmp_path, change, key):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(raw, **change)))
    res = run_pxfsd(path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("pxfsd: ") and repr(key) in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    for k in ("data_dir", "osd_root"):
        assert not os.path.exists(raw[k])


def test_pxfsd_missing_config_file(tmp_path):
    res = run_pxfsd(tmp_path / "nope.json")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.json" in lines[0] and "does not exist" in lines[0]


def test_pxfsd_unusable_device_creates_nothing(raw, tmp_path):
    # /dev/null passes the existence check but is neither a block device, a file
    # nor a directory: pxfsd must refuse it before it creates its data_dir.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(raw, storage={"devices": ["/dev/null"]})))
    res = run_pxfsd(path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    if os.geteuid() == 0:
        assert "'storage.devices'" in lines[0]
    assert not os.path.exists(raw["data_dir"])
