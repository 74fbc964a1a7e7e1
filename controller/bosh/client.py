"""An async client of the BOSH Director API (the subset pgbosh uses).

One :class:`DirectorClient` holds one ``httpx.AsyncClient`` for its whole life; tests
(and the local world) pass a transport instead of replacing the class. Conventions
follow bosh-cli (`director/client_request.go`, `director/task_client_request.go`,
`uaa/*.go`) and the Director's controllers: see ../shared/contracts/bosh-director-api.md.

Safety rules kept here:
- Only idempotent calls are retried (GET, and the resurrection PUT). A call that starts
  work (POST /deployments, DELETE, job state changes) is sent once: when its answer is
  lost, the caller finds its task by context id (:meth:`DirectorClient.tasks`).
- Exception messages name the method, path and Director, never a header, the client
  secret or a token (:meth:`DirectorClient._scrub` removes them from anything the
  server echoes back).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx
import yaml

from controller.bosh.config import BoshConfig
from controller.bosh.types import CloudConfig, Director, Instance, JobStateRequest, Task, TaskEvent
from controller.http_transport import AiohttpTransport

_TASK_LOCATION = re.compile(r"/tasks/(\d+)/?$")
_SUCCESS = frozenset({200, 201, 204, 206, 302, 303})


class BoshError(Exception):
    """Anything that went wrong talking to the Director or its UAA."""


class DirectorError(BoshError):
    """The Director answered with an error status."""

    def __init__(
        self, status: int, code: int | None, description: str, method: str, path: str, director: str = ""
    ) -> None:
        self.status = status
        self.code = code
        self.description = description
        self.method = method
        self.path = path
        self.director = director
        where = f" at {director}" if director else ""
        what = f"code {code}: {description}" if code is not None else description
        super().__init__(f"{method} {path}{where} failed with HTTP {status}" + (f" ({what})" if what else ""))

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def server_side(self) -> bool:
        return self.status >= 500


class DirectorUnavailable(BoshError):
    """No answer: connection refused or reset, DNS, TLS, or a timeout."""

    def __init__(
        self, method: str, path: str, reason: str, attempts: int, director: str = "", retried: bool = True
    ) -> None:
        self.method = method
        self.path = path
        self.reason = reason
        self.attempts = attempts
        self.director = director
        where = f" at {director}" if director else ""
        tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
        note = "" if retried else " (not retried: it may have started a task; look it up by context id)"
        super().__init__(f"{method} {path}{where} got no answer{tries}: {reason}{note}")


class AuthenticationFailed(BoshError):
    """UAA refused the client credentials (a Director 401 with a fresh token is a DirectorError)."""


class TaskFailed(BoshError):
    """A task pgbosh waited on ended in error, cancelled or timeout, or took too long."""

    def __init__(self, task_id: int, state: str, detail: str = "", *, gave_up_after: float | None = None) -> None:
        self.task_id = task_id
        self.state = state
        self.detail = detail
        self.gave_up_after = gave_up_after
        if gave_up_after is not None:
            message = f"gave up waiting for BOSH task {task_id}: still '{state}' after {gave_up_after:g}s"
        else:
            message = f"BOSH task {task_id} ended in state '{state}'" + (f": {detail}" if detail else "")
        super().__init__(message)


@dataclass(frozen=True)
class DirectorInfo:
    name: str
    uuid: str
    version: str
    auth_type: str  # "uaa" | "basic" | "" (none announced)
    uaa_url: str | None
    user: str | None


@dataclass
class _Token:
    value: str
    type: str
    expires_at: float  # on the client's clock
    lifetime: float

    def due(self, now: float, margin: float) -> bool:
        # A token shorter-lived than twice the margin is renewed at half its life, not on every call.
        return now >= self.expires_at - min(margin, self.lifetime / 2)


# UAA always sends expires_in; if a server does not, assume this many seconds (a 401 still renews).
_ASSUMED_TOKEN_LIFETIME = 300.0


Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


class DirectorClient:
    """Implements :class:`controller.bosh.types.Director` over HTTP."""

    def __init__(
        self,
        config: BoshConfig | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.config = config or BoshConfig()
        self._sleep = sleep
        self._clock = clock
        self._draw = draw
        self._director = self.config.director_url.rstrip("/")
        t = self.config.timeouts
        if transport is None:
            # httpx's requests and errors over aiohttp's pool: httpcore's pool re-examines every
            # connection for every queued request, the largest CPU cost of an operator with
            # 1,000 clusters (benchmarks/scale). The operator never has more calls in flight
            # than it reconciles at once.
            transport = AiohttpTransport(verify=self._ssl_context(), max_connections=self.config.max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.config.director_url.rstrip("/"),
            transport=transport,
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
            follow_redirects=False,  # a 302 to /tasks/:id is a task id, not a page to fetch
        )
        self._info: DirectorInfo | None = None
        self._token: _Token | None = None
        self._issued_tokens: list[str] = []  # recent ones, to scrub from messages
        self._auth_lock = asyncio.Lock()

    def _ssl_context(self) -> ssl.SSLContext:
        # Verification is always on; the CA bundle only chooses which roots to trust.
        if self.config.ca_cert is not None:
            try:
                return ssl.create_default_context(cafile=str(self.config.ca_cert))
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
                raise BoshError(
                    f"the CA bundle {self.config.ca_cert} for the Director {self._director} cannot be used: {reason}"
                ) from None
        return ssl.create_default_context()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> DirectorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- authentication -------------------------------------------------------------

    async def info(self, *, refresh: bool = False) -> DirectorInfo:
        """`GET /info` (no auth needed); cached, since it decides how to log in."""
        if self._info is None or refresh:
            response = await self._send("GET", "/info", idempotent=True, authenticated=False)
            raw = self._decode(response, "GET", "/info")
            if not isinstance(raw, dict):
                raise self._unexpected(response, "GET", "/info", "not a JSON object")
            auth: dict[str, Any] = raw.get("user_authentication") or {}
            options: dict[str, Any] = auth.get("options") or {}
            self._info = DirectorInfo(
                name=str(raw.get("name") or ""),
                uuid=str(raw.get("uuid") or ""),
                version=str(raw.get("version") or ""),
                auth_type=str(auth.get("type") or ""),
                uaa_url=str(options["url"]).rstrip("/") if options.get("url") else None,
                user=raw.get("user") or None,
            )
        return self._info

    def _has_credentials(self) -> bool:
        return bool(self.config.client_id) and bool(self.config.client_secret)

    async def _authorization(self, *, refused: str | None = None) -> str | None:
        """The Authorization header value for the Director, or None (no auth configured).

        `refused` is a header the Director answered 401 to: that token is replaced, once,
        however many calls saw the 401 at the same time.
        """
        if not self._has_credentials():
            return None
        info = await self.info()
        secret = self.config.client_secret.reveal() if self.config.client_secret else ""
        if info.auth_type != "uaa":
            pair = f"{self.config.client_id}:{secret}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        async with self._auth_lock:
            token = self._token
            renew = token is not None and refused == f"{token.type} {token.value}"
            if renew or token is None or token.due(self._clock(), self.config.token_refresh_margin):
                self._token = token = await self._fetch_token(info)
                self._issued_tokens = [*self._issued_tokens[-4:], token.value]
            return f"{token.type} {token.value}"

    async def _fetch_token(self, info: DirectorInfo) -> _Token:
        if not info.uaa_url:
            raise AuthenticationFailed(
                f"the Director at {self._director} announces UAA auth without a UAA url in GET /info"
            )
        url = f"{info.uaa_url}/oauth/token"
        secret = self.config.client_secret.reveal() if self.config.client_secret else ""
        attempts = self.config.retry.attempts  # asking for a token changes nothing: safe to retry
        attempt = 0
        while True:
            attempt += 1
            started = self._clock()
            try:
                response = await self._http.post(
                    url,
                    data={"grant_type": "client_credentials"},
                    auth=(self.config.client_id, secret),
                    headers={"Accept": "application/json"},
                    timeout=self.config.timeouts.token,
                )
            except httpx.TransportError as exc:
                if attempt < attempts:
                    await self._sleep(self.config.retry.delay(attempt, self._draw()))
                    continue
                reason = self._scrub(self._describe(exc))
                raise DirectorUnavailable("POST", "/oauth/token", reason, attempt, info.uaa_url) from None
            if response.status_code >= 500:
                if attempt < attempts:
                    await self._sleep(self.config.retry.delay(attempt, self._draw()))
                    continue
                body = self._scrub(response.text.strip()[:300])
                raise DirectorError(response.status_code, None, body, "POST", "/oauth/token", info.uaa_url)
            break
        if response.status_code != 200:
            body = self._scrub(response.text[:300])
            raise AuthenticationFailed(
                f"UAA at {info.uaa_url} refused a token for client '{self.config.client_id}': "
                f"HTTP {response.status_code} {body}".rstrip()
            )
        try:
            raw = response.json()
            value = str(raw["access_token"])
        except (ValueError, KeyError, TypeError):
            raise AuthenticationFailed(
                f"UAA at {info.uaa_url} answered a token request without an access_token"
            ) from None
        lifetime = float(raw.get("expires_in") or _ASSUMED_TOKEN_LIFETIME)
        token_type = str(raw.get("token_type") or "bearer")
        return _Token(value=value, type=token_type, expires_at=started + lifetime, lifetime=lifetime)

    def _scrub(self, text: str) -> str:
        """Remove the client secret and the current token from text that leaves this class."""
        secret = self.config.client_secret.reveal() if self.config.client_secret else ""
        basic = base64.b64encode(f"{self.config.client_id}:{secret}".encode()).decode() if secret else ""
        for sensitive in (secret, basic, *self._issued_tokens):
            if sensitive:
                text = text.replace(sensitive, "[redacted]")
        return text

    # ---- the request core -----------------------------------------------------------

    @staticmethod
    def _describe(exc: httpx.TransportError) -> str:
        kind = type(exc).__name__
        detail = str(exc)
        return f"{kind}: {detail}" if detail else kind

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool,
        authenticated: bool = True,
        allow: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        """One logical call: auth, bounded retries (idempotent calls only), error mapping.

        Statuses in ``allow`` are returned to the caller instead of raising.
        """
        attempts = self.config.retry.attempts if idempotent else 1
        renewed = False
        attempt = 0
        while True:
            attempt += 1
            request_headers = dict(headers or {})
            authorization = None
            if authenticated:
                authorization = await self._authorization()
                if authorization:
                    request_headers["Authorization"] = authorization
            try:
                response = await self._http.request(
                    method, path, params=params, content=content, headers=request_headers
                )
            except httpx.TransportError as exc:
                if attempt < attempts:
                    await self._sleep(self.config.retry.delay(attempt, self._draw()))
                    continue
                raise DirectorUnavailable(
                    method,
                    path,
                    self._scrub(self._describe(exc)),
                    attempt,
                    self._director,
                    retried=idempotent,
                ) from None
            status = response.status_code
            if status in allow or status in _SUCCESS:
                return response
            if status == 401 and authenticated and not renewed and self._token is not None:
                # The token may have been revoked or the clock skewed: one fresh token, once.
                renewed = True
                attempt -= 1
                await self._authorization(refused=authorization)
                continue
            if status >= 500 and attempt < attempts:
                await self._sleep(self.config.retry.delay(attempt, self._draw()))
                continue
            raise self._error(response, method, path)

    def _error(self, response: httpx.Response, method: str, path: str) -> DirectorError:
        code: int | None = None
        description = ""
        try:
            body = response.json()
        except ValueError:
            description = response.text.strip()[:500]
        else:
            if isinstance(body, dict):
                raw_code = body.get("code")
                code = raw_code if isinstance(raw_code, int) else None
                description = str(body.get("description") or body.get("message") or "")
            else:
                description = str(body)[:500]
        return DirectorError(response.status_code, code, self._scrub(description), method, path, self._director)

    async def _json(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None, authenticated: bool = True
    ) -> Any:
        response = await self._send(method, path, params=params, idempotent=True, authenticated=authenticated)
        return self._decode(response, method, path)

    def _decode(self, response: httpx.Response, method: str, path: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise self._unexpected(response, method, path, "the answer is not JSON") from None

    def _unexpected(self, response: httpx.Response, method: str, path: str, what: str) -> DirectorError:
        """A success status whose body is not what the Director API promises."""
        return DirectorError(response.status_code, None, f"unexpected answer: {what}", method, path, self._director)

    def _task_id(self, response: httpx.Response, method: str, path: str) -> int:
        location = response.headers.get("location", "")
        match = _TASK_LOCATION.search(urlsplit(location).path)
        if response.status_code not in (302, 303) or not match:
            raise DirectorError(
                response.status_code,
                None,
                f"expected a redirect to /tasks/<id>, got Location '{location}'",
                method,
                path,
                self._director,
            )
        return int(match.group(1))

    @staticmethod
    def _context_headers(context_id: str) -> dict[str, str]:
        return {"X-Bosh-Context-Id": context_id} if context_id else {}

    # ---- the Director protocol -------------------------------------------------------

    async def cloud_config(self) -> CloudConfig:
        configs = await self._json("GET", "/configs", params={"type": "cloud", "latest": "true"})
        # Newer directors may hold several named cloud configs; they apply merged.
        azs: list[str] = []
        vm_types: list[str] = []
        disk_types: dict[str, int] = {}
        networks: list[str] = []
        for entry in configs or ():
            doc = yaml.safe_load(entry.get("content") or "") or {}
            if not isinstance(doc, dict):
                continue
            part = CloudConfig.from_manifest(doc)
            azs += [a for a in part.azs if a not in azs]
            vm_types += [v for v in part.vm_types if v not in vm_types]
            disk_types.update(part.disk_types)
            networks += [n for n in part.networks if n not in networks]
        return CloudConfig(azs=tuple(azs), vm_types=tuple(vm_types), disk_types=disk_types, networks=tuple(networks))

    async def deployed_manifest(self, deployment: str) -> str | None:
        response = await self._send("GET", f"/deployments/{_seg(deployment)}", idempotent=True, allow=frozenset({404}))
        if response.status_code == 404:
            return None
        body = self._decode(response, "GET", f"/deployments/{_seg(deployment)}")
        manifest = body.get("manifest") if isinstance(body, dict) else None
        return str(manifest) if manifest is not None else None

    async def deployments(self) -> list[str]:
        return [str(d["name"]) for d in await self._json("GET", "/deployments") if "name" in d]

    async def deploy(
        self,
        manifest: str,
        *,
        context_id: str,
        recreate: bool = False,
        fix: bool = False,
        skip_drain: bool = False,
        dry_run: bool = False,
    ) -> int:
        params = {
            k: "true"
            for k, on in (
                ("recreate", recreate),
                ("fix", fix),
                ("skip_drain", skip_drain),
                ("dry_run", dry_run),
            )
            if on
        }
        headers = {"Content-Type": "text/yaml", **self._context_headers(context_id)}
        response = await self._send(
            "POST",
            "/deployments",
            params=params,
            content=manifest.encode(),
            headers=headers,
            idempotent=False,
        )
        return self._task_id(response, "POST", "/deployments")

    async def delete_deployment(self, deployment: str, *, context_id: str, force: bool = True) -> int | None:
        path = f"/deployments/{_seg(deployment)}"
        response = await self._send(
            "DELETE",
            path,
            params={"force": "true"} if force else None,
            headers=self._context_headers(context_id),
            idempotent=False,
            allow=frozenset({404}),
        )
        if response.status_code == 404:
            return None
        return self._task_id(response, "DELETE", path)

    async def task(self, task_id: int) -> Task:
        path = f"/tasks/{int(task_id)}"
        response = await self._send("GET", path, idempotent=True)
        try:
            return _task_from_json(self._decode(response, "GET", path))
        except (KeyError, TypeError, ValueError) as exc:
            raise self._unexpected(response, "GET", path, f"not a task ({exc!r})") from None

    async def task_events(self, task_id: int, offset: int = 0) -> tuple[list[TaskEvent], int]:
        chunk, offset = await self.task_output(task_id, "event", offset)
        return parse_events(chunk), offset

    async def task_output(self, task_id: int, type_: str, offset: int = 0) -> tuple[bytes, int]:
        """Complete lines of a task output from byte `offset` on, and the offset after them.

        A line still being written stays for the next call, so events are never cut.
        """
        path = f"/tasks/{int(task_id)}/output"
        response = await self._send(
            "GET",
            path,
            params={"type": type_},
            headers={"Range": f"bytes={offset}-"},
            idempotent=True,
            allow=frozenset({416}),
        )
        if response.status_code in (204, 416):  # nothing yet / nothing new
            return b"", offset
        body = response.content
        if response.status_code == 200 and offset:
            body = body[offset:]  # the server ignored Range and sent everything
        end = body.rfind(b"\n") + 1
        return body[:end], offset + end

    async def tasks(
        self,
        *,
        deployment: str | None = None,
        context_id: str | None = None,
        states: tuple[str, ...] = (),
        limit: int | None = None,
        verbose: int = 2,
    ) -> list[Task]:
        params: dict[str, str] = {"verbose": str(verbose)}
        if deployment:
            params["deployment"] = deployment
        if context_id:
            params["context_id"] = context_id
        if states:
            params["state"] = ",".join(states)
        if limit is not None:
            params["limit"] = str(limit)
        response = await self._send("GET", "/tasks", params=params, idempotent=True)
        try:
            return [_task_from_json(t) for t in self._decode(response, "GET", "/tasks")]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._unexpected(response, "GET", "/tasks", f"not a list of tasks ({exc!r})") from None

    async def wait_for_task(
        self,
        task_id: int,
        *,
        give_up_after: float | None = None,
        on_events: Callable[[list[TaskEvent]], Awaitable[None]] | None = None,
    ) -> Task:
        """Poll a task until it finishes, handing new events to `on_events` as they come.

        Raises :class:`TaskFailed` when it does not end `done` (with the task's error event
        as detail) or when `give_up_after` seconds pass.
        """
        deadline = None if give_up_after is None else self._clock() + give_up_after
        offset = 0
        last_error = ""
        while True:
            task = await self.task(task_id)
            # Output after state, so a finished task's events are complete (bosh-cli does the same).
            events, offset = await self.task_events(task_id, offset)
            for event in events:
                if event.error:
                    last_error = event.error
            if events and on_events is not None:
                await on_events(events)
            if task.finished:
                if not task.succeeded:
                    raise TaskFailed(task_id, task.state, self._scrub(last_error or (task.result or "")))
                return task
            if deadline is not None and self._clock() >= deadline:
                raise TaskFailed(task_id, task.state, gave_up_after=give_up_after)
            await self._sleep(self.config.timeouts.task_poll_interval)

    async def instances_brief(self, deployment: str) -> list[Instance]:
        # deployments_controller.rb `get '/:deployment/instances'` without format=full answers at
        # once from the database: job, index, id, az, ips, expects_vm; no agent is asked.
        rows = await self._json("GET", f"/deployments/{_seg(deployment)}/instances")
        return [Instance.from_json({**row, "job_state": None}) for row in rows if row.get("expects_vm", True)]

    async def instances(self, deployment: str) -> list[Instance]:
        path = f"/deployments/{_seg(deployment)}/instances"
        # Starts a read-only task, so a retry is harmless.
        response = await self._send("GET", path, params={"format": "full"}, idempotent=True)
        task_id = self._task_id(response, "GET", path)
        await self.wait_for_task(task_id, give_up_after=self.config.timeouts.instances_task)
        output = f"/tasks/{task_id}/output"
        result = await self._send("GET", output, params={"type": "result"}, idempotent=True)
        try:
            return parse_instances(result.content)
        except (ValueError, TypeError, AttributeError) as exc:
            raise self._unexpected(result, "GET", output, f"not instance lines ({exc!r})") from None

    async def set_resurrection(self, deployment: str, group: str, instance_id: str, *, paused: bool) -> None:
        path = f"/deployments/{_seg(deployment)}/jobs/{_seg(group)}/{_seg(instance_id)}/resurrection"
        await self._send(
            "PUT",
            path,
            content=json.dumps({"resurrection_paused": paused}).encode(),
            headers={"Content-Type": "application/json"},
            idempotent=True,
        )

    async def change_job_state(
        self,
        deployment: str,
        group: str,
        instance_id: str,
        state: JobStateRequest,
        *,
        context_id: str,
        skip_drain: bool = False,
    ) -> int:
        path = f"/deployments/{_seg(deployment)}/jobs/{_seg(group)}/{_seg(instance_id)}"
        params = {"state": state, **({"skip_drain": "true"} if skip_drain else {})}
        # An empty manifest body: the Director reuses the deployed manifest.
        response = await self._send(
            "PUT",
            path,
            params=params,
            content=b"",
            headers={"Content-Type": "text/yaml", **self._context_headers(context_id)},
            idempotent=False,
        )
        return self._task_id(response, "PUT", path)


def _seg(value: str) -> str:
    return quote(value, safe="")


def _task_from_json(raw: Mapping[str, Any]) -> Task:
    return Task(
        id=int(raw["id"]),
        state=str(raw.get("state") or ""),
        description=str(raw.get("description") or ""),
        result=raw.get("result"),
        deployment=raw.get("deployment") or None,
        context_id=raw.get("context_id") or None,
        started_at=raw.get("started_at"),
        timestamp=raw.get("timestamp"),
    )


def parse_events(chunk: bytes) -> list[TaskEvent]:
    """Event output lines (JSON each) as TaskEvents; lines that are not JSON objects are skipped."""
    events: list[TaskEvent] = []
    for line in chunk.decode("utf-8", errors="replace").splitlines():
        try:
            raw = json.loads(line)
        except ValueError:
            continue
        if not isinstance(raw, dict):
            continue
        event_time = int(raw.get("time") or 0)
        if isinstance(raw.get("error"), dict):  # task-level error
            err = raw["error"]
            code = f" (code {err['code']})" if err.get("code") is not None else ""
            events.append(TaskEvent(time=event_time, state="failed", error=f"{err.get('message', '')}{code}"))
            continue
        if raw.get("type") in ("warning", "deprecation"):
            stage = "Warning" if raw["type"] == "warning" else "Deprecation"
            events.append(TaskEvent(time=event_time, stage=stage, task=str(raw.get("message") or "")))
            continue
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        error = data.get("error") if data else None
        events.append(
            TaskEvent(
                time=event_time,
                stage=str(raw.get("stage") or ""),
                task=str(raw.get("task") or ""),
                state=str(raw.get("state") or ""),
                index=int(raw.get("index") or 0),
                total=int(raw.get("total") or 0),
                progress=int(raw.get("progress") or 0),
                tags=tuple(str(t) for t in raw.get("tags") or ()),
                error=str(error) if error else None,
            )
        )
    return events


def parse_instances(result: bytes) -> list[Instance]:
    """The result output of `instances?format=full`: one JSON object per line."""
    instances = []
    for line in result.decode("utf-8", errors="replace").splitlines():
        if line.strip():
            instances.append(Instance.from_json(json.loads(line)))
    return instances


if TYPE_CHECKING:

    def _implements_director(client: DirectorClient) -> Director:
        return client  # mypy checks that the client satisfies the operator's Protocol
