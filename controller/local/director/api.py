"""The HTTP face of the local director: the Director's routes, codes and JSON.

Shapes follow cloudfoundry/bosh `api/controllers/*.rb` (info, deployments, tasks,
resurrection, configs, locks) and the UAA token endpoint bosh-cli's `uaa` package calls.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import errors
from . import manifest as mf
from .director import Engine

TOKEN_LIFETIME = 43199  # seconds, UAA's default for bosh clients
DIRECTOR_NAME = "pgbosh-local"
DIRECTOR_VERSION = "281.0.0 (pgbosh local)"
_UUID = re.compile(r"^[A-Fa-f0-9]{8}-[A-Fa-f0-9-]{27}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
USER: web.RequestKey[str] = web.RequestKey("user", str)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tokens:
    """HS256 JWTs signed with a key derived from the client secret: they survive a restart."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self._key = hashlib.sha256(b"pgbosh-director-token:" + client_secret.encode()).digest()

    def issue(self, issuer: str) -> dict[str, Any]:
        now = int(time.time())
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {"jti": secrets.token_hex(16), "sub": self.client_id, "client_id": self.client_id,
                  "cid": self.client_id, "scope": ["bosh.admin"], "grant_type": "client_credentials",
                  "iat": now, "exp": now + TOKEN_LIFETIME, "iss": f"{issuer}/oauth/token", "aud": ["bosh"]}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        sig = _b64(hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        return {"access_token": f"{header}.{payload}.{sig}", "token_type": "bearer", "expires_in": TOKEN_LIFETIME,
                "scope": "bosh.admin", "jti": claims["jti"]}

    def user(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        parts = token.strip().split(".")
        if len(parts) != 3:
            return None
        expected = _b64(hmac.new(self._key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, parts[2]):
            return None
        try:
            claims = json.loads(_unb64(parts[1]))
        except ValueError:
            return None
        if not isinstance(claims, dict) or int(claims.get("exp", 0)) < time.time():
            return None
        return str(claims.get("client_id") or self.client_id)

    def check_client(self, client_id: str, client_secret: str) -> bool:
        return hmac.compare_digest(client_id, self.client_id) and hmac.compare_digest(client_secret,
                                                                                      self.client_secret)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def _redirect(task_id: int) -> web.Response:
    return web.Response(status=302, headers={"Location": f"/tasks/{task_id}"})


def _context_id(request: web.Request) -> str:
    value = request.headers.get("X-Bosh-Context-Id", "")
    if len(value) > 64:
        raise errors.DirectorError("X-Bosh-Context-Id cannot be more than 64 characters in length")
    return value


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name) == "true"


class DirectorApi:
    def __init__(self, engine: Engine, tokens: Tokens) -> None:
        self.engine = engine
        self.tokens = tokens
        self.base_url = ""
        self.uuid = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024 * 1024)
        r = app.router
        r.add_get("/info", self.info)
        r.add_post("/oauth/token", self.token)
        r.add_get("/deployments", self.list_deployments)
        r.add_post("/deployments", self.post_deployment)
        r.add_get("/deployments/{name}", self.get_deployment)
        r.add_delete("/deployments/{name}", self.delete_deployment)
        r.add_post("/deployments/{name}/diff", self.diff)
        r.add_get("/deployments/{name}/instances", self.instances)
        r.add_get("/deployments/{name}/vms", self.vms)
        r.add_get("/deployments/{name}/variables", self.variables)
        r.add_get("/deployments/{name}/jobs/{group}/{index_or_id}", self.get_job)
        r.add_put("/deployments/{name}/jobs/{group}/{index_or_id}", self.change_job_state)
        r.add_put("/deployments/{name}/jobs/{group}/{index_or_id}/resurrection", self.instance_resurrection)
        r.add_post("/deployments/{name}/errands/{errand}/runs", self.run_errand)
        r.add_put("/resurrection", self.global_resurrection)
        r.add_get("/tasks", self.list_tasks)
        r.add_get("/tasks/{id}", self.get_task)
        r.add_get("/tasks/{id}/output", self.task_output)
        r.add_delete("/task/{id}", self.cancel_task)
        r.add_get("/locks", self.locks)
        r.add_get("/configs", self.list_configs)
        r.add_post("/configs", self.post_config)
        r.add_get("/configs/{id}", self.get_config)
        r.add_get("/cloud_configs", self.legacy_cloud_configs)
        r.add_post("/cloud_configs", self.legacy_post_cloud_config)
        return app

    # base_controller.rb: every route but /info needs a user; 401 is plain text with
    # WWW-Authenticate; a DirectorError becomes {"code","description"} with its status.
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        open_route = request.path in ("/info", "/oauth/token")
        user = self.tokens.user(request.headers.get("Authorization"))
        if user is not None:
            request[USER] = user
        if not open_route and user is None:
            return web.Response(status=401, text=f"Not authorized: '{request.path}'\n",
                                headers={"WWW-Authenticate": 'Basic realm="BOSH Director"'})
        try:
            return await handler(request)
        except errors.DirectorError as exc:
            return _json(exc.body(), exc.status)
        except web.HTTPException:
            raise

    # ---- info and UAA ----------------------------------------------------------------------
    async def info(self, request: web.Request) -> web.Response:
        """info_controller.rb"""
        return _json({
            "name": DIRECTOR_NAME, "uuid": self.uuid, "version": DIRECTOR_VERSION, "user": request.get(USER),
            "cpi": "pgbosh-local-cpi", "stemcell_os": "ubuntu-jammy", "stemcell_version": "latest",
            "user_authentication": {"type": "uaa", "options": {"url": self.base_url, "urls": [self.base_url]}},
            "features": {
                "local_dns": {"status": False, "extras": {"domain_name": "bosh"}},
                "power_dns": {"status": False, "extras": {"domain_name": "bosh"}},
                "compiled_package_cache": {"status": False, "extras": {"provider": None}},
                "snapshots": {"status": False},
                "config_server": {"status": True, "extras": {"urls": [self.base_url]}},
            },
        })

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id = str(form.get("client_id", ""))
        client_secret = str(form.get("client_secret", ""))
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(auth[6:].strip()).decode()
            except ValueError:
                decoded = ""
            client_id, _, client_secret = decoded.partition(":")
        if form.get("grant_type") != "client_credentials":
            return _json({"error": "unsupported_grant_type",
                          "error_description": "Only grant_type=client_credentials is supported"}, 400)
        if not self.tokens.check_client(client_id, client_secret):
            return _json({"error": "unauthorized", "error_description": "Bad credentials"}, 401)
        return _json(self.tokens.issue(self.base_url))

    # ---- deployments -----------------------------------------------------------------------
    async def list_deployments(self, request: web.Request) -> web.Response:
        """deployments_controller.rb `get '/'`"""
        _, cloud_id = self.engine.cloud()
        rows: list[dict[str, Any]] = []
        for name in sorted(self.engine.state.deployments):
            dep = self.engine.state.deployments[name]
            cloud = "none" if not dep.cloud_config_id else "latest" if dep.cloud_config_id == cloud_id else "outdated"
            rows.append({"name": dep.name, "releases": sorted(dep.releases, key=lambda r: (r["name"], r["version"])),
                         "stemcells": dep.stemcells, "cloud_config": cloud, "teams": []})
        return _json(rows)

    async def post_deployment(self, request: web.Request) -> web.Response:
        """deployments_controller.rb `post '/'`: YAML and name are checked before the task."""
        text = await request.text()
        doc = mf.load_yaml(text)
        name = doc.get("name")
        if not name:
            raise errors.ValidationMissingField("Deployment manifest must have a 'name' key")
        task = self.engine.start_deploy(text, str(name), _context_id(request), recreate=_flag(request, "recreate"),
                                        dry_run=_flag(request, "dry_run"))
        return _redirect(task.id)

    async def get_deployment(self, request: web.Request) -> web.Response:
        dep = self.engine.deployment(request.match_info["name"])
        return _json({"manifest": dep.manifest or None})  # null until a deploy succeeded, like the Director

    async def delete_deployment(self, request: web.Request) -> web.Response:
        task = self.engine.start_delete(request.match_info["name"], _context_id(request), force=_flag(request, "force"))
        return _redirect(task.id)

    async def diff(self, request: web.Request) -> web.Response:
        text = await request.text()
        try:
            return _json(self.engine.diff(request.match_info["name"], text))
        except errors.DirectorError as exc:
            return _json({"diff": [], "error": f"Unable to diff manifest: {exc.message}"})

    async def instances(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if request.query.get("format") == "full":
            return _redirect(self.engine.start_vm_state(name, vms_only=False, context_id=_context_id(request)).id)
        return _json(self.engine.instances_view(name, vms_only=False))

    async def vms(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if request.query.get("format") == "full":
            return _redirect(self.engine.start_vm_state(name, vms_only=True, context_id=_context_id(request)).id)
        return _json(self.engine.instances_view(name, vms_only=True))

    async def variables(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.engine.deployment(name)
        values = self.engine.variables.get(name, {})
        return _json([{"id": hashlib.sha256(f"{name}/{n}".encode()).hexdigest()[:12], "name": f"/{DIRECTOR_NAME}/"
                       f"{name}/{n}"} for n in sorted(values)])

    @staticmethod
    def _index_or_id(value: str) -> str:
        if not value.isdigit() and not _UUID.match(value):
            raise errors.InstanceInvalidIndex(f"Invalid instance index or id '{value}'")
        return value

    async def get_job(self, request: web.Request) -> web.Response:
        dep = self.engine.deployment(request.match_info["name"])
        inst = self.engine.find_instance(dep, request.match_info["group"], request.match_info["index_or_id"])
        return _json({"deployment": dep.name, "job": inst.group, "index": inst.index, "id": inst.id,
                      "state": inst.state, "disks": [inst.disk_cid]})

    async def change_job_state(self, request: web.Request) -> web.Response:
        index_or_id = self._index_or_id(request.match_info["index_or_id"])
        body = await request.text()
        state = request.query.get("state", "")
        if body.strip():
            doc = mf.load_yaml(body)
            if doc.get("name") != request.match_info["name"]:
                raise errors.ValidationInvalidValue("Manifest name does not match the deployment")
        task = self.engine.start_job_state(request.match_info["name"], request.match_info["group"], index_or_id,
                                           state, _context_id(request))
        return _redirect(task.id)

    async def instance_resurrection(self, request: web.Request) -> web.Response:
        payload = await self._json_body(request)
        self.engine.set_instance_resurrection(request.match_info["name"], request.match_info["group"],
                                              request.match_info["index_or_id"],
                                              bool(payload.get("resurrection_paused")))
        return web.Response(status=200)

    async def global_resurrection(self, request: web.Request) -> web.Response:
        payload = await self._json_body(request)
        self.engine.set_global_resurrection(bool(payload.get("resurrection_paused")))
        return web.Response(status=200)

    async def run_errand(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.engine.deployment(name)
        errand = request.match_info["errand"]

        async def fail(*_: Any) -> str:
            raise errors.DirectorError(f"Errand '{errand}' not found in deployment '{name}'")

        task = self.engine.submit("run_errand", f"run errand {errand} from deployment {name}", name,
                                  _context_id(request), fail)
        return _redirect(task.id)

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        try:
            payload = json.loads(await request.text() or "{}")
        except ValueError:
            raise errors.DirectorError("Invalid JSON request body") from None
        if not isinstance(payload, dict):
            raise errors.DirectorError("JSON object expected")
        return payload

    # ---- tasks -----------------------------------------------------------------------------
    async def list_tasks(self, request: web.Request) -> web.Response:
        """tasks_controller.rb `get '/'`: newest first, verbose=1 hides internal task types."""
        q = request.query
        limit = None
        if "limit" in q:
            try:
                limit = max(1, int(q["limit"]))
            except ValueError:
                limit = 1
        states = [s for s in q.get("state", "").split(",") if s]
        return _json(self.engine.list_tasks(deployment=q.get("deployment"), states=states,
                                            context_id=q.get("context_id"), limit=limit,
                                            verbose=q.get("verbose", "1")))

    def _task_id(self, request: web.Request) -> int:
        raw = request.match_info["id"]
        if not raw.isdigit():
            raise errors.TaskNotFound(f"Task {raw} not found")
        return int(raw)

    async def get_task(self, request: web.Request) -> web.Response:
        return _json(self.engine.task_record(self._task_id(request)).to_api())

    async def cancel_task(self, request: web.Request) -> web.Response:
        """task_controller.rb `delete '/:id'`: 204, or 400 with a text body when it cannot be cancelled."""
        task_id = self._task_id(request)
        if self.engine.cancel_task(task_id):
            return web.Response(status=204)
        state = self.engine.task_record(task_id).state
        return web.Response(status=400, text=f"Cannot cancel task {task_id}: invalid state ({state})")

    async def task_output(self, request: web.Request) -> web.Response:
        """tasks_controller.rb `get '/:id/output'`: text/plain, 204 when empty, byte ranges with 206/416."""
        task_id = self._task_id(request)
        self.engine.task_record(task_id)
        kind = request.query.get("type", "debug")
        if kind == "none":
            return web.Response(status=204)
        if kind not in ("event", "result", "debug", "cpi"):
            raise errors.UnauthorizedToAccessDeployment(f"Unknown type {kind}")
        data = self.engine.task_output(task_id).read(kind)
        if not data:
            return web.Response(status=204)
        size = len(data)
        header = request.headers.get("Range")
        if header:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                else:
                    start, end = max(0, size - int(match.group(2))), size - 1
                if start >= size or start > end:
                    return web.Response(status=416, text="Byte range unsatisfiable",
                                        headers={"Content-Range": f"bytes */{size}"})
                return web.Response(status=206, body=data[start:end + 1], content_type="text/plain",
                                    headers={"Content-Range": f"bytes {start}-{end}/{size}"})
        return web.Response(status=200, body=data, content_type="text/plain")

    async def locks(self, request: web.Request) -> web.Response:
        return _json(self.engine.locks_view())

    # ---- configs ---------------------------------------------------------------------------
    async def list_configs(self, request: web.Request) -> web.Response:
        """configs_controller.rb `get '/'`: 'latest' is required."""
        latest = request.query.get("latest")
        if not latest:
            raise errors.BadConfigRequest("'latest' is required")
        if latest not in ("true", "false"):
            raise errors.ValidationInvalidValue("'latest' must be 'true' or 'false'")
        type_, name = request.query.get("type"), request.query.get("name")
        recs = (self.engine.latest_configs(type_, name) if latest == "true" else
                self.engine.all_configs(type_, name))
        return _json([r.to_api() for r in recs])

    async def get_config(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        if not raw.isdigit():
            return web.Response(status=400)
        for rec in self.engine.state.configs:
            if rec.id == raw:
                return _json(rec.to_api())
        raise errors.ResourceNotFound(f"Config {raw} not found")

    async def post_config(self, request: web.Request) -> web.Response:
        payload = await self._json_body(request)
        for key in ("type", "name"):
            if not isinstance(payload.get(key), str) or not payload.get(key):
                raise errors.BadConfigRequest(f"'{key}' is required")
        content = payload.get("content")
        if not isinstance(content, str):
            raise errors.BadConfigRequest("'content' is required")
        rec = self.engine.post_config(payload["type"], payload["name"], content)
        return _json(rec.to_api(), 201)

    async def legacy_cloud_configs(self, request: web.Request) -> web.Response:
        """cloud_configs_controller.rb `get '/'`: `limit` is required; newest first."""
        raw = request.query.get("limit", "")
        if not raw:
            return web.Response(status=400, text="limit is required")
        try:
            limit = int(raw)
        except ValueError:
            return web.Response(status=400, text=f"limit is invalid: '{raw}' is not an integer")
        recs = self.engine.all_configs("cloud", request.query.get("name") or "default")[:limit]
        return _json([{"properties": r.content,
                       "created_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r.created_at))}
                      for r in recs])

    async def legacy_post_cloud_config(self, request: web.Request) -> web.Response:
        self.engine.post_config("cloud", request.query.get("name") or "default", await request.text())
        return web.Response(status=201)
