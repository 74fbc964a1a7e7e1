"""Consul's HTTP API (the subset pgbosh and py-consul use), on aiohttp.

Paths, status codes and JSON shapes follow Consul's HTTP API docs
(developer.hashicorp.com/consul/api-docs/{agent,catalog,health,kv,session,status});
errors are plain text like Consul's.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from controller.local.consul.state import (
    CRITICAL,
    PASSING,
    WARNING,
    ConsulError,
    Store,
    check_from_body,
    field_of,
    parse_duration,
    service_from_body,
    str_map,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
STORE_KEY: web.AppKey[Store] = web.AppKey("store", Store)
TOKEN_KEY: web.AppKey[str] = web.AppKey("token", str)


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access log without query strings: py-consul puts the ACL token in `?token=`."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %.3fs", request.method, request.path, response.status, time)


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain")


def _json(data: Any, index: int | None = None) -> web.Response:
    headers = {
        "X-Consul-Effective-Consistency": "leader",
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
    }
    if index is not None:
        headers["X-Consul-Index"] = str(max(index, 1))
    return web.Response(text=json.dumps(data), content_type="application/json", headers=headers)


def _flag(request: web.Request, name: str) -> bool:
    """Consul treats a present query parameter as set, unless it is explicitly false."""
    if name not in request.query:
        return False
    return request.query[name].lower() not in ("false", "0")


async def _body(request: web.Request, allow_empty: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise ConsulError(400, "Request decode failed: EOF")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConsulError(400, f"Request decode failed: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    if not isinstance(data, dict):
        raise ConsulError(400, "Request decode failed: json: cannot unmarshal array into Go value of type object")
    return data


def _tokens(request: web.Request, body: dict[str, Any] | None = None) -> list[str]:
    found = []
    if request.query.get("token"):
        found.append(request.query["token"])
    if request.headers.get("X-Consul-Token"):
        found.append(request.headers["X-Consul-Token"])
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        found.append(auth[7:].strip())
    if body is not None:
        write = field_of(body, "WriteRequest")
        if isinstance(write, dict) and field_of(write, "Token"):
            found.append(str(field_of(write, "Token")))
        if isinstance(field_of(body, "Token"), str) and field_of(body, "Token"):
            found.append(str(field_of(body, "Token")))
    return found


class ConsulHTTP:
    """Route table and handlers; `app` is the aiohttp application to serve."""

    def __init__(self, store: Store, token: str | None = None) -> None:
        self.store = store
        self.token = token or ""
        self.app = web.Application(middlewares=[self._errors], client_max_size=2 * 1024 * 1024)
        r = self.app.router
        get, put = r.add_get, r.add_put
        get("/v1/status/leader", self.status_leader, allow_head=False)
        get("/v1/status/peers", self.status_peers, allow_head=False)
        get("/v1/agent/self", self.agent_self, allow_head=False)
        get("/v1/agent/members", self.agent_members, allow_head=False)
        get("/v1/agent/services", self.agent_services, allow_head=False)
        get("/v1/agent/service/{id}", self.agent_service, allow_head=False)
        get("/v1/agent/checks", self.agent_checks, allow_head=False)
        put("/v1/agent/service/register", self.agent_service_register)
        put("/v1/agent/service/deregister/{id}", self.agent_service_deregister)
        put("/v1/agent/check/register", self.agent_check_register)
        put("/v1/agent/check/deregister/{id}", self.agent_check_deregister)
        put("/v1/agent/check/update/{id}", self.agent_check_update)
        for verb, status in (("pass", PASSING), ("warn", WARNING), ("fail", CRITICAL)):
            put(f"/v1/agent/check/{verb}/{{id}}", self._ttl_handler(status))
        put("/v1/catalog/register", self.catalog_register)
        put("/v1/catalog/deregister", self.catalog_deregister)
        get("/v1/catalog/datacenters", self.catalog_datacenters, allow_head=False)
        get("/v1/catalog/nodes", self.catalog_nodes, allow_head=False)
        get("/v1/catalog/node/{node}", self.catalog_node, allow_head=False)
        get("/v1/catalog/services", self.catalog_services, allow_head=False)
        get("/v1/catalog/service/{service}", self.catalog_service, allow_head=False)
        get("/v1/health/service/{service}", self.health_service, allow_head=False)
        get("/v1/health/checks/{service}", self.health_checks, allow_head=False)
        get("/v1/health/node/{node}", self.health_node, allow_head=False)
        get("/v1/health/state/{state}", self.health_state, allow_head=False)
        r.add_route("GET", "/v1/kv/{key:.*}", self.kv_get)
        r.add_route("PUT", "/v1/kv/{key:.*}", self.kv_put)
        r.add_route("DELETE", "/v1/kv/{key:.*}", self.kv_delete)
        put("/v1/session/create", self.session_create)
        put("/v1/session/destroy/{id}", self.session_destroy)
        put("/v1/session/renew/{id}", self.session_renew)
        get("/v1/session/info/{id}", self.session_info, allow_head=False)
        get("/v1/session/list", self.session_list, allow_head=False)
        get("/v1/session/node/{node}", self.session_node, allow_head=False)

    # ----- plumbing -----

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            routed = request.match_info.http_exception is None
            exempt = request.path.startswith("/v1/status/") or request.path == "/v1/catalog/register"
            if self.token and routed and not exempt:
                filtered = self._authorize(request, None)
                if filtered is not None:
                    return filtered
            response = await handler(request)
            if self.token:
                response.headers["X-Consul-Default-ACL-Policy"] = "deny"
            return response
        except ConsulError as exc:
            return _text(exc.status, exc.message)
        except web.HTTPMethodNotAllowed:
            return _text(405, f"method {request.method} not allowed")
        except web.HTTPNotFound:
            return _text(404, "404 page not found\n")
        except web.HTTPException:
            raise
        except Exception:
            # like Consul: a 500 with a plain-text reason (the details go to the log)
            log.exception("consul: %s %s failed", request.method, request.path)
            return _text(500, "Internal server error")

    def _authorize(self, request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
        """None when the token may go on; a filtered empty answer for anonymous list reads.

        With default-deny ACLs Consul answers an unknown secret with 403 "ACL not found",
        filters list reads for the anonymous token down to nothing (200, with
        X-Consul-Results-Filtered-By-ACLs), and refuses everything else with 403
        "Permission denied: token with AccessorID '...0002' lacks permission '<rule>' on <name>".
        """
        presented = _tokens(request, body)
        if any(hmac.compare_digest(t.encode(), self.token.encode()) for t in presented):
            return None
        if presented:
            raise ConsulError(403, "ACL not found")
        if request.method == "GET":
            empty = _FILTERED_READS.get(_route_name(request))
            if empty is not None:
                response = _json(empty(), max(self.store.index, 1))
                response.headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
                response.headers["X-Consul-Default-ACL-Policy"] = "deny"
                return response
        rule, resource = _required_permission(request, body, self.store.node_name)
        raise ConsulError(
            403,
            f"Permission denied: token with AccessorID '{ANONYMOUS_ACCESSOR}' lacks permission "
            f"'{rule}' on \"{resource}\"",
        )

    async def _blocking(self, request: web.Request, current: Callable[[], int]) -> None:
        if "index" not in request.query:
            return
        try:
            min_index = int(request.query["index"])
        except ValueError:
            raise ConsulError(400, f"Invalid index: {request.query['index']!r}") from None
        wait = parse_duration(request.query["wait"]) if request.query.get("wait") else DEFAULT_WAIT
        await self.store.wait(min_index, min(wait, MAX_WAIT), current)

    def _dc(self, request: web.Request) -> None:
        dc = request.query.get("dc")
        if dc and dc != self.store.datacenter:
            raise ConsulError(500, "No path to datacenter")

    # ----- status and agent -----

    async def status_leader(self, request: web.Request) -> web.Response:
        return _json("127.0.0.1:8300")

    async def status_peers(self, request: web.Request) -> web.Response:
        return _json(["127.0.0.1:8300"])

    async def agent_self(self, request: web.Request) -> web.Response:
        node = self.store.nodes[self.store.node_name]
        return _json(
            {
                "Config": {
                    "Datacenter": self.store.datacenter,
                    "PrimaryDatacenter": self.store.datacenter,
                    "NodeName": node.name,
                    "NodeID": node.id,
                    "Server": True,
                    "Revision": "pgbosh",
                    "Version": "1.17.0",
                    "BuildDate": "",
                },
                "DebugConfig": {},
                "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
                "Member": self._member(),
                "Meta": {"consul-network-segment": ""},
                "Stats": {},
                "xDS": {},
            }
        )

    def _member(self) -> dict[str, Any]:
        node = self.store.nodes[self.store.node_name]
        return {
            "Name": node.name,
            "Addr": node.address,
            "Port": 8301,
            "Tags": {"dc": self.store.datacenter, "role": "consul", "id": node.id, "build": "1.17.0:pgbosh"},
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        }

    async def agent_members(self, request: web.Request) -> web.Response:
        return _json([self._member()])

    def _agent_services(self) -> dict[str, Any]:
        local = self.store.node_name
        return {
            svc.id: svc.to_json(self.store.datacenter)
            for (node, _), svc in sorted(self.store.services.items())
            if node == local
        }

    async def agent_services(self, request: web.Request) -> web.Response:
        out = self._agent_services()
        for item in out.values():
            item.pop("CreateIndex")
            item.pop("ModifyIndex")
        return _json(out)

    async def agent_service(self, request: web.Request) -> web.Response:
        out = self._agent_services().get(request.match_info["id"])
        if out is None:
            raise ConsulError(404, f"unknown service ID: {request.match_info['id']}")
        return _json(out)

    async def agent_checks(self, request: web.Request) -> web.Response:
        local = self.store.node_name
        return _json({c.id: c.to_json() for (node, _), c in sorted(self.store.checks.items()) if node == local})

    async def agent_service_register(self, request: web.Request) -> web.Response:
        body = await _body(request)
        local = self.store.node_name
        svc = service_from_body(local, body)
        raw_checks: list[Any] = []
        if isinstance(field_of(body, "Check"), dict):
            raw_checks.append(field_of(body, "Check"))
        if isinstance(field_of(body, "Checks"), list):
            raw_checks.extend(field_of(body, "Checks"))
        many = len(raw_checks) > 1
        checks = []
        for n, raw in enumerate(raw_checks, start=1):
            if not isinstance(raw, dict):
                raise ConsulError(400, "Request decode failed: check must be an object")
            default_id = f"service:{svc.id}:{n}" if many else f"service:{svc.id}"
            chk = check_from_body(local, raw, default_id, f"Service '{svc.name}' check", svc.id)
            checks.append((chk, field_of(raw, "Status") is not None))
        self.store.upsert_service(svc)
        wanted = {c.id for c, _ in checks}
        if _flag(request, "replace-existing-checks"):
            for key, chk in list(self.store.checks.items()):
                if key[0] == local and chk.service_id == svc.id and chk.id not in wanted:
                    self.store.remove_check(local, chk.id)
        for chk, explicit_status in checks:
            # re-registering keeps a TTL check's current status unless the caller sets one
            self.store.upsert_check(chk, keep_status=not explicit_status)
        return _text(200, "")

    async def agent_service_deregister(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        if not self.store.remove_service(self.store.node_name, sid):
            raise ConsulError(
                404,
                f'Unknown service ID "{sid}". Ensure that the service ID is passed, not the service name.',
            )
        return _text(200, "")

    async def agent_check_register(self, request: web.Request) -> web.Response:
        body = await _body(request)
        name = field_of(body, "Name")
        if not name:
            raise ConsulError(400, "Missing check name")
        chk = check_from_body(self.store.node_name, body, str(name), str(name))
        self.store.upsert_check(chk, keep_status=field_of(body, "Status") is None)
        return _text(200, "")

    async def agent_check_deregister(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        if not self.store.remove_check(self.store.node_name, cid):
            raise ConsulError(404, f'Unknown check ID "{cid}". Ensure that the check ID is passed, not the check name.')
        return _text(200, "")

    def _ttl_check(self, check_id: str) -> None:
        chk = self.store.checks.get((self.store.node_name, check_id))
        if chk is None:
            raise ConsulError(
                404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        if not chk.ttl:
            raise ConsulError(500, f'CheckID "{check_id}" does not have associated TTL')

    def _ttl_handler(self, status: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            cid = request.match_info["id"]
            self._ttl_check(cid)
            self.store.set_check_status(self.store.node_name, cid, status, request.query.get("note", ""))
            return _text(200, "")

        return handler

    async def agent_check_update(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        body = await _body(request)
        status = field_of(body, "Status")
        if status not in (PASSING, WARNING, CRITICAL):
            raise ConsulError(400, f'Invalid check status: "{status}"')
        self._ttl_check(cid)
        self.store.set_check_status(self.store.node_name, cid, str(status), str(field_of(body, "Output") or ""))
        return _text(200, "")

    # ----- catalog -----

    async def catalog_register(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if self.token:
            self._authorize(request, body)
        node = field_of(body, "Node")
        address = field_of(body, "Address")
        if not node:
            raise ConsulError(400, "Must provide node")
        existing = self.store.nodes.get(str(node))
        skip_node_update = bool(field_of(body, "SkipNodeUpdate")) and existing is not None
        if not address and not skip_node_update:
            raise ConsulError(400, "Must provide address")
        raw_svc = field_of(body, "Service")
        raw_checks: list[Any] = []
        if isinstance(field_of(body, "Check"), dict):
            raw_checks.append(field_of(body, "Check"))
        if isinstance(field_of(body, "Checks"), list):
            raw_checks.extend(field_of(body, "Checks"))
        svc = None
        if isinstance(raw_svc, dict):
            svc = service_from_body(str(node), raw_svc, name_key="Service")
        checks = [check_from_body(str(node), c, "", "", "") for c in raw_checks if isinstance(c, dict)]
        for chk in checks:
            if not chk.id:
                raise ConsulError(400, "Missing CheckID")
            if chk.ttl:
                raise ConsulError(400, "TTL checks cannot be registered through the catalog")
            # validated before any write, so a bad request changes nothing (Consul applies it as one txn)
            if (
                chk.service_id
                and not (svc and svc.id == chk.service_id)
                and ((str(node), chk.service_id) not in self.store.services)
            ):
                raise ConsulError(400, f'Missing service "{chk.service_id}" for check "{chk.id}"')
        tagged, meta = str_map(field_of(body, "TaggedAddresses")), str_map(field_of(body, "NodeMeta"))
        if not skip_node_update:
            self.store.ensure_node(
                str(node), str(address), tagged=tagged, meta=meta, node_id=str(field_of(body, "ID") or "")
            )
        if svc is not None:
            self.store.upsert_service(svc)
        for chk in checks:
            self.store.upsert_check(chk)
        return _json(True)

    async def catalog_deregister(self, request: web.Request) -> web.Response:
        body = await _body(request)
        node = field_of(body, "Node")
        if not node:
            raise ConsulError(400, "Must provide node")
        sid, cid = field_of(body, "ServiceID"), field_of(body, "CheckID")
        if sid:
            self.store.remove_service(str(node), str(sid))
        elif cid:
            self.store.remove_check(str(node), str(cid))
        else:
            self.store.remove_node(str(node))
        return _json(True)

    async def catalog_datacenters(self, request: web.Request) -> web.Response:
        return _json([self.store.datacenter])

    async def catalog_nodes(self, request: web.Request) -> web.Response:
        self._dc(request)
        await self._blocking(request, lambda: self.store.nodes_index)
        nodes = [n.to_json() for _, n in sorted(self.store.nodes.items())]
        return _json(nodes, self.store.nodes_index)

    async def catalog_node(self, request: web.Request) -> web.Response:
        self._dc(request)
        name = request.match_info["node"]
        await self._blocking(request, lambda: self.store.nodes_index)
        node = self.store.nodes.get(name)
        if node is None:
            return _json(None, self.store.nodes_index)
        services = {s.id: s.to_json(self.store.datacenter) for (n, _), s in self.store.services.items() if n == name}
        return _json({"Node": node.to_json(), "Services": services}, self.store.index)

    async def catalog_services(self, request: web.Request) -> web.Response:
        self._dc(request)
        await self._blocking(request, lambda: max(self.store.service_index.values(), default=1))
        out: dict[str, set[str]] = {}
        for svc in self.store.services.values():
            out.setdefault(svc.name, set()).update(svc.tags)
        return _json(
            {name: sorted(tags) for name, tags in sorted(out.items())},
            max(self.store.service_index.values(), default=1),
        )

    async def catalog_service(self, request: web.Request) -> web.Response:
        self._dc(request)
        name = request.match_info["service"]
        await self._blocking(request, lambda: self.store.service_index.get(name, 1))
        out = []
        for svc in self.store.instances(name, request.query.getall("tag", [])):
            node = self.store.nodes[svc.node]
            out.append(
                {
                    "ID": node.id,
                    "Node": node.name,
                    "Address": node.address,
                    "Datacenter": node.datacenter,
                    "TaggedAddresses": node.to_json()["TaggedAddresses"],
                    "NodeMeta": node.meta,
                    "ServiceKind": "",
                    "ServiceID": svc.id,
                    "ServiceName": svc.name,
                    "ServiceTags": list(svc.tags),
                    "ServiceAddress": svc.address,
                    "ServiceTaggedAddresses": {},
                    "ServiceWeights": svc.weights,
                    "ServiceMeta": svc.meta,
                    "ServicePort": svc.port,
                    "ServiceSocketPath": "",
                    "ServiceEnableTagOverride": svc.enable_tag_override,
                    "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                    "ServiceConnect": {},
                    "CreateIndex": svc.create_index,
                    "ModifyIndex": svc.modify_index,
                }
            )
        return _json(out, self.store.service_index.get(name, 1))

    # ----- health -----

    async def health_service(self, request: web.Request) -> web.Response:
        self._dc(request)
        name = request.match_info["service"]
        await self._blocking(request, lambda: self.store.service_index.get(name, 1))
        passing = _flag(request, "passing")
        out = []
        for svc in self.store.instances(name, request.query.getall("tag", [])):
            checks = self.store.service_checks(svc)
            if passing and any(c.status != PASSING for c in checks):
                continue
            out.append(
                {
                    "Node": self.store.nodes[svc.node].to_json(),
                    "Service": svc.to_json(self.store.datacenter),
                    "Checks": [c.to_json() for c in sorted(checks, key=lambda c: (c.service_id != "", c.id))],
                }
            )
        return _json(out, self.store.service_index.get(name, 1))

    async def health_checks(self, request: web.Request) -> web.Response:
        self._dc(request)
        name = request.match_info["service"]
        await self._blocking(request, lambda: self.store.service_index.get(name, 1))
        out = [c.to_json() for _, c in sorted(self.store.checks.items()) if c.service_id and c.service_name == name]
        return _json(out, self.store.service_index.get(name, 1))

    async def health_node(self, request: web.Request) -> web.Response:
        self._dc(request)
        name = request.match_info["node"]
        await self._blocking(request, lambda: self.store.index)
        return _json([c.to_json() for _, c in sorted(self.store.checks.items()) if c.node == name], self.store.index)

    async def health_state(self, request: web.Request) -> web.Response:
        self._dc(request)
        state = request.match_info["state"]
        if state not in ("any", PASSING, WARNING, CRITICAL):
            raise ConsulError(400, f"Invalid state: {state!r}")
        await self._blocking(request, lambda: self.store.index)
        out = [c.to_json() for _, c in sorted(self.store.checks.items()) if state in ("any", c.status)]
        return _json(out, self.store.index)

    # ----- KV -----

    async def kv_get(self, request: web.Request) -> web.Response:
        self._dc(request)
        key = request.match_info["key"]
        recurse = _flag(request, "recurse")
        keys_only = "keys" in request.query
        if recurse or keys_only:

            def current() -> int:
                return self.store.kv_prefix_index(key)
        else:

            def current() -> int:
                return self.store.kv_index.get(key, 1)

        await self._blocking(request, current)
        index = current()
        if keys_only:
            sep = request.query.get("separator", "")
            found: list[str] = []
            for k in sorted(self.store.kv):
                if not k.startswith(key):
                    continue
                if sep:
                    cut = k.find(sep, len(key))
                    if cut >= 0:
                        k = k[: cut + len(sep)]
                if not found or found[-1] != k:
                    found.append(k)
            if not found:
                return web.Response(status=404, headers={"X-Consul-Index": str(index)})
            return _json(found, index)
        if recurse:
            entries = [e.to_json() for k, e in sorted(self.store.kv.items()) if k.startswith(key)]
        else:
            entry = self.store.kv.get(key)
            entries = [entry.to_json()] if entry else []
        if not entries:
            return web.Response(status=404, headers={"X-Consul-Index": str(index)})
        if "raw" in request.query and not recurse:
            raw = self.store.kv[key].value or b""
            return web.Response(body=raw, headers={"X-Consul-Index": str(index)})
        return _json(entries, index)

    async def kv_put(self, request: web.Request) -> web.Response:
        self._dc(request)
        key = request.match_info["key"]
        if not key:
            raise ConsulError(400, "Missing key name")
        q = request.query
        try:
            flags = int(q.get("flags", "0"))
            cas = int(q["cas"]) if "cas" in q else None
        except ValueError:
            raise ConsulError(400, "Invalid flags or cas value") from None
        value = await request.read()
        ok = self.store.kv_put(key, value, flags, cas, q.get("acquire", ""), q.get("release", ""))
        return _json(ok)

    async def kv_delete(self, request: web.Request) -> web.Response:
        self._dc(request)
        key = request.match_info["key"]
        try:
            cas = int(request.query["cas"]) if "cas" in request.query else None
        except ValueError:
            raise ConsulError(400, "Invalid cas value") from None
        return _json(self.store.kv_delete(key, _flag(request, "recurse"), cas))

    # ----- sessions -----

    async def session_create(self, request: web.Request) -> web.Response:
        self._dc(request)
        sess = self.store.create_session(await _body(request, allow_empty=True))
        return _json({"ID": sess.id})

    async def session_destroy(self, request: web.Request) -> web.Response:
        self._dc(request)
        self.store.destroy_session(request.match_info["id"])
        return _json(True)

    async def session_renew(self, request: web.Request) -> web.Response:
        self._dc(request)
        sess = self.store.renew_session(request.match_info["id"])
        return _json([sess.to_json()])

    async def session_info(self, request: web.Request) -> web.Response:
        self._dc(request)
        sid = request.match_info["id"]
        await self._blocking(request, lambda: self.store.sessions_index)
        sess = self.store.sessions.get(sid)
        return _json([sess.to_json()] if sess else [], self.store.sessions_index)

    async def session_list(self, request: web.Request) -> web.Response:
        self._dc(request)
        await self._blocking(request, lambda: self.store.sessions_index)
        return _json([s.to_json() for s in self.store.sessions.values()], self.store.sessions_index)

    async def session_node(self, request: web.Request) -> web.Response:
        self._dc(request)
        node = request.match_info["node"]
        await self._blocking(request, lambda: self.store.sessions_index)
        out = [s.to_json() for s in self.store.sessions.values() if s.node == node]
        return _json(out, self.store.sessions_index)


# GET routes whose results Consul filters (rather than refuses) for a token without rights
_FILTERED_READS: dict[str, Callable[[], Any]] = {
    "/v1/agent/services": dict,
    "/v1/agent/checks": dict,
    "/v1/catalog/nodes": list,
    "/v1/catalog/services": dict,
    "/v1/catalog/service/{service}": list,
    "/v1/health/service/{service}": list,
    "/v1/health/checks/{service}": list,
    "/v1/health/node/{node}": list,
    "/v1/health/state/{state}": list,
    "/v1/session/list": list,
    "/v1/session/node/{node}": list,
}


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else request.path


def _required_permission(request: web.Request, body: dict[str, Any] | None, agent: str) -> tuple[str, str]:
    """The ACL rule Consul would name in its refusal, and the resource it applies to."""
    path, write = request.path, request.method != "GET"
    if path.startswith("/v1/kv/"):
        return ("key:write" if write else "key:read"), path[len("/v1/kv/") :]
    if path.startswith("/v1/session/"):
        return ("session:write" if write else "session:read"), agent
    if path.startswith("/v1/agent/service/"):
        return "service:write", request.match_info.get("id", "")
    if path.startswith("/v1/agent/check/"):
        return "node:write", agent
    if path.startswith("/v1/catalog/"):
        node = str(field_of(body, "Node") or "") if body else ""
        return ("node:write" if write else "node:read"), node or agent
    return "agent:read", agent
