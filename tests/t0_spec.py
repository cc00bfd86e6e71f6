"""Volume specs (pxfs/volume/spec.py): sizes, names, option keywords and the
inline ``size=100,repl=2,name=v`` form.  Pure functions, no I/O."""

import errno

import pytest

from pxfs.errors import InvalidArgument
from pxfs.volume.spec import (GiB, MAX_NAME, MiB, VolumeSpec, parse_inline, parse_size,
                              spec_from_options, validate_name)

TiB = 1 << 40


# -- parse_size -----------------------------------------------------------------
@pytest.mark.parametrize("text, size", [
    ("10", 10 * GiB),            # a bare number is GiB
    (" 10 ", 10 * GiB),
    (10, 10 * GiB),              # REST bodies may carry a number
    ("1.5", 1536 * MiB),
    ("512M", 512 * MiB),
    ("512m", 512 * MiB),
    ("512MiB", 512 * MiB),
    ("512 MiB", 512 * MiB),
    ("64M", 64 * MiB),           # the minimum itself
    ("2G", 2 * GiB),
    ("2GiB", 2 * GiB),
    ("2gib", 2 * GiB),
    ("2T", 2 * TiB),
    ("64T", 64 * TiB),           # the maximum itself
])
def test_parse_size_units(text, size):
    assert parse_size(text) == size


def test_parse_size_rounds_up_to_4k():
    assert parse_size("100.0001M") == 100 * MiB + 4096
    assert parse_size("65537K") == 64 * MiB + 4096
    assert parse_size("100M") == 100 * MiB
    assert parse_size("0.5G") == 512 * MiB
    with pytest.raises(InvalidArgument, match="maximum"):
        parse_size("64.0000001T")


@pytest.mark.parametrize("text", ["", "abc", "10X", "10 GB GB", "-1", "-10G", "1e3", "nan",
                                  "inf", "1,5", "G", "10GiBs", "0x10"])
def test_parse_size_rejects_malformed(text):
    with pytest.raises(InvalidArgument) as ei:
        parse_size(text)
    msg = str(ei.value)
    assert "size" in msg and repr(text.strip()) in msg
    assert "MiB" in msg and "GiB" in msg        # tells the user which units exist
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("text", ["0", "0G", "63M", "0.01", "1K"])
def test_parse_size_below_minimum(text):
    with pytest.raises(InvalidArgument, match="below the minimum of 64 MiB"):
        parse_size(text)


@pytest.mark.parametrize("text", ["65T", "65537", "100000G", "1" * 30])
def test_parse_size_above_maximum(text):
    with pytest.raises(InvalidArgument, match="above the maximum of 64 TiB"):
        parse_size(text)


def test_parse_size_huge_number_is_invalid_argument():
    # 400 digits overflow a float to inf; int(inf) raises OverflowError, which
    # must not escape as anything but InvalidArgument (it would be a 500 in the API).
    with pytest.raises(InvalidArgument, match="above the maximum"):
        parse_size("1" * 400)


# -- validate_name --------------------------------------------------------------
@pytest.mark.parametrize("name", ["mysql_vol", "a", "_x", "vol-1.2+b@c", "1a", "x" * MAX_NAME])
def test_validate_name_accepts(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name, why", [
    ("", "non-empty"),
    (None, "non-empty"),
    (5, "non-empty"),
    ("/", "'/'"),
    ("a/b", "'/'"),
    ("..", "not allowed"),
    (".", "not allowed"),
    ("../x", "'/'"),
    ("a..b", "'..'"),
    ("a\nb", "control"),
    ("ab\n", "control"),
    ("a\tb", "control"),
    ("a\x00", "control"),
    ("a\x7f", "control"),
    ("x" * (MAX_NAME + 1), "longer than 128"),
    ("123", "all digits"),
    ("0", "all digits"),
    ("-a", "start with"),
    (".hidden", "start with"),
    ("a b", "letters, digits"),
    ("a:b", "letters, digits"),
    ("vol\u00e9", "letters, digits"),
])
def test_validate_name_refuses(name, why):
    with pytest.raises(InvalidArgument) as ei:
        validate_name(name)
    assert why in str(ei.value)


# -- spec_from_options ----------------------------------------------------------
def test_spec_defaults():
    spec = spec_from_options({"name": "v"})
    assert spec == VolumeSpec(name="v")
    assert (spec.size, spec.fs, spec.block_size, spec.repl, spec.cos) == (GiB, "ext4", 32768, 1, 1)
    assert spec.labels == () and spec.nodes == () and spec.shared is False


def test_spec_every_keyword():
    spec = spec_from_options({"name": "db", "size": "20", "fs": "xfs", "block_size": "64",
                              "repl": "2", "cos": "high", "label": "app=mysql,tier=db",
                              "nodes": "n1;n2", "shared": "false"})
    assert spec == VolumeSpec(name="db", size=20 * GiB, fs="xfs", block_size=65536, repl=2,
                              cos=9, labels=(("app", "mysql"), ("tier", "db")),
                              nodes=("n1", "n2"), shared=False)
    rec = spec.to_record()
    assert rec["labels"] == {"app": "mysql", "tier": "db"} and rec["nodes"] == ["n1", "n2"]


@pytest.mark.parametrize("alias, canonical, value, field, expected", [
    ("ha", "repl", "3", "repl", 3),
    ("HA", "repl", "2", "repl", 2),
    ("bs", "block_size", "4", "block_size", 4096),
    ("io_priority", "cos", "medium", "cos", 5),
    ("priority_io", "cos", "7", "cos", 7),
    ("labels", "label", "a=b", "labels", (("a", "b"),)),
])
def test_spec_aliases(alias, canonical, value, field, expected):
    via_alias = spec_from_options({"name": "v", alias: value})
    via_canonical = spec_from_options({"name": "v", canonical: value})
    assert getattr(via_alias, field) == expected == getattr(via_canonical, field)


def test_spec_alias_and_canonical_together_refused():
    with pytest.raises(InvalidArgument, match="'repl' given twice"):
        spec_from_options({"name": "v", "repl": "2", "ha": "2"})


@pytest.mark.parametrize("value, cos", [("low", 1), ("LOW", 1), ("medium", 5), ("high", 9),
                                        ("1", 1), ("9", 9)])
def test_spec_cos_values(value, cos):
    assert spec_from_options({"name": "v", "cos": value}).cos == cos


def test_spec_labels_with_semicolons():
    spec = spec_from_options({"name": "v", "label": "b=2;a=1"})
    assert spec.labels == (("a", "1"), ("b", "2"))


def test_spec_nodes_with_semicolons_set_repl():
    spec = spec_from_options({"name": "v", "nodes": "n1;n2;n3"})
    assert spec.nodes == ("n1", "n2", "n3") and spec.repl == 3
    spec = spec_from_options({"name": "v", "nodes": "n1", "repl": "1"})
    assert spec.nodes == ("n1",) and spec.repl == 1


def test_spec_nodes_repl_mismatch():
    with pytest.raises(InvalidArgument, match="nodes lists 2 nodes but repl is 3"):
        spec_from_options({"name": "v", "nodes": "n1;n2", "repl": "3"})


@pytest.mark.parametrize("value", ["true", "yes", "on", "1"])
def test_spec_shared(value):
    assert spec_from_options({"name": "v", "shared": value}).shared
    assert parse_inline(f"name=v,shared={value},size=2").shared


def test_spec_unknown_key_refused():
    with pytest.raises(InvalidArgument) as ei:
        spec_from_options({"name": "v", "replicas": "2"})
    msg = str(ei.value)
    assert "unknown volume option 'replicas'" in msg
    assert "repl" in msg and "ha" in msg        # lists what is known


@pytest.mark.parametrize("key, value, fragment", [
    ("name", "a/b", "'/'"),
    ("size", "ten", "size 'ten'"),
    ("size", "1M", "below the minimum"),
    ("fs", "btrfs", "fs 'btrfs'"),
    # digits other than ASCII's are not numbers here (Python's int() takes them)
    ("size", "\uff11\uff10", "size '\uff11\uff10'"),
    ("repl", "\u0662", "repl '\u0662'"),
    ("cos", "\u0665", "cos '\u0665'"),
    ("block_size", "\uff16\uff14", "block_size '\uff16\uff14'"),
    ("block_size", "3", "block_size '3'"),
    ("block_size", "48", "power of two"),
    ("block_size", "2048", "block_size '2048'"),
    ("block_size", "4k", "block_size '4k'"),
    ("repl", "0", "repl '0'"),
    ("repl", "4", "repl '4'"),
    ("repl", "two", "repl 'two'"),
    ("repl", "-1", "repl '-1'"),
    ("cos", "0", "cos '0'"),
    ("cos", "10", "cos '10'"),
    ("cos", "urgent", "cos 'urgent'"),
    ("label", "novalue", "label 'novalue'"),
    ("label", "a=b c", "label 'a=b c'"),
    ("label", "", "label ''"),
    ("nodes", "n1;n1", "named twice"),
    ("nodes", "n1;bad node", "'bad node' is not a node id"),
    ("nodes", "n1;", "'' is not a node id"),
    ("shared", "maybe", "shared 'maybe'"),
])
def test_spec_bad_value_refused(key, value, fragment):
    opts = {"name": "v", key: value} if key != "name" else {key: value}
    with pytest.raises(InvalidArgument) as ei:
        spec_from_options(opts)
    assert fragment in str(ei.value)


def test_spec_non_string_value_refused():
    with pytest.raises(InvalidArgument, match="must be a string"):
        spec_from_options({"name": "v", "repl": 2})


def test_spec_name_required():
    with pytest.raises(InvalidArgument, match="a volume name is required"):
        spec_from_options({"size": "10"})


def test_spec_name_argument():
    assert spec_from_options({"size": "2"}, name="v").name == "v"
    assert spec_from_options({"name": "v"}, name="v").name == "v"
    with pytest.raises(InvalidArgument, match="two names given"):
        spec_from_options({"name": "v"}, name="w")


def test_spec_xfs_needs_320m():
    with pytest.raises(InvalidArgument, match="xfs needs"):
        spec_from_options({"name": "v", "fs": "xfs", "size": "256M"})
    assert spec_from_options({"name": "v", "fs": "xfs", "size": "320M"}).size == 320 * MiB


# -- parse_inline ---------------------------------------------------------------
def test_inline_full():
    spec = parse_inline("size=100,repl=2,name=mysql_vol")
    assert spec == VolumeSpec(name="mysql_vol", size=100 * GiB, repl=2)


def test_inline_aliases():
    spec = parse_inline("name=v,ha=3,bs=8,io_priority=high,nodes=a;b;c")
    assert (spec.repl, spec.block_size, spec.cos, spec.nodes) == (3, 8192, 9, ("a", "b", "c"))


def test_inline_bare_name():
    assert parse_inline("mysql_vol") == VolumeSpec(name="mysql_vol")


@pytest.mark.parametrize("text", ["", "../etc", "123"])
def test_inline_bare_name_validated(text):
    with pytest.raises(InvalidArgument):
        parse_inline(text)


def test_inline_missing_name():
    with pytest.raises(InvalidArgument, match="has no name="):
        parse_inline("size=100,repl=2")


@pytest.mark.parametrize("text, key", [("name=v,size=1,size=2", "size"),
                                       ("name=v,repl=2,ha=2", "repl"),
                                       ("name=a,name=b", "name")])
def test_inline_duplicate_key(text, key):
    with pytest.raises(InvalidArgument, match=f"gives '{key}' twice"):
        parse_inline(text)


@pytest.mark.parametrize("text, part", [("size=100,foo,name=v", "foo"),
                                        ("name=v,", ""),
                                        ("name=v,=3", "=3")])
def test_inline_part_without_equals(text, part):
    with pytest.raises(InvalidArgument) as ei:
        parse_inline(text)
    assert f"inline spec part {part!r} is not key=value" in str(ei.value)


def test_inline_bad_value_reported():
    with pytest.raises(InvalidArgument, match="repl '7'"):
        parse_inline("name=v,repl=7")


def test_inline_values_trimmed_like_keys():
    assert parse_inline(" name=i15 , size=1 ,repl= 2") == VolumeSpec(name="i15", size=GiB, repl=2)


def test_long_bad_values_are_not_echoed_whole():
    """A 100 KB label or option in an error message is cut in the middle."""
    for opts in ({"name": "v", "labels": "a=" + "x" * 100000},
                 {"name": "v", "labels": "k" * 100000},
                 {"name": "v", "cos": "9" * 5000}, {"name": "v", "repl": "2" * 5000},
                 {"name": "v", "fs": "z" * 5000}):
        with pytest.raises(InvalidArgument) as ei:
            spec_from_options(opts)
        assert len(str(ei.value)) < 300 and "..." in str(ei.value), str(ei.value)[:300]
    with pytest.raises(InvalidArgument, match="has no name=|unknown volume option") as ei:
        parse_inline("size=1,x" + "y" * 10000 + "=1")
    assert len(str(ei.value)) < 300


def test_label_of_the_wrong_type_says_so():
    from pxfs.volume.spec import labels_from_pairs
    with pytest.raises(InvalidArgument, match="label 'a': keys and values must be strings"):
        labels_from_pairs([("a", 1)])


def test_mount_options():
    from pxfs.mount import DEFAULT_NODE, parse_options
    o = parse_options("_netdev,node=http://10.0.0.1:9001/,ro,allow_other,default_permissions,noatime")
    assert o["node"] == "http://10.0.0.1:9001" and o["flags"] == {"ro", "allow_other",
                                                                   "default_permissions"}
    assert parse_options("")["node"] == DEFAULT_NODE
    for bad in ("ro,rw", "bogus", "node=10.0.0.1:9001", "allow_other=1", "max_read=5"):
        with pytest.raises(InvalidArgument):
            parse_options(bad)


def test_label_key_twice_refused():
    with pytest.raises(InvalidArgument, match="label 'a' given twice"):
        spec_from_options({"name": "v", "label": "a=b,a=c"})


def test_dot_names_say_so():
    for name in (".", ".."):
        with pytest.raises(InvalidArgument, match="is not allowed"):
            validate_name(name)


def test_shared_volume_with_fs_refused():
    with pytest.raises(InvalidArgument, match="shared volume"):
        spec_from_options({"name": "v", "shared": "true", "fs": "xfs"})


def test_cos_error_names_the_words_too():
    with pytest.raises(InvalidArgument, match="low, medium, high"):
        spec_from_options({"name": "v", "cos": "ultra"})


def test_rest_labels_and_nodes_are_checked_one_by_one():
    from pxfs.api.app import create_options
    with pytest.raises(InvalidArgument, match="label 'x=1,y=2'"):
        create_options({"name": "v", "labels": {"x": "1,y=2"}})
    with pytest.raises(InvalidArgument, match="not a node id"):
        create_options({"name": "v", "nodes": ["node1;node2"], "repl": 2})
    for odd in (None, 3, ["n1"]):          # JSON null, a number, a list: said plainly
        with pytest.raises(InvalidArgument, match="^nodes: each must be a node id, given as a "
                           "string$"):
            create_options({"name": "v", "nodes": ["n1", odd]})
    spec = spec_from_options(create_options({"name": "v", "labels": {"a": "b", "c": "d"},
                                             "nodes": ["n1", "n2"]}))
    assert spec.labels == (("a", "b"), ("c", "d")) and spec.nodes == ("n1", "n2")
    assert spec_from_options(create_options({"name": "v", "labels": "a=b,c=d"})).labels == \
        (("a", "b"), ("c", "d"))


def test_fs_is_taken_in_any_case():
    assert spec_from_options({"name": "v", "fs": "XFS"}).fs == "xfs"
    assert spec_from_options({"name": "v", "fs": " Ext4 "}).fs == "ext4"


def test_a_huge_size_is_not_echoed_whole():
    from pxfs.volume.spec import parse_size
    with pytest.raises(InvalidArgument, match="above the maximum") as exc:
        parse_size("9" * 300)
    assert len(str(exc.value)) < 120
    assert parse_size("0" * 60 + "1G") == 1 << 30           # a long but valid number still parses
