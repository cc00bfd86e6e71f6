"""pxctl: the command line of pxfs, shaped after Portworx's pxctl.

    pxctl [-j] [--host URL] status
    pxctl volume create NAME [--size 10] [--repl 2] [--fs ext4] [--block_size 32] [--cos 1]
                             [--label k=v,k2=v2] [--nodes n1,n2] [--shared]
    pxctl volume create size=10,repl=2,name=NAME          (inline spec)
    pxctl volume list | inspect VOL | delete VOL
    pxctl host attach VOL | detach VOL | mount VOL [--path P] | unmount VOL

Exit status: 0 success, 1 the operation failed, 2 bad usage.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from urllib.parse import quote, urlencode, urlsplit

import click

from .client import ApiError, Client

DEFAULT_HOST = "http://127.0.0.1:9001"


def human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _timeout() -> float:
    """Seconds to wait for a node's answer: PXCTL_TIMEOUT, default 120 (a
    first mount of a large volume formats it before answering)."""
    raw = os.environ.get("PXCTL_TIMEOUT", "").strip()
    if not raw:
        return 120.0
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 86400:
        raise click.UsageError(f"PXCTL_TIMEOUT {raw!r}: expected a number of seconds in (0, 86400]")
    return value


class Ctx:
    def __init__(self, host: str, as_json: bool):
        self.client = Client(host, timeout=_timeout())
        self.json = as_json

    def out(self, data, text_fn):
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            text_fn(data)


def _run(ctx: Ctx, fn, render):
    try:
        data = fn()
    except ApiError as exc:
        click.echo(f"pxctl: {exc}", err=True)
        sys.exit(1)
    ctx.out(data, render)


def _single(ctx, param, values):
    """The one value of an option that takes one: given twice, which one
    was meant is a guess (the API and inline specs refuse a repeat too)."""
    if len(values) > 1:
        raise click.BadParameter(f"given {len(values)} times ({', '.join(map(repr, values))}); "
                                 "give it once", ctx=ctx, param=param)
    return values[0] if values else None


def once(*decls, **kw):
    """click.option for a value that may be given only once."""
    return click.option(*decls, multiple=True, callback=_single, **kw)


def _global_opts(f):
    f = click.option("-j", "--json", "as_json", is_flag=True, default=None, help="machine-readable output")(f)
    f = once("--host", help="node API URL (env PXCTL_HOST)")(f)
    return f


def _url_problem(url: str) -> str | None:
    """What is wrong with a node API URL (None: nothing), said before any
    request: httpx would call a port of 99999 "connection refused"."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:       # a port out of range or not a number, a bad [v6]
        return f"not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "no http:// or https:// scheme"
    if not parts.hostname:
        return "no host name"
    if port == 0:
        return "port 0"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # glued in front of every API path, it made "no such API endpoint"
        return "a path, query or fragment after the port"
    return None


def _ctx(click_ctx, host, as_json) -> Ctx:
    parent = click_ctx.find_object(dict) or {}
    if "" in (host, parent.get("host")):
        raise click.BadParameter("expected a node's API URL such as http://127.0.0.1:9001, "
                                 "not an empty string", param_hint="'--host'")
    given = host or parent.get("host")
    host = given or os.environ.get("PXCTL_HOST") or DEFAULT_HOST
    problem = _url_problem(host)
    if problem:
        raise click.BadParameter(f"{problem} in {host!r}; expected a node's API URL such as "
                                 "http://127.0.0.1:9001",
                                 param_hint="'--host'" if given else "PXCTL_HOST")
    if as_json is None:
        as_json = parent.get("json", False)
    return Ctx(host, as_json)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-j", "--json", "as_json", is_flag=True, help="machine-readable output")
@once("--host", help="node API URL (env PXCTL_HOST, default http://127.0.0.1:9001)")
@click.pass_context
def cli(ctx, as_json, host):
    """pxfs control."""
    ctx.obj = {"json": as_json, "host": host}


# -- status -------------------------------------------------------------------
def _render_status(s):
    me = s["this_node"]
    if s.get("problem"):
        click.echo(f"Status: PX is not operational: {s['problem']}")
    else:
        click.echo("Status: PX is operational")
    click.echo(f"Node ID: {me['id']}")
    click.echo(f"\tAPI: {me['api']}  Data: {me['data']}")
    click.echo(f"\tLocal Storage Pool: {len(me['pools'])} pool")
    click.echo("\tPOOL\tIO_PRIORITY\tSIZE\tUSED\tSTATUS")
    click.echo(f"\t0\tLOW\t\t{human(me['pool_total'])}\t{human(me['pool_used'])}\tOnline")
    click.echo(f"\tLocal Storage Devices: {len(me['devices'])} device(s)")
    for i, d in enumerate(me["devices"]):
        click.echo(f"\t0:{i + 1}\t{d}")
    click.echo("Cluster Summary")
    click.echo(f"\tCluster ID: {s['cluster_id']}")
    if s.get("problem"):
        click.echo("\tthe nodes are unknown while etcd does not answer")
        return
    rows = [("ID", "API", "DATA", "USED", "CAPACITY", "STATUS")]
    used = total = 0
    for n in s["nodes"]:
        st = n["status"] + (" (This node)" if n["id"] == me["id"] else "")
        rows.append((n["id"], n["api"], n["data"], human(n["pool_used"]), human(n["pool_total"]), st))
        if n["status"] == "Online":
            used += n["pool_used"]
            total += n["pool_total"]
    for line in _table(rows):
        click.echo("\t" + line)
    click.echo("Global Storage Pool")
    click.echo(f"\tTotal Used    \t:  {human(used)}")
    click.echo(f"\tTotal Capacity\t:  {human(total)}")


def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


@cli.command()
@_global_opts
@click.pass_context
def status(click_ctx, host, as_json):
    """Show the cluster and this node."""
    ctx = _ctx(click_ctx, host, as_json)
    _run(ctx, lambda: ctx.client.get("/v1/cluster/status"), _render_status)


@cli.group("cluster")
def cluster_group():
    """Manage the cluster's nodes."""


@cluster_group.command("delete")
@click.argument("node_id")
@_global_opts
@click.pass_context
def cluster_delete(click_ctx, node_id, host, as_json):
    """Remove an Offline node that holds no replica from the cluster."""
    ctx = _ctx(click_ctx, host, as_json)
    _run(ctx, lambda: ctx.client.delete(f"/v1/cluster/nodes/{quote(node_id, safe='')}"),
         lambda v: click.echo(f"Node {v['node']} successfully removed from the cluster."))


# -- volume -------------------------------------------------------------------
@cli.group("volume")
def volume():
    """Manage volumes."""


cli.add_command(volume, "v")


@volume.command("create")
@click.argument("name")
@once("-s", "--size", help="size, GiB by default; units M, MiB, G, GiB, T (default 1)")
@once("--fs", help="ext4, xfs or none (default ext4)")
@once("-b", "--block_size", help="block size in KiB (default 32)")
@once("-r", "--repl", help="replication factor 1..3 (default 1)")
@once("--cos", "--io_priority", "cos", help="class of service 1..9 or low/medium/high")
@click.option("-l", "--label", multiple=True, help="labels k=v,k2=v2 (may be repeated)")
@once("--nodes", help="pin replicas: node ids n1,n2")
@click.option("--shared", is_flag=True, default=False, help="shared namespace volume")
@_global_opts
@click.pass_context
def volume_create(click_ctx, name, size, fs, block_size, repl, cos, label, nodes, shared, host, as_json):
    """Create a volume.  NAME may also be an inline spec such as
    size=10,repl=2,name=dbvol (the form Docker and DC/OS use)."""
    ctx = _ctx(click_ctx, host, as_json)
    flags = (("size", size), ("fs", fs), ("block_size", block_size), ("repl", repl),
             ("cos", cos), ("labels", ",".join(label) if label else None), ("nodes", nodes))
    if "=" in name:
        given = [k for k, v in flags if v is not None] + (["shared"] if shared else [])
        if given:
            flag = {"labels": "label"}.get(given[0], given[0])
            click.echo(f"pxctl: give either an inline spec or flags, not both (--{flag})",
                       err=True)
            sys.exit(2)
        body = {"spec": name}
    else:
        body = {"name": name}
        for key, value in flags:
            if value is not None:
                body[key] = value
        if nodes is not None:
            body["nodes"] = nodes.replace(";", ",").split(",")
        if shared:
            body["shared"] = True
    _run(ctx, lambda: ctx.client.post("/v1/volumes", body),
         lambda v: click.echo(f"Volume successfully created: {v['id']}"))


def _status_text(v):
    text = v["status_text"]
    if v.get("attached_on") and v.get("data_local") is False:
        text += " *"
    return text


def _render_list(vols):
    rows = [("ID", "NAME", "SIZE", "HA", "SHARED", "ENCRYPTED", "IO_PRIORITY", "SCALE", "STATUS")]
    star = False
    for v in vols:
        rows.append((v["id"], v["name"], human(v["size"]), v["ha"], "yes" if v["shared"] else "no",
                     "yes" if v["encrypted"] else "no", v["io_priority"], v["scale"], _status_text(v)))
        star = star or _status_text(v).endswith("*")
    for line in _table(rows):
        click.echo(line)
    if star:
        click.echo("* Data is not local to the node on which volume is attached.")


@volume.command("list")
@once("--name", help="only the volume of this name")
@click.option("--label", "-l", multiple=True, help="only volumes with all these labels (k=v,k2=v2; "
              "may be repeated)")
@once("--node-id", help="only volumes with a replica on this node")
@_global_opts
@click.pass_context
def volume_list(click_ctx, name, label, node_id, host, as_json):
    """List volumes."""
    ctx = _ctx(click_ctx, host, as_json)
    label = ",".join(label) if label else None
    query = urlencode([(k, v) for k, v in (("name", name), ("label", label), ("node", node_id))
                       if v is not None])
    _run(ctx, lambda: ctx.client.get("/v1/volumes" + (f"?{query}" if query else "")),
         _render_list)


volume.add_command(volume_list, "l")


def _replica_text(r):
    if r["state"] == "resyncing" and not r.get("total_bytes"):
        return "resyncing (starting)"
    if r["state"] == "resyncing":
        return (f"resyncing {r.get('percent', 0):.1f}% ({human(r.get('done_bytes', 0))}"
                f" of {human(r.get('total_bytes', 0))})")
    return {"in_sync": "in sync", "out_of_sync": "out of sync"}.get(r["state"], r["state"])


def _render_inspect(v):
    ts = datetime.datetime.fromtimestamp(v["ctime"]).strftime("%Y-%m-%d %H:%M:%S")
    rows = [("Volume", v["id"]), ("Name", v["name"]), ("Size", human(v["size"])),
            ("Format", v["fs"]), ("HA", v["ha"]), ("Block size", human(v["block_size"])),
            ("IO Priority", v["io_priority"]), ("Creation time", ts),
            ("Shared", "yes" if v["shared"] else "no"), ("Status", v["status"].upper()),
            ("State", f"Attached: {v['attached_on']}" if v["attached_on"] else
             v["state"] if v["shared"] else "detached"),
            ("Device Path", v["device_path"] or "-"),
            ("Mount Path", ", ".join(f"{m['node']}:{m['path']}"
                                     + (" (stale: mount again)" if m.get("stale") else "")
                                     for m in v.get("mounts", []))
             if v["shared"] else v["mount_path"] or "-") or "-",
            ("Labels", ",".join(f"{k}={x}" for k, x in v["labels"].items()) or "-"),
            ("Bytes used", human(v.get("bytes_used"))), ("Attach term", v["term"])]
    if v.get("io_stopped"):
        here = v.get("stopped_here") or {}
        where = ", ".join(x for x in (here.get("device"), here.get("mount") and
                                      f"mounted at {here['mount']}") if x)
        rows.append(("I/O", f"STOPPED on this node ({v['io_stopped']})"
                            + (f"; still here: {where}" if where else "")
                            + ("; unmount, detach" if here.get("mount") else "; detach")
                            + " and attach again"))
    if v.get("io"):
        io = v["io"]
        rows += [("Reads", io["reads"]), ("Bytes Read", io["bytes_read"]),
                 ("Writes", io["writes"]), ("Bytes Written", io["bytes_written"])]
        if io.get("discards"):
            rows.append(("Bytes Discarded", io["bytes_discarded"]))
        if io.get("errors"):
            ago = max(0, int(time.time() - io.get("last_error_at", 0)))
            rows.append(("I/O errors", f"{io['errors']}, the last {ago} s ago: "
                                       f"{io.get('last_error', '')}"))
    w = max(len(k) for k, _ in rows)
    for k, x in rows:
        click.echo(f"{k.ljust(w)} : {x}")
    click.echo("Replica sets on nodes:")
    click.echo("\tSet 0")
    for r in v["replicas"]:
        click.echo(f"\t  Node : {r['node']} ({r['address']})  {_replica_text(r)}")
    active = v["attached_on"] or (v["shared"] and v.get("mounts"))
    click.echo(f"Replication Status : {v['status'].capitalize() if active else 'Detached'}")


@volume.command("inspect")
@click.argument("volumes", nargs=-1, required=True)
@_global_opts
@click.pass_context
def volume_inspect(click_ctx, volumes, host, as_json):
    """Show a volume's spec, attach state and replicas."""
    ctx = _ctx(click_ctx, host, as_json)
    data = []
    failed = False
    for ref in volumes:      # each one found is shown; each one not is said
        try:
            data.append(ctx.client.get(f"/v1/volumes/{quote(ref, safe='')}"))
        except ApiError as exc:
            click.echo(f"pxctl: {exc}", err=True)
            failed = True
    if not data:
        sys.exit(1)
    if ctx.json:
        # the shape follows what was asked (one volume: an object; several:
        # a list of those found), not how many were found
        click.echo(json.dumps(data[0] if len(volumes) == 1 else data, indent=2, sort_keys=True))
    else:
        for i, v in enumerate(data):
            if i:
                click.echo()
            _render_inspect(v)
    if failed:
        sys.exit(1)


volume.add_command(volume_inspect, "i")


@volume.command("delete")
@click.argument("ref")
@_global_opts
@click.pass_context
def volume_delete(click_ctx, ref, host, as_json):
    """Delete a detached volume and its data."""
    ctx = _ctx(click_ctx, host, as_json)
    _run(ctx, lambda: ctx.client.delete(f"/v1/volumes/{quote(ref, safe='')}"),
         lambda v: click.echo(f"Volume {v['name']} successfully deleted."))


def _repl(click_ctx, param, values):
    value = _single(click_ctx, param, values)
    if value is None:
        raise click.BadParameter("is required: the number of replicas wanted, one more or one "
                                 "fewer than now")
    if not value.isascii() or not value.isdigit():
        raise click.BadParameter(f"{value!r} is not a whole number")
    return int(value)


def _render_ha(v):
    name = v["volume"]["name"]
    if v["action"] == "add":
        click.echo(f"Replication update started successfully: a replica of {name} is being "
                   f"copied to {v['node']} (`pxctl volume inspect {name}` shows its progress).")
    else:
        click.echo(f"Replication update done: the replica of {name} on {v['node']} was removed.")


@volume.command("ha-update")
@click.argument("ref")
@click.option("-r", "--repl", multiple=True, callback=_repl,
              help="replicas wanted: one more (a copy is made) or one fewer than now")
@once("--node", help="the node to add the replica on, or to remove it from (default: pxfs "
                     "chooses)")
@_global_opts
@click.pass_context
def volume_ha_update(click_ctx, ref, repl, node, host, as_json):
    """Add or remove one replica of a volume.  An added replica is copied
    from an in-sync one while the volume stays in use."""
    ctx = _ctx(click_ctx, host, as_json)
    body = {"repl": repl}
    if node is not None:
        body["node"] = node
    _run(ctx, lambda: ctx.client.post(f"/v1/volumes/{quote(ref, safe='')}/ha", body), _render_ha)


# -- host ---------------------------------------------------------------------
@cli.group("host")
def host_group():
    """Attach, detach, mount and unmount volumes on a node."""


@host_group.command("attach")
@click.argument("ref")
@_global_opts
@click.pass_context
def host_attach(click_ctx, ref, host, as_json):
    """Attach a volume to this node; prints the block device."""
    ctx = _ctx(click_ctx, host, as_json)
    _run(ctx, lambda: ctx.client.post(f"/v1/volumes/{quote(ref, safe='')}/attach"),
         lambda v: click.echo(f"Volume successfully attached at: {v['device']}"))


@host_group.command("detach")
@click.argument("ref")
@_global_opts
@click.pass_context
def host_detach(click_ctx, ref, host, as_json):
    """Detach a volume from this node."""
    ctx = _ctx(click_ctx, host, as_json)
    _run(ctx, lambda: ctx.client.post(f"/v1/volumes/{quote(ref, safe='')}/detach"),
         lambda v: click.echo(f"Volume {v['name']} successfully detached"))


@host_group.command("mount")
@click.argument("ref")
@once("--path", help="mount point (default <osd root>/mounts/<name>)")
@_global_opts
@click.pass_context
def host_mount(click_ctx, ref, path, host, as_json):
    """Format on first use and mount a volume on this node."""
    ctx = _ctx(click_ctx, host, as_json)
    body = {"path": os.path.abspath(path)} if path else {}
    def show(v):
        click.echo(f"Volume {v['name']} successfully mounted at {v['mount']}")
        if v.get("warning"):
            click.echo(f"pxctl: warning: {v['warning']}", err=True)
    _run(ctx, lambda: ctx.client.post(f"/v1/volumes/{quote(ref, safe='')}/mount", body), show)


@host_group.command("unmount")
@click.argument("ref")
@once("--path", help="only the mount at this path (shared volumes: one "
              "of the node's mounts)")
@_global_opts
@click.pass_context
def host_unmount(click_ctx, ref, path, host, as_json):
    """Unmount a volume on this node."""
    ctx = _ctx(click_ctx, host, as_json)
    body = {"path": os.path.abspath(path)} if path else None
    _run(ctx, lambda: ctx.client.post(f"/v1/volumes/{quote(ref, safe='')}/unmount", body),
         lambda v: click.echo(f"Volume {v['name']} successfully unmounted"))


def main():
    try:
        rv = cli.main(standalone_mode=False, prog_name="pxctl")
    except click.exceptions.NoArgsIsHelpError as exc:      # bare `pxctl`, `pxctl volume`
        click.echo(exc.ctx.get_help(), err=True)
        sys.exit(2)
    except click.UsageError as exc:
        # one line, like every other pxctl error: a wrong flag, a missing argument
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo("pxctl: " + " ".join(exc.format_message().split()) + hint, err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo("pxctl: " + " ".join(exc.format_message().split()), err=True)
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):     # click turns Ctrl-C into Abort
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
