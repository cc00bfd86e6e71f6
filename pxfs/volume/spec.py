"""Volume specs: names, sizes and the option keywords shared by pxctl flags,
the REST API, Docker ``--opt`` and the inline spec ``size=100,repl=2,name=v``.

``spec_from_options`` is the one parser; every entry point turns its input
into a {keyword: string} map and calls it.
"""

from __future__ import annotations

import dataclasses
import decimal
import re

from ..errors import InvalidArgument

GiB = 1 << 30
MiB = 1 << 20
MIN_SIZE = 64 * MiB
MIN_XFS_SIZE = 320 * MiB
MAX_SIZE = 64 << 40
FILESYSTEMS = ("ext4", "xfs", "none")
MAX_NAME = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+@-]*$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,62}$")
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_UNITS = {"": GiB, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}

#: alternative spellings -> canonical keyword
ALIASES = {"ha": "repl", "bs": "block_size", "io_priority": "cos", "priority_io": "cos",
           "labels": "label"}
KEYWORDS = ("name", "size", "fs", "block_size", "repl", "cos", "label", "nodes", "shared")


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    name: str
    size: int = GiB
    fs: str = "ext4"
    block_size: int = 32 * 1024
    repl: int = 1
    cos: int = 1
    labels: tuple[tuple[str, str], ...] = ()
    nodes: tuple[str, ...] = ()
    shared: bool = False

    def to_record(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"] = dict(self.labels)
        d["nodes"] = list(self.nodes)
        return d


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgument("volume name must be a non-empty string")
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"volume name is longer than {MAX_NAME} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArgument("volume name must not contain control characters")
    if name in (".", ".."):
        raise InvalidArgument(f"volume name {name!r} is not allowed")
    if "/" in name or ".." in name:
        raise InvalidArgument(f"volume name {name!r} must not contain '/' or '..'")
    if not _NAME_RE.match(name):
        raise InvalidArgument(f"volume name {name!r} may only hold ASCII letters, digits and _ . + @ -, "
                              "and must start with a letter, digit or _")
    if name.isdigit():
        raise InvalidArgument(f"volume name {name!r} must not be all digits (that is how ids look)")
    return name


def _shown(value: object) -> str:
    """``value`` quoted for an error message, its middle cut when long: no
    use echoing a number of 300 digits or a label of 100 KB."""
    text = str(value)
    return repr(text if len(text) <= 40 else text[:20] + "..." + text[-8:])


def parse_size(value: object, minimum: int = MIN_SIZE) -> int:
    """Bytes from '10', '10G', '512MiB', '2T' (a bare number is GiB)."""
    text = str(value).strip()
    shown = _shown(text)
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", text)   # ASCII digits only
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidArgument(f"size {shown}: expected a number of GiB or a number with "
                              "a unit K, M, G or T (KiB, KB, MiB, MB, ... all mean powers of "
                              "1024; e.g. 10, 512M, 2G)")
    # up to whole 4 KiB blocks: a volume is never smaller than asked for
    # (as provisioners round a claim up)
    exact = decimal.Decimal(m.group(1)) * _UNITS[m.group(2).lower()]
    if exact > MAX_SIZE:        # before any arithmetic on a number of 400 digits
        raise InvalidArgument(f"size {shown} is above the maximum of 64 TiB")
    size = int((exact / 4096).to_integral_value(rounding=decimal.ROUND_CEILING)) * 4096
    if size < minimum:
        raise InvalidArgument(f"size {shown} is below the minimum of {minimum >> 20} MiB")
    if size > MAX_SIZE:
        raise InvalidArgument(f"size {shown} is above the maximum of 64 TiB")
    return size


def _int_in(key: str, value: str, lo: int, hi: int) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", value.strip()):     # (int() of 5000 digits raises)
        raise InvalidArgument(f"{key} {_shown(value)}: expected a whole number in {lo}..{hi}")
    n = int(value)
    if not lo <= n <= hi:
        raise InvalidArgument(f"{key} {_shown(value)}: expected a whole number in {lo}..{hi}")
    return n


def parse_cos(value: str) -> int:
    named = {"low": 1, "medium": 5, "high": 9}
    if value.strip().lower() in named:
        return named[value.strip().lower()]
    if not re.fullmatch(r"[0-9]{1,18}", value.strip()) or not 1 <= int(value) <= 9:
        raise InvalidArgument(f"cos {_shown(value)}: expected low, medium, high or a whole number in 1..9")
    return int(value)


def cos_name(cos: int) -> str:
    return "LOW" if cos <= 3 else "MEDIUM" if cos <= 6 else "HIGH"


def parse_block_size(value: str) -> int:
    text = value.strip()
    kib = int(text) if re.fullmatch(r"[0-9]{1,5}", text) else 0
    if not 4 <= kib <= 1024 or kib & (kib - 1):
        raise InvalidArgument(f"block_size {_shown(value)}: expected a power of two in KiB, 4..1024")
    return kib * 1024


def check_label(key: object, value: object) -> tuple[str, str]:
    """One label; keys and values are what Kubernetes allows, so they never
    hold the separators of the k=v,k2=v2 form."""
    if not isinstance(key, str) or not isinstance(value, str):
        raise InvalidArgument(f"label {_shown(key)}: keys and values must be strings")
    if not _LABEL_RE.match(key) or not re.fullmatch(r"[A-Za-z0-9_./-]{0,63}", value):
        raise InvalidArgument(f"label {_shown(f'{key}={value}')}: expected key=value of letters, "
                              "digits and _ . / - (keys up to 63, values up to 63 characters)")
    return key, value


MAX_LABELS = 64     # keeps a volume's record far below etcd's request limit


def labels_from_pairs(pairs) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    pairs = list(pairs)
    if len(pairs) > MAX_LABELS:
        raise InvalidArgument(f"{len(pairs)} labels given; a volume takes at most {MAX_LABELS}")
    for k, v in pairs:
        k, v = check_label(k, v)
        if k in out:
            raise InvalidArgument(f"label {_shown(k)} given twice")
        out[k] = v
    return tuple(sorted(out.items()))


def parse_labels(value: str, sep: str = ",") -> tuple[tuple[str, str], ...]:
    pairs = []
    for part in value.split(sep):
        k, eq, v = part.partition("=")
        if not eq:
            raise InvalidArgument(f"label {_shown(part)}: expected key=value")
        pairs.append((k.strip(), v.strip()))
    return labels_from_pairs(pairs)


def check_node(node: object) -> str:
    if not isinstance(node, str):
        # a REST body's null or number: not echoed as Python writes it
        raise InvalidArgument("nodes: each must be a node id, given as a string")
    if not _NODE_RE.match(node):
        raise InvalidArgument(f"nodes: {_shown(node)} is not a node id")
    return node


def parse_nodes(value: str, sep: str = ";") -> tuple[str, ...]:
    nodes = tuple(check_node(n.strip()) for n in value.split(sep))
    if len(set(nodes)) != len(nodes):
        shown = ",".join(nodes)
        raise InvalidArgument(f"nodes {shown}: a node is named twice")
    return nodes


def parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "yes", "on", "1"):
        return True
    if v in ("false", "no", "off", "0"):
        return False
    raise InvalidArgument(f"{key} {_shown(value)}: expected true or false")


def spec_from_options(options: dict[str, str], name: str | None = None) -> VolumeSpec:
    """The one parser of volume options (pxctl, REST, Docker, inline spec)."""
    fields: dict = {}
    seen = set()
    for raw_key, value in options.items():
        key = ALIASES.get(raw_key.strip().lower(), raw_key.strip().lower())
        if key not in KEYWORDS:
            raise InvalidArgument(f"unknown volume option {_shown(raw_key)}; known: "
                                  + ", ".join(KEYWORDS + tuple(ALIASES)))
        if key in seen:
            raise InvalidArgument(f"volume option {key!r} given twice")
        seen.add(key)
        if not isinstance(value, str):
            raise InvalidArgument(f"volume option {_shown(raw_key)} must be a string")
        if key == "name":
            fields["name"] = validate_name(value)
        elif key == "size":
            fields["size"] = parse_size(value)
        elif key == "fs":
            if value.strip().lower() not in FILESYSTEMS:
                raise InvalidArgument(f"fs {_shown(value)}: expected one of {', '.join(FILESYSTEMS)}")
            fields["fs"] = value.strip().lower()
        elif key == "block_size":
            fields["block_size"] = parse_block_size(value)
        elif key == "repl":
            fields["repl"] = _int_in("repl", value, 1, 3)
        elif key == "cos":
            fields["cos"] = parse_cos(value)
        elif key == "label":
            fields["labels"] = parse_labels(value, ";" if ";" in value else ",")
        elif key == "nodes":
            fields["nodes"] = parse_nodes(value, ";" if ";" in value else ",")
        elif key == "shared":
            fields["shared"] = parse_bool("shared", value)
    if name is not None:
        if "name" in fields and fields["name"] != name:
            raise InvalidArgument(f"two names given: {name!r} and {fields['name']!r}")
        fields["name"] = validate_name(name)
    if "name" not in fields:
        raise InvalidArgument("a volume name is required")
    if "nodes" in fields:
        if "repl" not in fields:
            fields["repl"] = len(fields["nodes"])
        elif fields["repl"] != len(fields["nodes"]):
            n = len(fields["nodes"])
            raise InvalidArgument(f"nodes lists {n} node{'s' if n > 1 else ''} but repl is "
                                  f"{fields['repl']}: name one node per replica")
    if fields.get("shared") and "fs" in fields:
        raise InvalidArgument(f"fs {fields['fs']!r}: a shared volume is a POSIX namespace, "
                              "not a formatted block image; leave fs out")
    if fields.get("fs") == "xfs" and fields.get("size", GiB) < MIN_XFS_SIZE:
        raise InvalidArgument("xfs needs a volume of at least 320 MiB")
    return VolumeSpec(**fields)


def parse_inline(text: str) -> VolumeSpec:
    """``size=100,repl=2,name=mysql_vol``; without ``name=`` the whole string
    is the name (Docker's ``-v NAME:/path`` form)."""
    if "=" not in text:
        return VolumeSpec(name=validate_name(text))
    options: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise InvalidArgument(f"inline spec part {_shown(part)} is not key=value")
        key = ALIASES.get(key.strip().lower(), key.strip().lower())
        if key in options:
            raise InvalidArgument(f"inline spec gives {key!r} twice")
        options[key] = value.strip()
    if "name" not in options:
        raise InvalidArgument(f"inline spec {_shown(text)} has no name=")
    return spec_from_options(options)
