"""The local Kubernetes API: kmock's KubernetesEmulator, made faithful enough for pgbosh.

kmock keeps objects in memory and serves discovery, list, watch, get, create,
merge-patch and delete. A real API server does more, and pgbosh's users (kopf,
kubectl) notice. On top of the emulator this adds, for every resource:
resourceVersion, uid, creationTimestamp and generation on writes, and `kind`
on lists; for PostgresCluster: admission (defaults, schema, CEL rules) with the
API server's 422 answer, the status subresource (spec and status written
separately), and server-side printing (`kubectl get pgc` shows the CRD's printer
columns). Watch streams are labelled JSON, start after the resourceVersion a client
gives, and carry Tables to a client that asks for them (`kubectl get pgc -w`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import collections.abc
import copy
import fnmatch
import functools
import inspect
import itertools
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import attrs
import kmock
import multidict
import orjson
import yarl
from kmock._internal import dsl, enums, filtering, k8s, parsing, references, rendering

from controller import http_server, jsonbytes
from controller.api import crd, models
from controller.api.validation import Invalid, admit, admit_status

CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
PGC_RESOURCE = f"{models.GROUP}/{models.VERSION}/{models.PLURAL}"
# Parsed once: kmock parses a resource spelling on every construction.
_PGC = kmock.resource(PGC_RESOURCE)
_SECRETS = kmock.resource("v1/secrets")
_EVENTS = kmock.resource("v1/events")

# Resources pgbosh and its users touch, with the names kubectl discovers them by.
CORE_RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "singular": "namespace", "shortnames": {"ns"}, "namespaced": False},
    "v1/events": {"kind": "Event", "singular": "event", "shortnames": {"ev"}, "namespaced": True},
    "v1/secrets": {"kind": "Secret", "singular": "secret", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "singular": "configmap", "shortnames": {"cm"}, "namespaced": True},
    CRD_RESOURCE: {
        "kind": "CustomResourceDefinition",
        "singular": "customresourcedefinition",
        "shortnames": {"crd", "crds"},
        "namespaced": False,
    },
    "coordination.k8s.io/v1/leases": {"kind": "Lease", "singular": "lease", "namespaced": True},
}
# What `kubectl get events` shows from a real API server.
EVENT_COLUMNS: list[dict[str, Any]] = [
    {"name": "Last Seen", "type": "date", "jsonPath": ".lastTimestamp"},
    {"name": "Type", "type": "string", "jsonPath": ".type"},
    {"name": "Reason", "type": "string", "jsonPath": ".reason"},
    {"name": "Object", "type": "string", "jsonPath": ".involvedObject.name"},
    {"name": "Message", "type": "string", "jsonPath": ".message"},
]
ALL_VERBS = {"list", "watch", "get", "create", "patch", "update", "delete", "deletecollection"}


def _now() -> str:
    """RFC 3339 UTC to the second, as the API server writes timestamps."""
    return _rfc3339(int(time.time()))


@functools.lru_cache(maxsize=1)  # formatted once a second
def _rfc3339(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _json_path(obj: Any, path: str) -> Any:
    value = obj
    for part in path.strip(".").split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    secs = int((datetime.now(UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


class _DirectRouting(k8s.KubernetesScaffold):
    """kmock finds the reaction for a request by applying every registered filter to every
    request it holds (to honour slices and groups), which costs milliseconds per request and
    grows with the requests in flight. When nobody has added reactions beyond the emulator's
    own (pgbosh dev, benchmarks, most tests), those are plain filters: check each one's
    criteria against this request alone, in kmock's order, and serve the first that matches.
    Sits between KubernetesEmulator (which stores the object first) and kmock's routing."""

    __slots__ = ()  # the state lives in LocalKubernetes (kmock's classes are slotted)
    _routes: list[tuple[Any, Any]]
    _builtin_payloads: int
    forget_served_requests: bool

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve one HTTP request. kmock builds a new resource object for every request it
        parses, through a runtime-checked Protocol (~90 us of CPU a request on Python 3.11);
        here the request is parsed to the same model with its resource looked up once per
        spelling. Watches, plain HTTP, request limits and tests' own reactions (which may
        stream) take kmock's whole path."""
        if not self._own_reactions_only():
            return await super().__call__(raw_request)
        try:
            request = await _parse_request(raw_request, id=len(self._requests))
        except Exception:  # a body that is not text, say: kmock's path answers it its way
            return await super().__call__(raw_request)
        if request.action is None or request.action == enums.action.WATCH:
            return await super().__call__(raw_request)
        return await self._serve_model(request)

    def _own_reactions_only(self) -> bool:
        """No request limit and no reaction beyond the emulator's own: its routes can be taken
        directly (otherwise kmock decides, as it would)."""
        return self.limit is None and len(self._payloads) == self._builtin_payloads

    async def _serve_model(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """Record and handle a parsed request; an error is rendered as kmock renders it."""
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as exc:
            if not self._errors:  # outside `async with`: kmock raises too
                raise
            if not self.forget_served_requests:  # kept for tests' assertions, as kmock keeps them
                self._errors[-1].append(exc)
            return await self._render_error(exc)

    def _routing_table(self) -> list[tuple[Any, Any]]:
        """Called once the emulator's own reactions are registered: kmock's order (highest
        priority first, then registration), each with its criteria (None: not a plain filter)."""
        width = max(len(p.priorities) for p in self._payloads)
        order = sorted(
            self._payloads, key=lambda p: tuple(-x for x in p.priorities) + (0,) * (width - len(p.priorities))
        )
        return [(p, _fast_criteria(p._source.criteria) if type(p._source) is dsl.Filter else None) for p in order]

    def _own_handler(self, reaction: Any) -> Any:
        """The emulator's own async handler behind a reaction with no status, headers or cookies
        of its own (None: anything else, which kmock renders)."""
        response = getattr(reaction, "response", None)
        handler = getattr(response, "payload", None)
        if response is None or response.status is not None or response.headers or response.cookies:
            return None
        if getattr(handler, "__self__", None) is not self or not inspect.iscoroutinefunction(handler):
            return None
        return handler

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if len(self._payloads) == self._builtin_payloads:
            for payload, criteria in self._routes:
                if criteria is None or payload._disabled.is_set():
                    break  # not a plain filter: let kmock decide
                if criteria(request):
                    handler = self._own_handler(payload)
                    if handler is not None:
                        # What kmock's renderer does for it (call, await, a dict as JSON),
                        # without matching the answer against every kind of payload.
                        payload._requests.append(request)
                        result = await handler(request)
                        if isinstance(result, dict):
                            return aiohttp.web.Response(body=jsonbytes.dumps(result), content_type="application/json")
                        rendered: aiohttp.web.StreamResponse = await payload.response._render(request, result)
                        return rendered
                    try:
                        response: aiohttp.web.StreamResponse = await payload(request)
                        return response
                    except rendering.ReactionMismatchError:  # as kmock: depleted, try the next
                        payload._disabled.set()
                    except NotImplementedError:  # as kmock: matched, nothing to respond with
                        pass
        return await super()._handle(request)


_RESOURCES: dict[tuple[str, str | None, str | None], references.resource] = {}
_TARGETS: dict[tuple[str, str, str], tuple[enums.method, parsing.ParsedPath, Any]] = {}
_METHODS = {method.value: method for method in enums.method}


def _method(name: str) -> enums.method:
    return _METHODS.get(name) or enums.method(name)  # the enum's own lookup: ~5 us


async def _parse_request(raw: aiohttp.web.BaseRequest, *, id: int) -> rendering.Request:
    """The request as kmock's model holds it (body, text, JSON or form data, the Kubernetes
    action, resource, namespace, name and subresource), with one resource object per
    spelling of group, version and plural."""
    body = await raw.read()
    text = await raw.text()
    try:
        # orjson: strict RFC 8259 JSON (as the API server reads it), ~3 times the json module's speed.
        data = orjson.loads(body)
    except ValueError:  # as kmock: not JSON, then a form if it is one (an empty one: None)
        try:
            data = await raw.post() or None
        except ValueError:
            data = None
    method = _method(raw.method)
    query = dict(raw.query)
    path, action = _target(method, raw.path, query)
    return _request_model(
        id, raw, raw.url, method, query, dict(raw.headers), dict(raw.cookies), body, text, data, path, action
    )


def _target(method: enums.method, path: str, query: dict[str, str]) -> tuple[parsing.ParsedPath, Any]:
    """The Kubernetes reading of a request: its parsed path and action (None: not an API call)."""
    parsed = parsing.parse_path(path)
    return parsed, parsing.guess_k8s(parsed, method, query)


def _request_model(
    id: int,
    raw: aiohttp.web.BaseRequest | None,
    url: yarl.URL,
    method: enums.method,
    query: dict[str, str],
    headers: Mapping[str, str],
    cookies: dict[str, str],
    body: bytes,
    text: str,
    data: Any,
    path: parsing.ParsedPath,
    action: Any,
) -> rendering.Request:
    resource = None
    if path.group is not None:
        key = (path.group, path.version, path.plural)
        resource = _RESOURCES.get(key)
        if resource is None:
            resource = references.resource(group=path.group, version=path.version, plural=path.plural)
            if len(_RESOURCES) < 1024:  # spellings come from clients: keep a bounded set
                _RESOURCES[key] = resource
    return rendering.Request(
        id=id,
        raw_request=raw,
        url=url,
        method=method,
        params=query,
        headers=headers,
        cookies=cookies,
        data=data,
        body=body,
        text=text,
        action=action,
        resource=resource,
        namespace=path.namespace,
        name=path.name,
        subresource=path.subresource,
    )


def _fast_criteria(criteria: Any) -> Any:
    """The emulator's own routes use two shapes of criteria: an HTTP method and path, or a
    Kubernetes action. Check those directly, as kmock's generic matcher would (enum equality;
    a path string is a glob, a pattern must match in full); anything else goes to kmock."""
    fields = {k: v for k, v in attrs.asdict(criteria, recurse=False).items() if v is not Ellipsis}
    if isinstance(criteria, filtering.K8sCriteria) and set(fields) == {"action"}:
        action = fields["action"]
        return lambda request: request.action == action
    if isinstance(criteria, filtering.HTTPCriteria) and set(fields) == {"method", "path"}:
        method, path = fields["method"], fields["path"]
        if isinstance(method, enums.method) and isinstance(path, re.Pattern):
            return lambda request: request.method == method and path.fullmatch(request.url.path) is not None
        if isinstance(method, enums.method) and isinstance(path, str):
            return lambda request: request.method == method and fnmatch.fnmatchcase(request.url.path, path)
    return criteria


@attrs.define(kw_only=True)
class LocalKubernetes(kmock.KubernetesEmulator, _DirectRouting):
    """The Kubernetes API pgbosh runs against on one machine and in its tests."""

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _routes: list[tuple[Any, Any]] = attrs.field(factory=list, init=False)
    _builtin_payloads: int = attrs.field(default=-1, init=False)
    # kmock records every request for test assertions, and matches reactions by scanning that
    # record: a long-running API (pgbosh dev, benchmarks) forgets each request once it is served.
    forget_served_requests: bool = False
    # What a watch from a resourceVersion needs that kmock does not keep (see _serve_watch): the
    # version each live object was created at, by uid, and the last MAX_DELETIONS deletions.
    _born: dict[str, int] = attrs.field(factory=dict, init=False)
    _deletions: collections.deque[_Deletion] = attrs.field(factory=collections.deque, init=False)
    _forgotten_up_to: int = attrs.field(default=0, init=False)  # deletions up to it are not known

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name, info in CORE_RESOURCES.items():
            self.resources[name] = kmock.ResourceInfo(
                kind=info["kind"],
                singular=info["singular"],
                shortnames=info.get("shortnames", set()),
                namespaced=info["namespaced"],
                verbs=ALL_VERBS,
            )
        self.resources[PGC_RESOURCE] = kmock.ResourceInfo(
            kind=models.KIND,
            singular=models.SINGULAR,
            shortnames=set(models.SHORT_NAMES),
            categories={"all"},
            namespaced=True,
            verbs=ALL_VERBS,
            subresources={"status", "scale"},
        )
        self.fallback["get /openapi/v3"] << self._serve_openapi_index
        self.fallback[f"get /openapi/v3/apis/{models.GROUP}/{models.VERSION}"] << self._serve_openapi_group
        self.fallback["get /openapi/v2"] << self._serve_openapi_v2
        self._seed(CRD_RESOURCE, crd.crd())
        for namespace in ("default", "kube-system"):
            self.add_namespace(namespace)
        self._label_watch_streams()
        self._routes = self._routing_table()
        self._builtin_payloads = len(self._payloads)

    def _label_watch_streams(self) -> None:
        """kmock streams watch events with no Content-Type (aiohttp then says
        application/octet-stream), and kubectl refuses such a stream ("no stream serializers
        registered for application/octet-stream"): `kubectl get -w` failed. The API server
        labels a JSON watch stream application/json."""
        for payload in list(self._payloads):
            handler = getattr(getattr(payload, "response", None), "payload", None)
            if getattr(handler, "__func__", None) is LocalKubernetes._serve_watch:
                payload << kmock.headers({"Content-Type": "application/json"})
                return
        raise RuntimeError("kmock's watch reaction was not found: the local API cannot label its watch streams")

    def add_namespace(self, name: str) -> None:
        # kmock 0.8 parses POST /api/v1/namespaces as a namespaced path, so namespaces are seeded here.
        self._seed("v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def _seed(self, resource: str, obj: dict[str, Any]) -> None:
        """Store a cluster-scoped object as created now, past admission."""
        obj = self._born_now(self._stamp(obj))
        self.objects[kmock.resource(resource), None, obj["metadata"]["name"]] = obj

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(next(self._versions))
        return obj

    def _born_now(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Remember the version a stored object (stamped) was created at."""
        meta = obj["metadata"]
        self._born[meta["uid"]] = int(meta["resourceVersion"])
        return obj

    def _note_life(self, request: rendering.Request) -> None:
        """After a write was served: a create's object is born, and an object a delete (or
        the update that removed its last finalizer) removed is remembered as deleted, with
        a version of its own, for watches from a version before it (see _serve_watch)."""
        if request.action == enums.action.CREATE:
            if isinstance(request.data, dict):
                self._born_now(request.data)
            return
        if request.name is None or request.action not in (enums.action.DELETE, enums.action.UPDATE):
            return
        obj = self._stored(request)
        if obj is None or not obj.deleted:
            return
        last = obj.last.raw
        born = self._born.pop(str((last.get("metadata") or {}).get("uid")), None)
        if born is None:  # its deletion is known already (or it was never created here)
            return
        assert request.resource is not None
        self._deletions.append(_Deletion(next(self._versions), born, request.resource, last))
        while len(self._deletions) > MAX_DELETIONS:
            self._forgotten_up_to = self._deletions.popleft().version

    # --- the front: requests answered without aiohttp ------------------------------------------

    def answers_directly(self, request: http_server.Request) -> bool:
        """Whether ``answer`` serves this request (its head read): an API call that is not a
        watch, while only the emulator's own reactions are registered, with a body that is
        JSON or nothing. Anything else goes to kmock's whole path, on aiohttp (see serve)."""
        if not self._own_reactions_only():
            return False
        if request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/")):
            return False
        _, _, action = self._target_of(request)
        return action is not None and action != enums.action.WATCH

    def _target_of(self, request: http_server.Request) -> tuple[enums.method, parsing.ParsedPath, Any]:
        """kmock's reading of the request's method, path and query, remembered by their text
        (answers_directly reads it, then answer: a create's collection path repeats)."""
        key = (request.method, request.raw_path, request.query_string)
        hit = _TARGETS.get(key)
        if hit is None:
            method = _method(request.method)
            hit = (method, *_target(method, request.path, request.query))
            if len(_TARGETS) >= 1024:
                _TARGETS.clear()
            _TARGETS[key] = hit
        return hit

    async def answer(self, request: http_server.Request) -> http_server.Response:
        """Serve one request that ``answers_directly`` chose, as ``__call__`` serves it from
        aiohttp: the same request model, handling and errors; the answer is what aiohttp
        would have sent (status, headers, body)."""
        body = request.body
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            status = _failure(400, "BadRequest", "the body of the request is not UTF-8 text")
            return http_server.Response(400, jsonbytes.dumps(status), content_type="application/json")
        try:
            data = orjson.loads(body)
        except ValueError:
            data = None  # as kmock: not JSON and not a form (forms are handed to aiohttp)
        method, path, action = self._target_of(request)
        target = request.raw_path + (f"?{request.query_string}" if request.query_string else "")
        try:
            url = yarl.URL(f"http://{request.headers.get('host', 'localhost')}{target}", encoded=True)
        except ValueError:  # a Host header that is no host
            url = yarl.URL(f"http://localhost{target}", encoded=True)
        model = _request_model(
            len(self._requests), None, url, method, request.query, multidict.CIMultiDict(request.headers),
            {}, body, text, data, path, action,
        )  # fmt: skip
        return _plain(await self._serve_model(model))

    # --- writes -------------------------------------------------------------------------------

    def _current(self, request: rendering.Request) -> dict[str, Any] | None:
        if request.resource is None or request.name is None:
            return None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else copy.deepcopy(dict(obj.raw))

    def _prepare_create(self, request: rendering.Request) -> dict[str, Any]:
        # Copies of the two levels written here (admission copies what it defaults), so the
        # request's own body stays as it came if the create is refused.
        data: dict[str, Any] = dict(request.data) if isinstance(request.data, dict) else {}
        _check_metadata(data)
        meta = data["metadata"] = dict(data.get("metadata") or {})
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise k8s.KubernetesError(
                status=422, reason="Invalid", message="metadata.name: Required value: name or generateName is required"
            )
        meta["generation"] = 1
        meta.pop("resourceVersion", None)
        meta.pop("deletionTimestamp", None)
        if request.resource == _PGC:
            data.pop("status", None)
            data = self._admit(data, None)
        if request.resource == _SECRETS and isinstance(data.get("stringData"), dict):
            encoded = {k: base64.b64encode(str(v).encode()).decode() for k, v in data.pop("stringData").items()}
            data["data"] = {**(data.get("data") or {}), **encoded}
        return self._stamp(data)

    def _prepare_update(self, request: rendering.Request, current: dict[str, Any]) -> dict[str, Any]:
        is_pgc = request.resource == _PGC
        if isinstance(request.data, list):  # application/json-patch+json (kopf uses it for finalizers)
            target = _apply_json_patch(current, request.data)
            patch = _merge_diff(current, target)
        else:
            patch = copy.deepcopy(request.data) if isinstance(request.data, dict) else {}
        _check_metadata(patch)
        if request.method == enums.method.PUT:
            # A replace: the body is the whole object; express it as a patch of the current one.
            patch = {k: patch.get(k) for k in set(current) | set(patch)}
            patch["metadata"] = {
                **(patch.get("metadata") or {}),
                "uid": current["metadata"].get("uid"),
                "creationTimestamp": current["metadata"].get("creationTimestamp"),
            }
        if request.subresource == "scale" and is_pgc:
            replicas = (patch.get("spec") or {}).get("replicas")
            patch = {"spec": {"instances": replicas}} if replicas is not None else {}
        elif request.subresource == "status":
            patch = {"status": patch.get("status")} if "status" in patch else {}
        elif is_pgc:
            patch.pop("status", None)  # the main resource ignores status, as with a status subresource
        meta_patch = patch.get("metadata") or {}
        for readonly in ("uid", "creationTimestamp", "generation", "resourceVersion", "deletionTimestamp"):
            meta_patch.pop(readonly, None)
        if meta_patch:
            patch["metadata"] = meta_patch
        result = _merge_patch(current, patch)
        if result.get("spec") != current.get("spec"):
            result["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        if is_pgc:
            # The main resource is admitted without its status (which it cannot change), the
            # status subresource with it, as the API server does.
            status = result.pop("status", None)
            old = {k: v for k, v in current.items() if k != "status"}
            if request.subresource == "status":
                try:
                    admit_status({**result, "status": status})
                except Invalid as exc:
                    raise k8s.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
            else:
                result = self._admit(result, old)
            if status is not None:
                result["status"] = status
        return self._stamp(result)

    @staticmethod
    def _admit(obj: dict[str, Any], old: dict[str, Any] | None, transitions: bool = True) -> dict[str, Any]:
        try:
            return admit(obj, old if transitions else None)
        except Invalid as exc:
            raise k8s.KubernetesError(
                status=422,
                reason="Invalid",
                message=str(exc),
                details={
                    "name": exc.name,
                    "group": models.GROUP,
                    "kind": models.KIND,
                    "causes": [
                        {"reason": "FieldValueInvalid", "message": e.message, "field": e.path} for e in exc.errors
                    ],
                },
            ) from None

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.action == enums.action.CREATE:
            _replace_data(request, self._prepare_create(request))
        elif request.resource is not None and request.action == enums.action.UPDATE and request.name:
            current = self._current(request)
            if current is not None:
                updated = self._prepare_update(request, current)
                # kmock merges the patch it is given; hand it the whole new object, with
                # deletions spelled as None so that it drops them too.
                as_patch = _merge_diff(current, updated)
                _replace_data(request, as_patch)
        elif request.resource is not None and request.action == enums.action.DELETE and request.name:
            current = self._current(request)
            if current is not None and current["metadata"].get("finalizers"):
                # kmock sets deletionTimestamp; a resourceVersion bump lets watchers see a new version.
                self.objects[request.resource, request.namespace, request.name].patch(
                    {"metadata": {"resourceVersion": str(next(self._versions))}}
                )
        try:
            response = await super()._handle(request)
            if request.action == enums.action.CREATE and response.status == 200 and not response.prepared:
                response.set_status(201)  # the API server's answer to a create: 201 Created
            if request.resource is not None and response.status < 300:
                self._note_life(request)
            return response
        except k8s.KubernetesObjectNotFoundError:
            raise _object_error(request, 404, "NotFound", "not found") from None
        except k8s.KubernetesObjectConflictError:
            raise _object_error(request, 409, "AlreadyExists", "already exists") from None
        finally:
            if self.forget_served_requests:
                self._forget(request)

    def _forget(self, request: rendering.Request) -> None:
        if request.action in (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE):
            self._forget_history(request)
        lists: list[list[rendering.Request]] = [self._requests]
        lists += [payload._requests for payload in self._payloads]
        for served in lists:
            for i in range(len(served) - 1, -1, -1):
                if served[i] is request:
                    del served[i]
                    break

    def _forget_history(self, request: rendering.Request) -> None:
        """kmock keeps every version of an object (a deep copy per write): a cluster's status,
        written every resync, would grow the API by megabytes a day. A long-running API keeps
        the current version (and the deletion mark of a deleted object) only."""
        obj = self._stored(request)
        if obj is None:
            return
        history = obj.history  # trimmed in place: the versions kept are not copied
        last = max((i for i, version in enumerate(history) if version is not None), default=None)
        if last is None:
            return
        if history[-1] is None:  # deleted: its last version, then the deletion mark
            del history[last + 1 : -1]
        else:
            del history[last + 1 :]
        del history[:last]

    # --- reads --------------------------------------------------------------------------------

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict):
            # kmock writes the core group's version as "/v1"; kubectl only maps "v1".
            payload["groupVersion"] = str(payload.get("groupVersion", "")).lstrip("/")
            for entry in payload.get("resources", []):
                if "/" in entry["name"]:  # a subresource is not found by short names or categories
                    entry["shortNames"] = []
                    entry["categories"] = []
                    entry["verbs"] = ["get", "patch", "update"]
        return payload

    async def _serve_openapi_index(self, request: rendering.Request) -> rendering.Payload:
        return {
            "paths": {
                f"apis/{models.GROUP}/{models.VERSION}": {
                    "serverRelativeURL": f"/openapi/v3/apis/{models.GROUP}/{models.VERSION}"
                }
            }
        }

    async def _serve_openapi_v2(self, request: rendering.Request) -> rendering.Payload:
        doc = await self._serve_openapi_group(request)
        assert isinstance(doc, dict)
        return {"swagger": "2.0", "info": doc["info"], "paths": {}, "definitions": doc["components"]["schemas"]}

    async def _serve_openapi_group(self, request: rendering.Request) -> rendering.Payload:
        """Enough OpenAPI v3 for kubectl's client-side validation of PostgresCluster."""
        schema = copy.deepcopy(crd.open_api_schema())
        schema["x-kubernetes-group-version-kind"] = [
            {"group": models.GROUP, "version": models.VERSION, "kind": models.KIND}
        ]
        schema["properties"]["metadata"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        name = f"dev.pgbosh.{models.VERSION}.{models.KIND}"
        gvk = {"group": models.GROUP, "version": models.VERSION, "kind": models.KIND}
        # kubectl reads the operations' parameters to learn the server validates fields itself.
        operation = {
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "x-kubernetes-group-version-kind": gvk,
            "responses": {},
        }
        base = f"/apis/{models.GROUP}/{models.VERSION}/namespaces/{{namespace}}/{models.PLURAL}"
        paths = {base: {"post": operation}, base + "/{name}": {"patch": operation, "put": operation}}
        return {
            "openapi": "3.0.0",
            "info": {"title": "pgbosh local", "version": models.VERSION},
            "paths": paths,
            "components": {"schemas": {name: schema}},
        }

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_list(request)
        assert isinstance(payload, dict) and request.resource is not None
        info = self._info(request)
        payload["apiVersion"] = _api_version(request)
        payload["kind"] = f"{info.kind}List" if info and info.kind else "List"
        payload["metadata"] = {"resourceVersion": str(next(self._versions))}
        selector = request.params.get("labelSelector")
        if selector:
            payload["items"] = [o for o in payload["items"] if _selected(o, selector)]
        fields = request.params.get("fieldSelector")
        if fields:
            payload["items"] = [o for o in payload["items"] if _fields_selected(o, fields)]
        if _wants_table(request):
            return self._table(request, payload["items"], payload["metadata"])
        return payload

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        """kmock's watch, with what the API server does besides:

        - from a resourceVersion (kubectl and informers watch from their list's): what changed
          since, as its event. kmock replays every object as ADDED; here an object not changed
          since is left out, one changed since is MODIFIED, and the objects deleted since come
          first as DELETED. A version older than the deletions kept gets 410 Expired;
        - label and field selectors, as for lists. (An object that stops matching is not sent
          as DELETED, as the API server would: it is no longer sent at all);
        - for a client that asks for Tables (`kubectl get -w`), each event's object as a
          Table of one row with the resource's columns."""
        table = _wants_table(request)
        since = request.params.get("resourceVersion", "")
        after = int(since) if since.isdigit() and since != "0" else None  # "0" or none: from now, all
        labels = request.params.get("labelSelector")
        fields = request.params.get("fieldSelector")
        events = super()._serve_watch(request)
        yield await anext(events)  # kmock's first item starts the stream (headers)
        deleted: list[dict[str, Any]] = []
        if after is not None:
            if after < self._forgotten_up_to:
                too_old = f"too old resource version: {after} ({self._forgotten_up_to})"
                yield {"type": "ERROR", "object": _failure(410, "Expired", too_old)}
                if isinstance(events, collections.abc.AsyncGenerator):
                    await events.aclose()
                return
            deleted = [
                {"type": "DELETED", "object": deletion.object}
                for deletion in self._deletions
                if deletion.version > after >= deletion.born and deletion.watched_by(request)
            ]
        async for item in _chain(deleted, events):
            if isinstance(item, dict) and isinstance(item.get("object"), dict):
                obj = item["object"]
                meta = obj.get("metadata") or {}
                if after is not None and item.get("type") == "ADDED":
                    version = str(meta.get("resourceVersion", ""))
                    if version.isdigit() and int(version) <= after:
                        continue  # unchanged since the client's version
                    born = self._born.get(str(meta.get("uid")))
                    if born is not None and born <= after:
                        item = {"type": "MODIFIED", "object": obj}
                if (labels and not _selected(obj, labels)) or (fields and not _fields_selected(obj, fields)):
                    continue
                if table:
                    one_row = self._table(request, [obj], {"resourceVersion": meta.get("resourceVersion")})
                    item = {"type": item.get("type"), "object": one_row}
            yield item

    # kmock finds the object of a request by scanning every stored object (events included),
    # which grows with the cluster; a named request finds it by its key instead.
    def _stored(self, request: rendering.Request) -> Any:
        name = _object_name(request)
        namespace = request.namespace
        if namespace is None and request.name is None and isinstance(request.data, dict):
            namespace = (request.data.get("metadata") or {}).get("namespace")  # a create's body
        if request.resource is None or name is None:
            return None
        store = self.objects._objects
        obj = store.get((request.resource, namespace, name))
        if obj is None:  # a resource spelled differently but equal: compare names first (cheap)
            for (resource, ns, n), candidate in store.items():
                if n == name and ns == namespace and resource == request.resource:
                    return candidate
        return obj

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        obj = self._stored(request)
        return obj.raw if obj is not None else await super()._serve_create(request)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        obj = self._stored(request)
        payload = obj.last.raw if obj is not None else await super()._serve_update(request)
        return _as_scale(payload) if request.subresource == "scale" else payload

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        obj = self._stored(request)
        return obj.last.raw if obj is not None else await super()._serve_delete(request)

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        obj = self._stored(request) if request.name is not None else None
        if (obj is not None and obj.deleted) or (obj is None and request.name is not None):
            raise k8s.KubernetesObjectNotFoundError()
        payload = obj.raw if obj is not None else await super()._serve_fetch(request)
        if request.subresource == "scale":
            return _as_scale(payload)
        if _wants_table(request) and isinstance(payload, dict):
            return self._table(
                request, [payload], {"resourceVersion": payload.get("metadata", {}).get("resourceVersion")}
            )
        return payload

    def _info(self, request: rendering.Request) -> kmock.ResourceInfo | None:
        for resource in self._get_resources():
            if resource == request.resource:
                try:
                    info: kmock.ResourceInfo = self.resources[resource]
                    return info
                except KeyError:
                    return None
        return None

    def _table(self, request: rendering.Request, items: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
        # The API server's table for events has Name last, and only for -o wide (priority 1).
        name_last = request.resource == _EVENTS
        name_column = {"name": "Name", "type": "string", "format": "name", "description": "Name",
                       "priority": 1 if name_last else 0}  # fmt: skip
        columns: list[dict[str, Any]] = [] if name_last else [name_column]
        extra: list[dict[str, Any]] = []
        if request.resource == _PGC:
            extra = crd.PRINTER_COLUMNS
        elif request.resource == _EVENTS:
            extra = EVENT_COLUMNS
        else:
            extra = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        columns += [
            {
                "name": c["name"],
                "type": "string" if c["type"] == "date" else c["type"],
                "format": "",
                "description": c.get("description", ""),
                "priority": 0,
            }
            for c in extra
        ]
        if name_last:
            columns.append(name_column)
        rows = []
        for item in items:
            name = item.get("metadata", {}).get("name")
            cells: list[Any] = [] if name_last else [name]
            for column in extra:
                value = _json_path(item, column["jsonPath"])
                if value is None and column["type"] == "date":
                    value = _json_path(item, ".metadata.creationTimestamp")
                cells.append(_age(value) if column["type"] == "date" else value)
            if name_last:
                cells.append(name)
            partial = {
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": item.get("metadata", {}),
            }
            rows.append({"cells": cells, "object": partial})
        return {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "Table",
            "metadata": meta,
            "columnDefinitions": columns,
            "rows": rows,
        }


def _check_metadata(body: dict[str, Any]) -> None:
    """A body whose metadata is not an object cannot be read as a Kubernetes object: the API
    server refuses it with 400 Bad Request before admission (null is an absent metadata)."""
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise k8s.KubernetesError(
            status=400,
            reason="BadRequest",
            message=f"metadata must be an object (name, labels, ...), not a JSON {_json_type(meta)}",
            details={"causes": [{"reason": "FieldValueTypeInvalid", "field": "metadata"}]},
        )


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else type(value).__name__


def _object_name(request: rendering.Request) -> str | None:
    """The name of the object a request is about: in its path, or in a create's body."""
    if request.name is not None or request.action != enums.action.CREATE or not isinstance(request.data, dict):
        return request.name
    name = (request.data.get("metadata") or {}).get("name")
    return name if isinstance(name, str) else None


def _object_error(request: rendering.Request, status: int, reason: str, what: str) -> k8s.KubernetesError:
    """The API server's Status for a missing or existing object, e.g. 404 NotFound with
    `postgresclusters.pgbosh.dev "orders" not found` (kmock's own words name kmock)."""
    name = _object_name(request)
    group = request.resource.group if request.resource is not None else ""
    plural = request.resource.plural if request.resource is not None else ""
    qualified = f"{plural}.{group}" if group else str(plural)
    return k8s.KubernetesError(
        status=status,
        reason=reason,
        message=f'{qualified} "{name}" {what}',
        details={"name": name, "group": group, "kind": plural},
    )


def _as_scale(payload: rendering.Payload) -> rendering.Payload:
    """The autoscaling/v1 Scale view of a PostgresCluster (the scale subresource)."""
    if not isinstance(payload, dict):
        return payload
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": payload.get("metadata", {}),
        "spec": {"replicas": (payload.get("spec") or {}).get("instances")},
        "status": {"replicas": (payload.get("status") or {}).get("instanceCount", 0)},
    }


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")] if path else []


def _apply_json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 JSON patch: add, remove, replace and test (what Kubernetes clients send)."""
    doc = copy.deepcopy(document)
    for op in operations:
        parts = _pointer(str(op.get("path", "")))
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1] if parts else ""
        kind = op.get("op")
        if kind == "test":
            actual = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if actual != op.get("value"):
                raise k8s.KubernetesError(status=422, reason="Invalid", message=f"the test of {op['path']} failed")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last, None)
        else:
            raise k8s.KubernetesError(status=422, reason="Invalid", message=f"unsupported JSON patch op {kind!r}")
    return doc


def _replace_data(request: rendering.Request, data: Any) -> None:
    # kmock matches reactions by the identity of the request object it recorded, so the
    # admitted body replaces the parsed one in place rather than in a copy.
    object.__setattr__(request, "data", data)


def _merge_diff(current: Any, updated: Any) -> Any:
    """The merge patch that turns `current` into `updated` (None deletes a key)."""
    if not isinstance(current, dict) or not isinstance(updated, dict):
        return copy.deepcopy(updated)
    patch: dict[str, Any] = {}
    for key in set(current) | set(updated):
        if key not in updated:
            patch[key] = None
        elif key not in current or current[key] != updated[key]:
            patch[key] = _merge_diff(current.get(key), updated[key])
    return patch


def _api_version(request: rendering.Request) -> str:
    assert request.resource is not None
    group = request.resource.group
    return f"{group}/{request.resource.version}" if group else str(request.resource.version)


def _wants_table(request: rendering.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "as=Table" in accept


def _fields_selected(obj: dict[str, Any], selector: str) -> bool:
    """Field selectors as kubectl sends them: `a.b=v`, `a.b==v`, `a.b!=v`, comma-joined."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        path, _, wanted = term.partition("!=" if negate else "=")
        value = _json_path(obj, path.strip())
        matches = str(value if value is not None else "") == wanted.lstrip("=").strip()
        if matches == negate:
            return False
    return True


def _selected(obj: dict[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _plain(response: aiohttp.web.StreamResponse) -> http_server.Response:
    """An aiohttp answer that has not been sent, as the front sends it."""
    if type(response) is not aiohttp.web.Response or response.prepared:
        raise RuntimeError(f"the local API cannot send a {type(response).__name__} from its front")
    body = response.body
    if body is None:
        body = b""
    if not isinstance(body, bytes | bytearray):
        raise RuntimeError(f"the local API cannot send a body of {type(body).__name__} from its front")
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")]
    # aiohttp's type for a body with none given
    content_type = response.headers.get("Content-Type") or "application/octet-stream"
    return http_server.Response(response.status, bytes(body), headers=headers, content_type=content_type)


# A real API server takes request bodies up to 3 MiB.
MAX_BODY = 3 * 1024 * 1024
# Deletions a watch from an older resourceVersion can still be told of (the API server keeps
# about five minutes of changes); a version before the oldest kept gets 410 Expired.
MAX_DELETIONS = 10_000


@attrs.frozen
class _Deletion:
    version: int  # the deletion's own resourceVersion
    born: int  # the version the object was created at
    resource: Any
    last: dict[str, Any]  # the object as it was last

    @property
    def object(self) -> dict[str, Any]:
        """The object as a DELETED event carries it: as it was last, at the deletion's version."""
        return {**self.last, "metadata": {**(self.last.get("metadata") or {}), "resourceVersion": str(self.version)}}

    def watched_by(self, request: rendering.Request) -> bool:
        meta = self.last.get("metadata") or {}
        return (
            self.resource == request.resource
            and (request.namespace is None or meta.get("namespace") == request.namespace)
            and (request.name is None or meta.get("name") == request.name)
        )


def _failure(code: int, reason: str, message: str) -> dict[str, Any]:
    """The API server's Status for a failure (an answer's body, or a watch's ERROR event)."""
    return {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
        "reason": reason, "code": code,
    }  # fmt: skip


async def _chain(first: list[dict[str, Any]], then: AsyncIterator[Any]) -> AsyncIterator[Any]:
    for item in first:
        yield item
    async for item in then:
        yield item


@asynccontextmanager
async def serve(
    host: str = "127.0.0.1", port: int = 0, *, forget_served_requests: bool = False
) -> AsyncIterator[tuple[LocalKubernetes, str]]:
    """Run the local Kubernetes API on a loopback port; yields it and its URL.

    Two servers share the port. The front (controller.http_server, the broker's) reads each
    request's head and answers API calls itself (LocalKubernetes.answer); a connection whose
    request it does not answer (a watch, a test's own reaction) is handed, with every byte not
    yet answered, to aiohttp's server, which kmock runs on, for the rest of its life. Under a
    burst of creates aiohttp's server, request and response objects cost about as much as the
    create itself (benchmarks/broker)."""
    api_obj = LocalKubernetes(forget_served_requests=forget_served_requests)
    async with api_obj as api:
        # kmock's whole path, as kmock.Server runs it (aiohttp's test server): a handler whose
        # client went away is cancelled (a watch ends with its connection), errors in full.
        kmock_server = aiohttp.web.Server(api, handler_cancellation=True, debug=True)

        def hand_over(request: http_server.Request) -> asyncio.BaseProtocol | None:
            return None if api.answers_directly(request) else kmock_server()

        front = http_server.HttpServer(api.answer, hand_over=hand_over, max_body=MAX_BODY)
        await front.start(host, port)
        try:
            address = f"[{host}]" if ":" in host else host
            yield api, f"http://{address}:{front.port}"
        finally:
            await front.stop()
            # What aiohttp's runner does on cleanup: idle connections first, then the rest.
            kmock_server.pre_shutdown()
            await kmock_server.shutdown(60.0)


def write_kubeconfig(path: str, server_url: str, namespace: str = "default") -> None:
    import os

    import yaml

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "pgbosh-local", "cluster": {"server": server_url}}],
        "users": [{"name": "pgbosh-local", "user": {"token": "local-emulator"}}],
        "contexts": [
            {
                "name": "pgbosh-local",
                "context": {"cluster": "pgbosh-local", "user": "pgbosh-local", "namespace": namespace},
            }
        ],
        "current-context": "pgbosh-local",
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


async def _main() -> None:  # pragma: no cover - manual helper
    async with serve(port=18443) as (_, url):
        print(url)
        await asyncio.Event().wait()
