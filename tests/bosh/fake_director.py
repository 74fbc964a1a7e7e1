"""A BOSH Director and its UAA as an ``httpx.MockTransport`` handler, for contract tests.

Every shape it serves cites the public source it was read from (repository and path).
It records every request, so tests can count them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import httpx

DIRECTOR_URL = "https://director.example:25555"
UAA_URL = "https://uaa.example:8443"
CLIENT_ID = "pgbosh-operator"
CLIENT_SECRET = "s3cr3t-Cl1ent-Value-4242"

# cloudfoundry/bosh-cli director/info.go (the comment above `type Info`): GET /info answer.
INFO_UAA: dict[str, Any] = {
    "version": "1.3167.0 (00000000)",
    "uuid": "a57b8733-163e-443a-a3d7-9ac58a886d7b",
    "name": "my-bosh",
    "cpi": "vsphere_cpi",
    "user": None,
    "features": {"snapshots": {"status": False}, "dns": {"extras": {"domain_name": "bosh"}, "status": False}},
    "user_authentication": {"options": {"url": UAA_URL}, "type": "uaa"},
}
# Old directors: cloudfoundry/bosh .../api/controllers/info_controller.rb renders
# `identity_provider.client_info`; src/bosh-director/lib/bosh/director/api/local_identity_provider.rb
# returns {'type' => 'basic', 'options' => {}} and checks Rack Basic credentials.
INFO_BASIC: dict[str, Any] = {**INFO_UAA, "user_authentication": {"type": "basic", "options": {}}}


def token_body(value: str, expires_in: int) -> dict[str, Any]:
    # cloudfoundry/bosh-cli uaa/uaa.go `TokenResp` (token_type, access_token, refresh_token;
    # "ExpiresIn ... e.g. 43199" in its comment).
    return {
        "token_type": "bearer",
        "access_token": value,
        "expires_in": expires_in,
        "scope": "bosh.admin",
        "jti": "65545f5e-5355-4e0f-bcb5-01a4b9058452",
    }


def error_body(code: int, description: str) -> dict[str, Any]:
    # cloudfoundry/bosh src/bosh-director/lib/bosh/director/api/controllers/base_controller.rb (`error do`):
    # a DirectorError renders {'code' => error_code, 'description' => message} with its response code.
    return {"code": code, "description": description}


def task_body(task_id: int, state: str, **extra: Any) -> dict[str, Any]:
    # cloudfoundry/bosh-cli director/tasks.go `TaskResp` (its comments give the example values).
    body: dict[str, Any] = {
        "id": task_id,
        "state": state,
        "description": "create deployment",
        "timestamp": 1440318199,
        "started_at": 1440318199,
        "result": None,
        "user": "pgbosh-operator",
        "deployment": "pgbosh-default-demo",
        "context_id": "",
    }
    body.update(extra)
    return body


def task_redirect(task_id: int, status: int = 302) -> httpx.Response:
    # cloudfoundry/bosh .../api/controllers/deployments_controller.rb: `redirect "/tasks/#{task.id}"`;
    # cloudfoundry/bosh-cli director/client_request.go follows only 302 (StatusFound) by GET.
    return httpx.Response(status, headers={"Location": f"{DIRECTOR_URL}/tasks/{task_id}"})


Handler = Callable[[httpx.Request], httpx.Response]


class FakeDirector:
    def __init__(self, *, auth: str = "uaa", expires_in: int = 43199) -> None:
        self.auth = auth
        self.expires_in = expires_in
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Handler] = {}
        self.tokens: list[str] = []
        self.revoked: set[str] = set()
        self.uaa_answer: Handler | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def route(
        self, method: str, path: str, handler: Handler | httpx.Response | dict[str, Any] | list[Any]
    ) -> None:
        if isinstance(handler, httpx.Response):
            response = handler
            self.routes[(method, path)] = lambda _request: response
        elif isinstance(handler, dict | list):
            body = handler
            self.routes[(method, path)] = lambda _request: httpx.Response(200, json=body)
        else:
            self.routes[(method, path)] = handler

    def to(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]

    def director_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == httpx.URL(DIRECTOR_URL).host]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == httpx.URL(UAA_URL).host:
            return self._uaa(request)
        if request.url.path == "/info":
            return httpx.Response(200, json=INFO_UAA if self.auth == "uaa" else INFO_BASIC)
        if not self._authorized(request):
            # base_controller.rb `before`: 401 with "Not authorized: '<path>'\n".
            return httpx.Response(
                401,
                text=f"Not authorized: '{request.url.path}'\n",
                headers={"WWW-Authenticate": 'Basic realm="BOSH Director"'},
            )
        handler = self.routes.get((request.method, request.url.path))
        if handler is None:
            return httpx.Response(404, json=error_body(404, f"no route {request.method} {request.url.path}"))
        return handler(request)

    def _authorized(self, request: httpx.Request) -> bool:
        header = request.headers.get("authorization", "")
        if self.auth == "uaa":
            kind, _, value = header.partition(" ")
            return kind.lower() == "bearer" and value in self.tokens and value not in self.revoked
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        return bool(header == f"Basic {expected}")

    def _uaa(self, request: httpx.Request) -> httpx.Response:
        if self.uaa_answer is not None:
            return self.uaa_answer(request)
        assert request.method == "POST" and request.url.path == "/oauth/token"
        form = parse_qs(request.content.decode())
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if form.get("grant_type") != ["client_credentials"] or request.headers.get("authorization") != (
            f"Basic {expected}"
        ):
            return httpx.Response(401, json={"error": "unauthorized", "error_description": "Bad credentials"})
        value = f"token-{len(self.tokens) + 1}-eyJhbGciOiJSUzI1NiJ9"
        self.tokens.append(value)
        return httpx.Response(200, json=token_body(value, self.expires_in))


def json_lines(*objects: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)
