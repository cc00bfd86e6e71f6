"""REST API of a node, under /v1.  Handlers validate the body, call one
service and return JSON; errors are ``{"error": message, "errno": n}``.

    GET    /v1/cluster/status                  cluster id, this node, all nodes
    GET    /v1/volumes                         every volume (describe form)
    POST   /v1/volumes                         create: {"name", "size", "fs", "block_size",
                                               "repl", "cos", "labels", "nodes"} or {"spec": inline}
    GET    /v1/volumes/{ref}                   inspect by name or id
    DELETE /v1/volumes/{ref}                   delete (refused while attached)
    POST   /v1/volumes/{ref}/attach            attach on this node -> device
    POST   /v1/volumes/{ref}/detach
    POST   /v1/volumes/{ref}/mount             {"path": optional absolute path}
    POST   /v1/volumes/{ref}/unmount
"""

from __future__ import annotations

import decimal
import errno
import json
import logging
import math
from urllib.parse import quote

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import InvalidArgument, PeerUnavailable, PxfsError, from_wire
from ..volume.haupdate import AttachedElsewhere
from ..volume.spec import check_label, check_node, parse_inline, parse_labels, spec_from_options

log = logging.getLogger(__name__)

_STATUS = {errno.EINVAL: 400, errno.ENOENT: 404, errno.EEXIST: 409, errno.EBUSY: 409,
           errno.ENOSPC: 507, errno.ESTALE: 409, errno.EAGAIN: 503, errno.E2BIG: 413}
_CREATE_FIELDS = {"name", "size", "fs", "block_size", "repl", "cos", "labels", "nodes", "shared", "spec"}


def error_response(exc: PxfsError) -> JSONResponse:
    return JSONResponse({"error": str(exc), "errno": exc.errno,
                         "kind": type(exc).__name__}, status_code=_STATUS.get(exc.errno, 500))


MAX_BODY = 1 << 20      # far above any valid request; read no further


async def _body(request: Request, allowed: set[str]) -> dict:
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY:
            raise InvalidArgument(f"request body is larger than {MAX_BODY} bytes",
                                  errno=errno.E2BIG)
    raw = bytes(raw)
    if not raw:
        return {}
    try:
        body = json.loads(raw, object_pairs_hook=_no_repeats)
    except _Repeated as exc:
        raise InvalidArgument(f"request body gives {exc.args[0]!r} twice") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidArgument("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown and not allowed:
        raise InvalidArgument(f"unknown field {unknown[0]!r}: this request takes no fields")
    if unknown:
        raise InvalidArgument(f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return body


class _Repeated(ValueError):
    pass


def _no_repeats(pairs: list) -> dict:
    """A JSON object whose key appears twice is an error, not 'the last
    one wins' (the same as a key given twice in an inline spec)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Repeated(k)
        out[k] = v
    return out


def create_options(body: dict) -> dict[str, str]:
    """REST create body -> the option map the spec parser takes."""
    opts = {}
    for key, value in body.items():
        if key == "labels":
            # an object, each pair checked before it is joined (a value
            # holding "," or "=" must not turn into more labels), or the
            # k=v,k2=v2 text pxctl's --label takes
            if isinstance(value, str):
                opts["label"] = value
                continue
            if not isinstance(value, dict):
                raise InvalidArgument("labels must be an object of strings or 'k=v,k2=v2'")
            if value:
                opts["label"] = ",".join("=".join(check_label(k, v)) for k, v in value.items())
        elif key == "nodes":
            if not isinstance(value, list):
                raise InvalidArgument("nodes must be a list of node ids")
            if value:
                opts["nodes"] = ";".join(check_node(n) for n in value)
        elif key in ("name", "fs"):
            if not isinstance(value, str):
                raise InvalidArgument(f"{key} must be a string")
            opts[key] = value
        elif key == "shared":
            if not isinstance(value, (bool, str)):
                raise InvalidArgument("shared must be true or false")
            opts[key] = value if isinstance(value, str) else ("true" if value else "false")
        elif key == "size" and isinstance(value, float) and math.isfinite(value):
            opts[key] = format(decimal.Decimal(repr(value)), "f")      # 1.5 as --size 1.5
        elif key == "size" and value == math.inf:                     # 1e400 in JSON
            raise InvalidArgument("size is above the maximum of 64 TiB")
        elif isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidArgument("size must be a number (GiB) or a string such as '10G'"
                                  if key == "size" else f"{key} must be a whole number or a string")
        else:
            opts[key] = str(value)
    return opts


_ACTIONS = ("attach", "detach", "mount", "unmount", "ha")


def list_filter(params):
    """A test for `GET /v1/volumes?name=N&label=k=v,k2=v2&node=ID`: the
    volume named (or numbered) N, carrying every label given, with a replica on node ID
    (as `pxctl volume list --name --label --node-id`).  Each at most once;
    any other parameter is an error, not ignored."""
    got: dict[str, str] = {}
    for key, value in params:
        if key not in ("name", "label", "node"):
            raise InvalidArgument(f"unknown query parameter {key!r} (name, label and node "
                                  "filter the list)")
        if key in got:
            raise InvalidArgument(f"query parameter {key!r} is given twice")
        if not value:
            raise InvalidArgument(f"query parameter {key!r} is empty")
        got[key] = value
    labels = dict(parse_labels(got["label"])) if "label" in got else {}
    node_id = check_node(got["node"]) if "node" in got else None

    def keep(v: dict) -> bool:
        return (got.get("name", v["name"]) in (v["name"], v["id"])
                and all(v["labels"].get(k) == x for k, x in labels.items())
                and (node_id is None or any(r["node"] == node_id for r in v["replicas"])))
    return keep


_FORWARDED = "x-pxfs-forwarded-by"
FORWARD_TIMEOUT = 60.0      # within pxctl's own wait (PXCTL_TIMEOUT, 120 s)


async def _forward(exc, path: str, body: dict) -> dict:
    """POST ``body`` to the node named by ``exc`` (AttachedElsewhere) and
    return its answer; its error is raised here as it was raised there."""
    try:
        async with httpx.AsyncClient(timeout=FORWARD_TIMEOUT) as http:
            res = await http.post(exc.api.rstrip("/") + path, json=body,
                                  headers={_FORWARDED: "1"})
        data = res.json()
    except (httpx.HTTPError, ValueError) as err:
        raise PeerUnavailable(f"{exc} -- and its API does not answer: {err}") from None
    if res.status_code == 200:
        return data
    raise from_wire(str(data.get("kind", "")), str(data.get("error", res.text)))


def build_app(node) -> Starlette:
    """``node`` offers status(), catalog, attachments, describe_all(), inspect()."""

    def route(fn):
        async def handler(request: Request):
            ref = request.path_params.get("ref", "")
            if fn in (inspect, delete) and "/" in ref and ref.rpartition("/")[2] in _ACTIONS:
                # GET/DELETE .../v/attach: an action path with the wrong
                # method, not a volume named 'v/attach' (names hold no '/')
                raise HTTPException(405, headers={"Allow": "POST"})
            try:
                if request.query_params and fn is not list_volumes:
                    # (POST .../attach?node=node2 reads as if it chose the node)
                    name = next(iter(request.query_params))
                    raise InvalidArgument(f"unknown query parameter {name!r}: only GET "
                                          "/v1/volumes takes any")
                return JSONResponse(await fn(request))
            except PxfsError as exc:
                return error_response(exc)
        return handler

    async def status(request):
        return await node.status()

    async def cluster_config(request):
        return node.cluster_config()

    async def list_volumes(request):
        keep = list_filter(request.query_params.multi_items())
        return [v for v in await node.describe_all() if keep(v)]

    async def create(request):
        body = await _body(request, _CREATE_FIELDS)
        if "spec" in body:
            if set(body) != {"spec"} or not isinstance(body["spec"], str):
                raise InvalidArgument("'spec' must be a string and given alone")
            spec = parse_inline(body["spec"])
        else:
            spec = spec_from_options(create_options(body))
        rec = await node.catalog.create(spec)
        return await node.inspect(str(rec["id"]))

    async def inspect(request):
        return await node.inspect(request.path_params["ref"])

    async def delete(request):
        await _body(request, set())
        rec = await node.catalog.delete(request.path_params["ref"],
                                        mount_gone=node.shared_mounts.clear_if_gone)
        return {"id": str(rec["id"]), "name": rec["name"], "deleted": True}

    async def attach(request):
        await _body(request, set())
        return await node.attach(request.path_params["ref"])

    async def detach(request):
        await _body(request, set())
        await node.refuse_docker_held(request.path_params["ref"])
        return await node.detach(request.path_params["ref"])

    async def mount(request):
        body = await _body(request, {"path"})
        path = body.get("path")
        if path is not None and not isinstance(path, str):
            raise InvalidArgument("path must be a string")
        return await node.mount(request.path_params["ref"], path)

    async def unmount(request):
        body = await _body(request, {"path"})
        path = body.get("path")
        if path is not None and not isinstance(path, str):
            raise InvalidArgument("path must be a string")
        await node.refuse_docker_held(request.path_params["ref"], path)
        return await node.unmount(request.path_params["ref"], path)

    async def ha_update(request):
        body = await _body(request, {"repl", "node"})
        if "repl" not in body:
            raise InvalidArgument("repl is required: the number of replicas wanted (one more "
                                  "or one fewer than now)")
        ref = request.path_params["ref"]
        try:
            done = await node.ha.update(ref, body["repl"], body.get("node"))
        except AttachedElsewhere as exc:
            # a replica of an attached volume is removed by the node it is
            # attached on: hand the request over once (never on again)
            if request.headers.get(_FORWARDED) or not exc.api:
                raise
            return await _forward(exc, f"/v1/volumes/{quote(ref, safe='')}/ha", body)
        return dict(done, volume=await node.inspect(ref))

    async def remove_node(request):
        await _body(request, set())
        node_id = request.path_params["node"]
        await node.catalog.remove_node(node_id)
        return {"node": node_id, "removed": True}

    async def no_route(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
            code = errno.EINVAL
        else:
            msg = f"no such API endpoint: {request.method} {request.url.path}"
            code = errno.ENOENT
        return JSONResponse({"error": msg, "errno": code, "kind": "HTTPError"},
                            status_code=exc.status_code, headers=exc.headers)

    # {ref:path}: a reference holding '/' (as in ../x) still reaches the
    # handler, which says that no such volume exists
    routes = [
        Route("/v1/cluster/status", route(status), methods=["GET"]),
        Route("/v1/cluster/config", route(cluster_config), methods=["GET"]),
        Route("/v1/cluster/nodes/{node:path}", route(remove_node), methods=["DELETE"]),
        Route("/v1/volumes", route(list_volumes), methods=["GET"]),
        Route("/v1/volumes", route(create), methods=["POST"]),
        Route("/v1/volumes/{ref:path}", route(inspect), methods=["GET"]),
        Route("/v1/volumes/{ref:path}", route(delete), methods=["DELETE"]),
        Route("/v1/volumes/{ref:path}/attach", route(attach), methods=["POST"]),
        Route("/v1/volumes/{ref:path}/detach", route(detach), methods=["POST"]),
        Route("/v1/volumes/{ref:path}/mount", route(mount), methods=["POST"]),
        Route("/v1/volumes/{ref:path}/unmount", route(unmount), methods=["POST"]),
        Route("/v1/volumes/{ref:path}/ha", route(ha_update), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: no_route})
