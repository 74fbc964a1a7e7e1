"""The OSB v2.17 HTTP surface (on ``controller.http_server``): auth, headers, routing, error bodies.

``BrokerServer`` runs in-process (tests, ``pgbosh dev``) on any port, port 0
picking a free one::

    async with BrokerServer(broker, credentials, host="127.0.0.1", port=0) as server:
        print(server.url)
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import yaml

from controller.broker.errors import BrokerError
from controller.broker.service import Answer, Broker
from controller.http_server import Handler, HttpError, HttpServer, Request, Response, Router, error_response
from controller.kube import KubeClient, KubeError

log = logging.getLogger(__name__)

API_VERSION_HEADER = "X-Broker-API-Version"
REQUEST_IDENTITY_HEADER = "X-Broker-API-Request-Identity"
ORIGINATING_IDENTITY_HEADER = "X-Broker-API-Originating-Identity"
# The same, as the HTTP server's request headers are keyed (lower case).
_API_VERSION, _REQUEST_IDENTITY, _ORIGINATING_IDENTITY = (
    name.lower() for name in (API_VERSION_HEADER, REQUEST_IDENTITY_HEADER, ORIGINATING_IDENTITY_HEADER)
)
# The semantics implemented are v2.17's; older 2.x platforms send a subset of its fields.
MIN_MINOR_VERSION = 13
MAX_MINOR_VERSION = 17


@dataclass(frozen=True)
class BasicCredentials:
    username: str
    password: str

    def __repr__(self) -> str:
        return f"BasicCredentials(username={self.username!r}, password=<hidden>)"

    def matches(self, authorization: str | None) -> bool:
        """Constant-time check of an ``Authorization: Basic ...`` header."""
        if not authorization or not authorization.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        # Both comparisons always run, so timing does not reveal which part was wrong.
        user_ok = hmac.compare_digest(user, self.username.encode())
        password_ok = hmac.compare_digest(password, self.password.encode())
        return bool(sep) and user_ok and password_ok

    @classmethod
    def from_file(cls, path: str | Path) -> BasicCredentials:
        """A YAML/JSON file ``{username: ..., password: ...}`` or one line ``user:password``."""
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict) and data.get("username") and data.get("password"):
            return cls(str(data["username"]), str(data["password"]))
        line = text.strip()
        if ":" in line and "\n" not in line:
            user, _, password = line.partition(":")
            if user and password:
                return cls(user, password)
        raise ValueError(f"{path}: expected username and password (YAML keys, or one line user:password)")

    @classmethod
    async def from_secret(cls, kube: KubeClient, namespace: str, name: str) -> BasicCredentials:
        data = await kube.get_secret(namespace, name)
        if not data.get("username") or not data.get("password"):
            raise ValueError(f"Secret {namespace}/{name} needs keys username and password")
        return cls(data["username"], data["password"])


def _error(status: int, error: str, description: str) -> Response:
    return Response.json({"error": error, "description": description}, status)


def _originating_identity(header: str | None) -> str:
    """``platform user`` from the header, for the log only (never trusted for auth)."""
    if not header:
        return "-"
    return _decode_identity(header)


@functools.lru_cache(maxsize=256)
def _decode_identity(header: str) -> str:
    # A platform sends the same few users' headers over and over: decode each once.
    platform, _, encoded = header.partition(" ")
    try:
        value = json.loads(base64.b64decode(encoded.strip() + "=" * (-len(encoded.strip()) % 4)))
    except (ValueError, binascii.Error):
        return f"{platform} <undecodable>"
    if not isinstance(value, dict):
        return platform
    user = value.get("user_id") or value.get("username") or value.get("uid") or "?"
    return f"{platform} {user}"


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# One decoder for all bodies (json.loads with an option builds a new one per call).
_BODY_JSON = json.JSONDecoder(parse_constant=_not_json)


def _version_supported(header: str | None) -> bool:
    if not header:
        return False
    major, _, minor = header.strip().partition(".")
    return major == "2" and minor.isdigit() and MIN_MINOR_VERSION <= int(minor) <= MAX_MINOR_VERSION


def build_app(broker: Broker, credentials: BasicCredentials) -> Handler:
    """The broker's HTTP handler: credentials, API version, routing, errors, the log line."""

    async def protocol(request: Request) -> Response:
        started = time.perf_counter()
        headers = request.headers
        identity = headers.get(_REQUEST_IDENTITY)
        response: Response
        if not credentials.matches(headers.get("authorization")):
            response = _error(401, "Unauthorized", "missing or wrong broker credentials")
            response.headers.append(("WWW-Authenticate", 'Basic realm="pgbosh"'))
        elif not _version_supported(headers.get(_API_VERSION)):
            response = _error(
                412,
                "PreconditionFailed",
                f"{API_VERSION_HEADER} must be 2.{MIN_MINOR_VERSION} to 2.{MAX_MINOR_VERSION}"
                f" (got {headers.get(_API_VERSION) or 'none'})",
            )
        else:
            try:
                response = await router.resolve(request)(request)
            except HttpError as exc:
                response = error_response(exc)
            except BrokerError as exc:
                response = Response.json(exc.document(), exc.status)
            except KubeError as exc:
                log.warning("kubernetes error on %s %s: %s", request.method, request.path, exc)
                response = _error(
                    502, "KubernetesUnavailable", f"the Kubernetes API answered {exc.status} {exc.reason}"
                )
            except Exception:
                log.exception("internal error on %s %s", request.method, request.path)
                response = _error(500, "InternalError", "the broker failed; see its log")
        if identity:
            response.headers.append((REQUEST_IDENTITY_HEADER, identity))
        # The one line per request above debug: who asked for what (issue 6), never a password.
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s -> %s in %.1f ms (identity: %s, request: %s)",
                request.method,
                request.path,
                response.status,
                (time.perf_counter() - started) * 1000,
                _originating_identity(headers.get(_ORIGINATING_IDENTITY)),
                identity or "-",
            )
        return response

    def body_of(request: Request) -> Any:
        if not request.body:
            return {}
        try:
            # From bytes: json detects the UTF encoding itself; bad UTF-8 is a ValueError too.
            # NaN and Infinity are not JSON (RFC 8259), though Python's json reads them.
            body = request.body
            return _BODY_JSON.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
        except ValueError:
            raise BrokerError(400, "BadRequest", "the request body is not valid JSON") from None

    def answer(result: Answer) -> Response:
        status, body = result
        return Response.json(body, status)

    def accepts_incomplete(request: Request) -> bool:
        return request.query.get("accepts_incomplete", "").lower() == "true"

    async def catalog(request: Request) -> Response:
        return answer(broker.catalog())

    async def provision(request: Request) -> Response:
        body = body_of(request)
        return answer(await broker.provision(request.match_info["instance_id"], body, accepts_incomplete(request)))

    async def update(request: Request) -> Response:
        body = body_of(request)
        return answer(await broker.update(request.match_info["instance_id"], body, accepts_incomplete(request)))

    async def deprovision(request: Request) -> Response:
        return answer(
            await broker.deprovision(
                request.match_info["instance_id"],
                request.query.get("service_id"),
                request.query.get("plan_id"),
                accepts_incomplete(request),
            )
        )

    async def fetch_instance(request: Request) -> Response:
        return answer(await broker.fetch_instance(request.match_info["instance_id"]))

    async def last_operation(request: Request) -> Response:
        status, body = await broker.last_operation(request.match_info["instance_id"], request.query.get("operation"))
        response = Response.json(body, status)
        if body.get("state") == "in progress":
            response.headers.append(("Retry-After", str(broker.config.retry_after)))
        return response

    async def bind(request: Request) -> Response:
        body = body_of(request)
        return answer(await broker.bind(request.match_info["instance_id"], request.match_info["binding_id"], body))

    async def fetch_binding(request: Request) -> Response:
        return answer(await broker.fetch_binding(request.match_info["instance_id"], request.match_info["binding_id"]))

    async def unbind(request: Request) -> Response:
        return answer(
            await broker.unbind(
                request.match_info["instance_id"],
                request.match_info["binding_id"],
                request.query.get("service_id"),
                request.query.get("plan_id"),
            )
        )

    router = Router()
    instance = "/v2/service_instances/{instance_id}"
    binding = instance + "/service_bindings/{binding_id}"
    router.add("GET", "/v2/catalog", catalog)
    router.add("PUT", instance, provision)
    router.add("PATCH", instance, update)
    router.add("DELETE", instance, deprovision)
    router.add("GET", instance, fetch_instance)
    router.add("GET", instance + "/last_operation", last_operation)
    router.add("PUT", binding, bind)
    router.add("GET", binding, fetch_binding)
    router.add("DELETE", binding, unbind)
    return protocol


class BrokerServer:
    """The broker's HTTP server, started and stopped in-process."""

    def __init__(
        self,
        broker: Broker,
        credentials: BasicCredentials,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reuse_port: bool = False,
    ) -> None:
        """``reuse_port``: listen with SO_REUSEPORT, beside other processes on the same port
        (``pgbosh broker serve --workers``)."""
        self.broker = broker
        self.credentials = credentials
        self.host = host
        self._port = port
        self._reuse_port = reuse_port
        self._http = HttpServer(build_app(broker, credentials))

    @property
    def port(self) -> int:
        return self._http.port or self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await self._http.start(self.host, self._port, reuse_port=self._reuse_port)
        log.info("broker listening on %s", self.url)

    async def stop(self) -> None:
        url = self.url
        await self._http.stop()
        log.info("broker on %s stopped", url)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
