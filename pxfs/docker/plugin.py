"""Docker's volume plugin protocol, driver ``pxd``, served on a unix socket.

    POST /Plugin.Activate             -> {"Implements": ["VolumeDriver"]}
    POST /VolumeDriver.Create         {"Name", "Opts"} -> {"Err"}
    POST /VolumeDriver.Remove         {"Name"} -> {"Err"}
    POST /VolumeDriver.Mount          {"Name", "ID"} -> {"Mountpoint", "Err"}
    POST /VolumeDriver.Unmount        {"Name", "ID"} -> {"Err"}
    POST /VolumeDriver.Path           {"Name"} -> {"Mountpoint", "Err"}
    POST /VolumeDriver.Get            {"Name"} -> {"Volume": {"Name", "Mountpoint", "Status"}, "Err"}
    POST /VolumeDriver.List           -> {"Volumes": [{"Name", "Mountpoint"}], "Err"}
    POST /VolumeDriver.Capabilities   -> {"Capabilities": {"Scope": "global"}}

A Docker volume name is a pxfs volume name, or an inline spec
(``size=10,repl=2,name=v``) that names the volume by its ``name=``, or a
name Docker generated when ``--opt name=v`` was given (kept as an alias).
Options are parsed by the same function as pxctl's and the REST API's.
Errors go back in ``Err`` with status 200, as Docker expects.
"""

from __future__ import annotations

import json
import logging
import re
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import codec
from ..errors import AlreadyExists, Busy, InvalidArgument, PxfsError
from ..meta import keys
from ..meta.kv import Delete, Put
from ..volume.spec import parse_inline, spec_from_options, validate_name
from .mounts import DockerMounts

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.docker.plugins.v1+json"
_GENERATED = re.compile(r"^[0-9a-f]{64}$")      # the name Docker makes up when none is given


def reply(body: dict) -> JSONResponse:
    return JSONResponse(body, media_type=MEDIA_TYPE)


async def _request(request: Request, *fields: str) -> dict:
    """The JSON body; each named field must be a non-empty string."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError, RecursionError):      # [[[[... nested too deep
        raise InvalidArgument("request body is not valid JSON") from None
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidArgument("request body must be a JSON object")
    for f in fields:
        if not isinstance(body.get(f), str) or not body[f]:
            raise InvalidArgument(f"{f} must be a non-empty string")
    return body


class Plugin:
    def __init__(self, node):
        self.node = node
        self.catalog = node.catalog
        self.kv, self.cid = node.catalog.kv, node.catalog.cid
        self.mounts = DockerMounts(node)

    # -- names ---------------------------------------------------------------
    async def resolve(self, name: str) -> dict:
        """The volume record Docker means by ``name``."""
        if "=" in name:
            name = parse_inline(name).name
        else:
            item = await self.kv.get(keys.docker_alias_key(self.cid, name))
            if item is not None:
                name = str(codec.unpack(item.value))
            else:
                validate_name(name)
        rec, _ = await self.catalog.get(name)
        return rec

    # -- operations ------------------------------------------------------------
    async def create(self, name: str, opts) -> None:
        if opts is None:
            opts = {}
        if not isinstance(opts, dict) or not all(isinstance(v, str) for v in opts.values()):
            raise InvalidArgument("Opts must be an object of strings")
        alias = None
        if "=" in name:
            if opts:
                raise InvalidArgument("give the volume's options either in its name "
                                      "(size=10,name=v) or as --opt, not both")
            spec = parse_inline(name)
        elif _GENERATED.match(name) and "name" in opts:
            spec, alias = spec_from_options(opts), name     # --opt name=v without --name
        else:
            spec = spec_from_options(opts, name=name)
        try:
            rec = await self.catalog.create(spec)
            log.info("docker created volume %s (%d)", spec.name, rec["id"])
        except AlreadyExists:
            rec, _ = await self.catalog.get(spec.name)      # as with Portworx: a no-op
        if alias:
            await self.kv.txn([], [Put(keys.docker_alias_key(self.cid, alias), codec.pack(rec["id"]))])

    async def remove(self, name: str) -> None:
        rec = await self.resolve(name)
        users = await self.mounts.users(rec["id"])
        _, _, nodes, _ = await self.catalog.snapshot()
        busy = {n: ids for n, ids in users.items() if nodes.get(n, {}).get("online")}
        if busy:
            where = ", ".join(f"{len(ids)} container mount(s) on {n}" for n, ids in sorted(busy.items()))
            raise Busy(f"volume {rec['name']!r} is in use: {where}")
        await self.catalog.delete(str(rec["id"]), mount_gone=self.node.shared_mounts.clear_if_gone)
        if name != rec["name"] and "=" not in name:
            await self.kv.txn([], [Delete(keys.docker_alias_key(self.cid, name))])

    async def describe(self, name: str, rec: dict) -> dict:
        cur = await self.mounts.record(rec["id"])
        vols, atts, nodes, progress = await self.catalog.snapshot()
        desc = self.catalog.describe(rec, atts.get(rec["id"]), nodes, progress)
        status = {"id": desc["id"], "name": rec["name"], "size": desc["size"], "repl": desc["ha"],
                  "fs": desc["fs"], "shared": desc["shared"], "io_priority": desc["io_priority"],
                  "status": desc["status_text"],
                  "replicas": [f"{r['node']}: {r['state']}" for r in desc["replicas"]]}
        if desc["labels"]:
            status["labels"] = desc["labels"]
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec["ctime"]))
        return {"Name": name, "Mountpoint": self.mounts.path_here(cur), "CreatedAt": created,
                "Status": status}

    async def list(self) -> list[dict]:
        here = {}
        for item in await self.kv.range(keys.docker_mount_prefix(self.cid, self.mounts.me)):
            cur = codec.unpack_record(item.value)
            here[int(keys.last_part(item.key))] = self.mounts.path_here(cur)
        vols, _, _, _ = await self.catalog.snapshot()
        return [{"Name": v["name"], "Mountpoint": here.get(v["id"], "")}
                for v in sorted(vols, key=lambda v: v["ctime"])]


def build_app(plugin: Plugin) -> Starlette:
    def route(fn):
        async def handler(request: Request):
            try:
                return reply(await fn(request))
            except PxfsError as exc:
                log.info("docker %s: %s", request.url.path, exc)
                return reply({"Err": str(exc)})
        return handler

    async def activate(request):
        return {"Implements": ["VolumeDriver"]}

    async def create(request):
        body = await _request(request, "Name")
        await plugin.create(body["Name"], body.get("Opts"))
        return {"Err": ""}

    async def remove(request):
        body = await _request(request, "Name")
        await plugin.remove(body["Name"])
        return {"Err": ""}

    async def mount(request):
        body = await _request(request, "Name", "ID")
        rec = await plugin.resolve(body["Name"])
        return {"Mountpoint": await plugin.mounts.mount(rec, body["ID"]), "Err": ""}

    async def unmount(request):
        body = await _request(request, "Name", "ID")
        rec = await plugin.resolve(body["Name"])
        await plugin.mounts.unmount(rec, body["ID"])
        return {"Err": ""}

    async def path(request):
        body = await _request(request, "Name")
        rec = await plugin.resolve(body["Name"])
        return {"Mountpoint": plugin.mounts.path_here(await plugin.mounts.record(rec["id"])), "Err": ""}

    async def get(request):
        body = await _request(request, "Name")
        rec = await plugin.resolve(body["Name"])
        return {"Volume": await plugin.describe(body["Name"], rec), "Err": ""}

    async def list_(request):
        await _request(request)
        return {"Volumes": await plugin.list(), "Err": ""}

    async def capabilities(request):
        return {"Capabilities": {"Scope": "global"}}

    routes = [Route("/Plugin.Activate", route(activate), methods=["POST"])]
    for op, fn in (("Create", create), ("Remove", remove), ("Mount", mount), ("Unmount", unmount),
                   ("Path", path), ("Get", get), ("List", list_), ("Capabilities", capabilities)):
        routes.append(Route(f"/VolumeDriver.{op}", route(fn), methods=["POST"]))
    return Starlette(routes=routes)

