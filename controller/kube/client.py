"""A thin async Kubernetes API client on one reused ``httpx.AsyncClient``.

pgbosh needs a handful of verbs on a few resources (PostgresClusters, Secrets),
so a small client we fully understand beats a generated one: every call has a
timeout, errors carry the API's own Status reason, and Secret values never
reach a log line or an exception message.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx
import orjson
import yaml

from controller import jsonbytes
from controller.http_transport import DEFAULT_MAX_CONNECTIONS, AiohttpTransport, StreamTransport, header_lines

__all__ = ["AiohttpTransport", "Conflict", "Invalid", "KubeClient", "KubeError", "NotFound", "StreamTransport"]

log = logging.getLogger(__name__)

# Seconds. Kubernetes answers in milliseconds when healthy; a slow answer means trouble
# and the caller (a broker request, a reconcile) should fail and retry rather than hang.
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)

JSON = dict[str, Any]

Backend = Literal["httpcore", "aiohttp", "streams"]


class KubeError(Exception):
    """A failed Kubernetes API call, from the API's Status body."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409: the object already exists, or a write lost an optimistic-concurrency race."""


class Invalid(KubeError):
    """422: the API (schema, CEL rules, admission) refused the object."""


# Request bodies as httpx's ``json=`` encodes them (same bytes), without a new encoder a call.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _json_body(body: Any) -> bytes:
    """The bytes httpx's ``json=`` sends (compact UTF-8, NaN and infinities refused), by
    orjson where it writes them the same. (Floats in exponent form differ in spelling
    only: 1e-07, 1e-7.)"""
    return jsonbytes.dumps(body, _JSON_ENCODER, nan_as_fallback=True)


# Parsed URLs kept per API path: a broker sends every provision to one collection URL and
# polls the same objects; parsing one costs ~25 us (httpx validates every component).
URL_CACHE_SIZE = 512


class _NoCookies(httpx.Cookies):
    """A jar that stays empty: no cookie is read from a response or sent."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class _CookielessClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` without a cookie jar, as client-go's (its ``http.Client`` has no Jar).

    The Kubernetes API authenticates every call by its headers and sets no cookies, and
    httpx's jar costs ~65 us of CPU per response (it wraps each one in urllib adapters to
    look for ``Set-Cookie``). Everything else (auth, redirects, hooks, timeouts, logging,
    errors) is httpx's own.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise TypeError("the Kubernetes client keeps no cookies")


def _error_class(status: int) -> type[KubeError]:
    return {404: NotFound, 409: Conflict, 422: Invalid}.get(status, KubeError)


def resource_path(
    group: str,
    version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The API path of a resource collection or object; group "" is the core API."""
    base = f"/api/{version}" if group == "" else f"/apis/{group}/{version}"
    if namespace is not None:
        base += f"/namespaces/{quote(namespace, safe='')}"
    base += f"/{plural}"
    if name is not None:
        base += f"/{quote(name, safe='')}"
        if subresource is not None:
            base += f"/{subresource}"
    elif subresource is not None:
        raise ValueError("a subresource needs an object name")
    return base


def core_path(plural: str, namespace: str | None = None, name: str | None = None) -> str:
    """A core ``v1`` path, such as ``/api/v1/namespaces/ns/secrets/x``."""
    return resource_path("", "v1", plural, namespace, name)


def label_selector_text(selector: Mapping[str, str] | str) -> str:
    if isinstance(selector, str):
        return selector
    return ",".join(f"{key}={value}" for key, value in sorted(selector.items()))


class KubeClient:
    """Async access to one Kubernetes API server. Use as ``async with`` or call ``aclose()``."""

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        client_cert: tuple[str, str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        backend: Backend = "aiohttp",
    ) -> None:
        """The httpx requests go over :class:`AiohttpTransport` (aiohttp's pool: constant time
        per call, where httpcore's re-examines every connection); ``backend="streams"`` over
        :class:`StreamTransport` (HTTP/1.1 on asyncio streams, the least CPU a call: the
        broker's); ``backend="httpcore"`` keeps httpx's own (it honours HTTP(S)_PROXY);
        ``transport`` overrides them."""
        if isinstance(verify, ssl.SSLContext):
            tls: bool | ssl.SSLContext = verify
        elif not verify:
            tls = False
        elif ca_file is not None or client_cert is not None:
            tls = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file is not None else None)
            if client_cert is not None:
                tls.load_cert_chain(client_cert[0], client_cert[1])
        else:
            tls = True
        headers = {"Accept": "application/json", "User-Agent": "pgbosh"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.server = server.rstrip("/")
        if backend not in ("httpcore", "aiohttp", "streams"):
            raise ValueError(f"unknown backend {backend!r}")
        if transport is None and backend == "aiohttp":
            transport = AiohttpTransport(verify=tls, max_connections=max_connections)
        elif transport is None and backend == "streams":
            transport = StreamTransport(verify=tls, max_connections=max_connections)
        self._http = _CookielessClient(
            base_url=self.server,
            headers=headers,
            verify=tls,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        # What build_request would merge into every request, merged once (see _request):
        # the client's headers, with the body's Content-Type (None: no body).
        self._headers: dict[str | None, httpx.Headers] = {}
        self._timeout = self._http.timeout.as_dict()
        # AsyncClient.send wraps each call in auth, redirect, hook and cookie handling (~40 us
        # of CPU); none of it applies to a Kubernetes call over a given transport (the token is
        # a header, the API does not redirect, no hooks, no cookies; httpx applies no proxy
        # from the environment to a given transport). Such calls go straight to the
        # transport, still as httpx requests and responses. backend="httpcore" keeps send.
        self._direct = transport
        # Below httpx's models: a StreamTransport takes the request as bytes and gives the
        # answer as bytes (~0.1 ms of CPU a call less than building and reading httpx's
        # request and response). The same bytes go on the wire (tested).
        self._wire = transport if isinstance(transport, StreamTransport) else None
        self._fields: dict[tuple[str | None, bytes], bytes] = {}
        self._urls: dict[str, httpx.URL] = {}

    @classmethod
    def from_kubeconfig(
        cls,
        path: str | os.PathLike[str],
        *,
        context: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        backend: Backend = "aiohttp",
    ) -> Self:
        """A client for the current (or the named) context of a kubeconfig file."""
        config = yaml.safe_load(Path(path).read_text()) or {}
        context_name = context or config.get("current-context")
        if not context_name:
            raise ValueError(f"kubeconfig {path} has no current-context")
        ctx = _named(config.get("contexts"), context_name, "context", path)
        cluster = _named(config.get("clusters"), ctx.get("cluster"), "cluster", path)
        user = _named(config.get("users"), ctx.get("user"), "user", path) if ctx.get("user") else {}
        server = cluster.get("server")
        if not server:
            raise ValueError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")

        token: str | None = user.get("token")
        if not token and user.get("tokenFile"):
            token = Path(user["tokenFile"]).read_text().strip()

        verify: bool | ssl.SSLContext = True
        if server.startswith("https"):
            if cluster.get("insecure-skip-tls-verify"):
                verify = False
            else:
                ctx_ssl = ssl.create_default_context()
                if cluster.get("certificate-authority-data"):
                    pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
                    ctx_ssl.load_verify_locations(cadata=pem)
                elif cluster.get("certificate-authority"):
                    ctx_ssl.load_verify_locations(cafile=cluster["certificate-authority"])
                _load_client_cert(ctx_ssl, user)
                verify = ctx_ssl
        return cls(server, token=token, verify=verify, max_connections=max_connections, backend=backend)

    @classmethod
    def in_cluster(
        cls,
        *,
        service_account: str = "/var/run/secrets/kubernetes.io/serviceaccount",
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        backend: Backend = "aiohttp",
    ) -> Self:
        """A client for the API server of the cluster this process runs in (service-account token)."""
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token = (Path(service_account) / "token").read_text().strip()
        host = f"[{host}]" if ":" in host else host
        return cls(
            f"https://{host}:{port}",
            token=token,
            ca_file=Path(service_account) / "ca.crt",
            max_connections=max_connections,
            backend=backend,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        api_path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        # The request client.request(method, url, json=body, params=params, headers=...) builds,
        # built from parts merged once: the client's headers, timeout and parsed URLs.
        # build_request merges and re-parses them on every call (~100 us of CPU).
        url = self._url(api_path)
        if params:
            url = url.copy_merge_params(params)
        content = None if body is None else _json_body(body)
        if self._wire is not None:
            return await self._wire_request(method, api_path, url, content, content_type)
        request = httpx.Request(
            method,
            url,
            headers=self._headers_for(content_type if body is not None else None),
            content=content,
            extensions={"timeout": self._timeout},
        )
        try:
            if self._direct is not None:
                response = await self._direct.handle_async_request(request)
                response.request = request
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            else:
                response = await self._http.send(request)
        except httpx.TimeoutException as exc:
            raise KubeError(504, "Timeout", f"{method} {api_path} timed out") from exc
        except httpx.TransportError as exc:
            raise KubeError(503, "Unavailable", f"{method} {api_path}: {type(exc).__name__}") from exc
        return self._answer(method, api_path, response.status_code, response.reason_phrase, response.content)

    async def _wire_request(
        self, method: str, api_path: str, url: httpx.URL, content: bytes | None, content_type: str
    ) -> JSON:
        assert self._wire is not None
        fields = self._wire_fields(content_type if content is not None else None, url)
        if content is not None:
            fields += b"Content-Length: %d\r\n" % len(content)
        try:
            status, reason, headers, data = await self._wire.exchange(
                method, url, fields, content or b"", self._timeout
            )
            if any(name.lower() == b"content-encoding" for name, _ in headers):
                # Compressed (an API server gzips large lists): httpx's decoders, as on the other paths.
                data = httpx.Response(status, headers=headers, stream=httpx.ByteStream(data)).read()
        except httpx.TimeoutException as exc:
            raise KubeError(504, "Timeout", f"{method} {api_path} timed out") from exc
        except httpx.TransportError as exc:
            raise KubeError(503, "Unavailable", f"{method} {api_path}: {type(exc).__name__}") from exc
        except httpx.DecodingError as exc:
            raise KubeError(502, "BadResponse", f"{method} {api_path}: {exc}") from exc
        return self._answer(method, api_path, status, reason.decode("latin-1"), data)

    def _answer(self, method: str, api_path: str, status: int, reason: str, content: bytes) -> JSON:
        if 200 <= status < 300:
            # orjson: a Kubernetes object's JSON read ~3 times faster than by the json module.
            data = orjson.loads(content) if content else {}
            return data if isinstance(data, dict) else {"items": data}
        reason, message = _status_of(reason, content)
        log.debug("kubernetes %s %s -> %s %s", method, api_path, status, reason)
        raise _error_class(status)(status, reason, message)

    def _wire_fields(self, content_type: str | None, url: httpx.URL) -> bytes:
        """The header lines httpx would send for a request to ``url`` (Host first, then the
        client's headers and the Content-Type), made once per server and content type."""
        key = (content_type, url.netloc)
        fields = self._fields.get(key)
        if fields is None:
            fields = header_lines(httpx.Request("GET", url, headers=self._headers_for(content_type)).headers.raw)
            self._fields[key] = fields
        return fields

    def _headers_for(self, content_type: str | None) -> httpx.Headers:
        headers = self._headers.get(content_type)
        if headers is None:
            headers = httpx.Headers(self._http.headers)
            if content_type is not None:
                headers["Content-Type"] = content_type
            self._headers[content_type] = headers
        return headers

    def _url(self, api_path: str) -> httpx.URL:
        url = self._urls.get(api_path)
        if url is None:
            # The URL httpx would merge from base_url: the server's, then the path (an
            # absolute URL is taken as it is).
            url = httpx.URL(self.server + api_path if api_path.startswith("/") else api_path)
            if url.is_relative_url:
                url = httpx.URL(f"{self.server}/{api_path}")
            if len(self._urls) >= URL_CACHE_SIZE:
                self._urls.pop(next(iter(self._urls)))
            self._urls[api_path] = url
        return url

    async def get(self, api_path: str) -> JSON:
        return await self._request("GET", api_path)

    async def list(
        self, api_path: str, label_selector: Mapping[str, str] | str | None = None
    ) -> list[JSON]:
        params = {"labelSelector": label_selector_text(label_selector)} if label_selector else None
        data = await self._request("GET", api_path, params=params)
        items = data.get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def create(self, api_path: str, body: Mapping[str, Any]) -> JSON:
        return await self._request("POST", api_path, body=dict(body))

    async def merge_patch(self, api_path: str, body: Mapping[str, Any]) -> JSON:
        return await self._request(
            "PATCH", api_path, body=dict(body), content_type="application/merge-patch+json"
        )

    async def delete(self, api_path: str, *, propagation_policy: str | None = None) -> JSON:
        body = {"propagationPolicy": propagation_policy} if propagation_policy else None
        return await self._request("DELETE", api_path, body=body)

    # Secrets: values are decoded/encoded here and never logged.

    async def get_secret(self, namespace: str, name: str) -> dict[str, str]:
        """The decoded data of a Secret; NotFound when it does not exist."""
        secret = await self.get(core_path("secrets", namespace, name))
        data = secret.get("data") or {}
        decoded = {key: base64.b64decode(value).decode() for key, value in data.items()}
        for key, value in (secret.get("stringData") or {}).items():
            decoded.setdefault(key, value)
        return decoded

    async def apply_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Create the Secret, or replace its data (keys not in ``data`` are removed)."""
        encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
        metadata: JSON = {"name": name, "namespace": namespace}
        if labels:
            metadata["labels"] = dict(labels)
        if annotations:
            metadata["annotations"] = dict(annotations)
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": metadata,
            "data": encoded,
        }
        try:
            await self.create(core_path("secrets", namespace), body)
            log.info("created secret %s/%s (keys: %s)", namespace, name, ", ".join(sorted(data)))
            return
        except Conflict:
            pass
        existing = await self.get(core_path("secrets", namespace, name))
        patch_data: dict[str, str | None] = {key: None for key in existing.get("data") or {}}
        patch_data.update(encoded)
        patch: JSON = {"metadata": {k: v for k, v in metadata.items() if k in ("labels", "annotations")}}
        patch["data"] = patch_data
        await self.merge_patch(core_path("secrets", namespace, name), patch)
        log.info("replaced secret %s/%s (keys: %s)", namespace, name, ", ".join(sorted(data)))

    async def delete_secret(self, namespace: str, name: str) -> bool:
        """Delete a Secret; False when it was already gone."""
        try:
            await self.delete(core_path("secrets", namespace, name))
        except NotFound:
            return False
        return True


def _named(entries: Any, name: Any, what: str, path: str | os.PathLike[str]) -> JSON:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(what) or {}
            if isinstance(value, dict):
                return value
    raise ValueError(f"kubeconfig {path} has no {what} named {name!r}")


def _load_client_cert(context: ssl.SSLContext, user: Mapping[str, Any]) -> None:
    if user.get("client-certificate") and user.get("client-key"):
        context.load_cert_chain(user["client-certificate"], user["client-key"])
        return
    if user.get("client-certificate-data") and user.get("client-key-data"):
        # The ssl module loads a key only from a file: write both to a private temp dir
        # for the moment of loading.
        with tempfile.TemporaryDirectory(prefix="pgbosh-kube-") as tmp:
            cert = Path(tmp) / "cert.pem"
            key = Path(tmp) / "key.pem"
            for target, field in ((cert, "client-certificate-data"), (key, "client-key-data")):
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(base64.b64decode(user[field]))
            context.load_cert_chain(str(cert), str(key))


def _status_of(reason: str, content: bytes) -> tuple[str, str]:
    """The reason and message of a failed call, from the API's Status body."""
    try:
        data = json.loads(content)
    except ValueError:
        return reason or "Error", content.decode("utf-8", "replace")[:200]
    if not isinstance(data, dict):
        return reason or "Error", ""
    return str(data.get("reason") or reason or "Error"), str(data.get("message") or "")
