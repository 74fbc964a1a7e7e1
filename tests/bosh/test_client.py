"""DirectorClient against the Director's real shapes, served by an httpx.MockTransport.

Fixture shapes cite their sources in tests/bosh/fake_director.py and next to each one here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from controller.bosh.client import (
    AuthenticationFailed,
    BoshError,
    DirectorClient,
    DirectorError,
    DirectorUnavailable,
    TaskFailed,
    parse_events,
)
from controller.bosh.config import BoshConfig, DirectorTimeouts, RetryPolicy, Secret
from controller.bosh.types import TaskEvent

from .fake_director import (
    CLIENT_ID,
    CLIENT_SECRET,
    DIRECTOR_URL,
    UAA_URL,
    FakeDirector,
    error_body,
    json_lines,
    task_body,
    task_redirect,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Records backoff waits instead of waiting; advances the fake clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.now += seconds


def no_jitter() -> float:
    return 0.0


def config(**changes: Any) -> BoshConfig:
    base = BoshConfig(director_url=DIRECTOR_URL, client_id=CLIENT_ID, client_secret=Secret(CLIENT_SECRET))
    return base.with_changes(**changes) if changes else base


@pytest.fixture
def fake() -> FakeDirector:
    return FakeDirector()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sleeps(clock: Clock) -> Sleeps:
    return Sleeps(clock)


@pytest.fixture
async def client(fake: FakeDirector, clock: Clock, sleeps: Sleeps) -> AsyncIterator[DirectorClient]:
    async with DirectorClient(
        config(), transport=fake.transport(), sleep=sleeps, clock=clock, draw=no_jitter
    ) as c:
        yield c


def failing(*statuses_then: httpx.Response | type[Exception]) -> Callable[[httpx.Request], httpx.Response]:
    """A handler answering (or raising) each item in turn, repeating the last one."""
    seq = list(statuses_then)

    def handler(request: httpx.Request) -> httpx.Response:
        item = seq.pop(0) if len(seq) > 1 else seq[0]
        if isinstance(item, type):
            raise item("simulated", request=request)  # type: ignore[call-arg]
        return item

    return handler


# ---- authentication ----------------------------------------------------------------------


async def test_uaa_client_credentials_token_is_fetched_once_and_sent_as_bearer(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.route("GET", "/deployments", [])
    for _ in range(3):
        await client.deployments()
    token_requests = fake.to("POST", "/oauth/token")
    assert len(token_requests) == 1
    req = token_requests[0]
    # cloudfoundry/bosh-cli uaa/uaa.go ClientCredentialsGrant: form grant_type=client_credentials,
    # client id and secret as HTTP Basic (uaa/client_request.go), JSON answer.
    assert str(req.url) == f"{UAA_URL}/oauth/token"
    assert parse_qs(req.content.decode()) == {"grant_type": ["client_credentials"]}
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert req.headers["accept"] == "application/json"
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert req.headers["authorization"] == f"Basic {basic}"
    assert CLIENT_SECRET not in str(req.url) and CLIENT_SECRET not in req.content.decode()
    for r in fake.to("GET", "/deployments"):
        assert r.headers["authorization"] == f"bearer {fake.tokens[0]}"
    # /info needs no auth and is asked once.
    infos = fake.to("GET", "/info")
    assert len(infos) == 1 and "authorization" not in infos[0].headers


async def test_token_is_refreshed_before_it_expires(fake: FakeDirector, clock: Clock, sleeps: Sleeps) -> None:
    fake.expires_in = 300
    fake.route("GET", "/deployments", [])
    async with DirectorClient(
        config(token_refresh_margin=60), transport=fake.transport(), sleep=sleeps, clock=clock
    ) as client:
        await client.deployments()
        clock.now += 239  # 61 s left: still good
        await client.deployments()
        assert len(fake.tokens) == 1
        clock.now += 2  # 59 s left: inside the margin, refresh before the Director would refuse it
        await client.deployments()
        assert len(fake.tokens) == 2
        last = fake.to("GET", "/deployments")[-1]
        assert last.headers["authorization"] == f"bearer {fake.tokens[1]}"
    # No call needed a retry: the refresh came before the Director could refuse the old token.
    assert len(fake.to("GET", "/deployments")) == 3


async def test_a_401_gets_one_fresh_token_and_one_retry(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route("GET", "/deployments", [{"name": "pgbosh-default-demo"}])
    await client.deployments()
    fake.revoked.add(fake.tokens[0])  # e.g. UAA restarted with a new signing key
    assert await client.deployments() == ["pgbosh-default-demo"]
    assert len(fake.tokens) == 2
    statuses = [r.headers["authorization"] for r in fake.to("GET", "/deployments")]
    assert statuses == [f"bearer {fake.tokens[0]}", f"bearer {fake.tokens[0]}", f"bearer {fake.tokens[1]}"]


async def test_calls_refused_together_share_one_fresh_token(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.route("GET", "/deployments", [])
    await client.deployments()
    fake.revoked.add(fake.tokens[0])
    await asyncio.gather(*(client.deployments() for _ in range(5)))
    assert len(fake.tokens) == 2


async def test_a_second_401_is_an_error_not_a_loop(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route("GET", "/deployments", httpx.Response(401, text="Not authorized: '/deployments'\n"))
    with pytest.raises(DirectorError) as caught:
        await client.deployments()
    assert caught.value.status == 401
    assert len(fake.to("GET", "/deployments")) == 2
    assert len(fake.tokens) == 2
    assert "GET /deployments" in str(caught.value) and DIRECTOR_URL in str(caught.value)


async def test_uaa_refusing_the_credentials_is_authentication_failed(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.uaa_answer = lambda _r: httpx.Response(
        401, json={"error": "unauthorized", "error_description": f"Bad credentials {CLIENT_SECRET}"}
    )
    with pytest.raises(AuthenticationFailed) as caught:
        await client.deployments()
    text = str(caught.value)
    assert UAA_URL in text and CLIENT_ID in text and "401" in text
    assert CLIENT_SECRET not in text
    assert fake.to("GET", "/deployments") == []


async def test_uaa_unreachable_is_retried_then_unavailable(
    client: DirectorClient, fake: FakeDirector
) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    fake.uaa_answer = down
    with pytest.raises(DirectorUnavailable) as caught:
        await client.deployments()
    assert len(fake.to("POST", "/oauth/token")) == 4
    assert str(caught.value).startswith(f"POST /oauth/token at {UAA_URL} got no answer after 4 attempts")


async def test_uaa_5xx_is_retried_and_then_a_server_side_error(
    client: DirectorClient, fake: FakeDirector, sleeps: Sleeps
) -> None:
    fake.uaa_answer = lambda _r: httpx.Response(503, text="UAA is starting")
    with pytest.raises(DirectorError) as caught:
        await client.deployments()
    assert caught.value.server_side and caught.value.path == "/oauth/token"
    assert len(fake.to("POST", "/oauth/token")) == 4 and sleeps.waits == [0.5, 1.0, 2.0]


async def test_a_transient_uaa_failure_recovers(client: DirectorClient, fake: FakeDirector) -> None:
    def once_502(request: httpx.Request) -> httpx.Response:
        fake.uaa_answer = None  # the next token request gets the real answer
        return httpx.Response(502)

    fake.uaa_answer = once_502
    fake.route("GET", "/deployments", [])
    assert await client.deployments() == []
    assert len(fake.to("POST", "/oauth/token")) == 2 and len(fake.tokens) == 1


async def test_short_lived_tokens_are_renewed_at_half_life_not_on_every_call(
    fake: FakeDirector, clock: Clock, sleeps: Sleeps
) -> None:
    fake.expires_in = 40  # shorter than the 60 s margin
    fake.route("GET", "/deployments", [])
    async with DirectorClient(config(), transport=fake.transport(), sleep=sleeps, clock=clock) as client:
        for _ in range(3):
            await client.deployments()
        assert len(fake.tokens) == 1
        clock.now += 20
        await client.deployments()
        assert len(fake.tokens) == 2


async def test_a_token_without_expires_in_is_assumed_to_last_five_minutes(
    client: DirectorClient, fake: FakeDirector, clock: Clock
) -> None:
    def no_expiry(request: httpx.Request) -> httpx.Response:
        fake.tokens.append(f"t{len(fake.tokens)}")
        return httpx.Response(200, json={"token_type": "bearer", "access_token": fake.tokens[-1]})

    fake.uaa_answer = no_expiry
    fake.route("GET", "/deployments", [])
    await client.deployments()
    clock.now += 200
    await client.deployments()
    assert len(fake.tokens) == 1
    clock.now += 50  # 250 s: inside the 60 s margin of 300 s
    await client.deployments()
    assert len(fake.tokens) == 2


async def test_basic_auth_for_old_directors(clock: Clock, sleeps: Sleeps) -> None:
    fake = FakeDirector(auth="basic")
    fake.route("GET", "/deployments", [])
    async with DirectorClient(config(), transport=fake.transport(), sleep=sleeps, clock=clock) as client:
        await client.deployments()
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert fake.to("GET", "/deployments")[0].headers["authorization"] == f"Basic {basic}"
    assert fake.to("POST", "/oauth/token") == []


async def test_no_credentials_sends_no_authorization(
    fake: FakeDirector, clock: Clock, sleeps: Sleeps
) -> None:
    captured: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        captured.append(request)
        if request.url.path == "/info":
            return httpx.Response(200, json={"user_authentication": {"type": "basic", "options": {}}})
        return httpx.Response(200, json=[])

    async with DirectorClient(
        BoshConfig(director_url=DIRECTOR_URL),
        transport=httpx.MockTransport(handle),
        sleep=sleeps,
        clock=clock,
    ) as client:
        await client.deployments()
    assert all("authorization" not in r.headers for r in captured)


def test_tls_verification_is_on_by_default_and_takes_a_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = DirectorClient(config())._ssl_context()
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    seen: list[str | None] = []
    real = ssl.create_default_context

    def recording(*args: Any, cafile: str | None = None, **kwargs: Any) -> ssl.SSLContext:
        seen.append(cafile)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", recording)
    bundle = tmp_path / "director-ca.pem"
    context = DirectorClient(config(ca_cert=bundle))._ssl_context()
    assert seen[-1] == str(bundle)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_an_unusable_ca_bundle_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(
        BoshError, match=re.escape(f"the CA bundle {missing} for the Director ") + ".* cannot be used"
    ):
        DirectorClient(config(ca_cert=missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(BoshError, match=re.escape(str(garbage))):
        DirectorClient(config(ca_cert=garbage))


# ---- deployments ---------------------------------------------------------------------------


async def test_deploy_posts_yaml_with_context_id_and_returns_the_task_id(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.route("POST", "/deployments", task_redirect(42))
    manifest = "name: pgbosh-default-demo\n"
    assert await client.deploy(manifest, context_id="pgbosh/default/demo/7") == 42
    (req,) = fake.to("POST", "/deployments")
    assert req.headers["content-type"] == "text/yaml"
    assert req.headers["x-bosh-context-id"] == "pgbosh/default/demo/7"
    assert req.content == manifest.encode()
    # The redirect is not followed: no GET /tasks/42 happened.
    assert fake.to("GET", "/tasks/42") == []


async def test_deploy_accepts_303_and_passes_flags(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route("POST", "/deployments", task_redirect(43, status=303))
    assert await client.deploy("name: x\n", context_id="c", recreate=True, fix=True) == 43
    (req,) = fake.to("POST", "/deployments")
    assert dict(req.url.params) == {"recreate": "true", "fix": "true"}


async def test_deploy_is_never_retried(client: DirectorClient, fake: FakeDirector, sleeps: Sleeps) -> None:
    fake.route("POST", "/deployments", httpx.Response(500, json=error_body(100, "internal")))
    with pytest.raises(DirectorError) as caught:
        await client.deploy("name: x\n", context_id="c")
    assert caught.value.status == 500 and caught.value.server_side
    assert len(fake.to("POST", "/deployments")) == 1
    assert sleeps.waits == []


async def test_deploy_connection_lost_is_not_retried_and_says_how_to_recover(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.route("POST", "/deployments", failing(httpx.ReadTimeout))
    with pytest.raises(DirectorUnavailable) as caught:
        await client.deploy("name: x\n", context_id="c")
    assert len(fake.to("POST", "/deployments")) == 1
    assert caught.value.attempts == 1
    assert "POST /deployments" in str(caught.value) and "context id" in str(caught.value)
    assert "ReadTimeout" in str(caught.value)


async def test_a_rejected_manifest_raises_with_the_directors_code(
    client: DirectorClient, fake: FakeDirector
) -> None:
    # cloudfoundry/bosh src/bosh-director/lib/bosh/director/errors.rb: DeploymentUnknownTemplate
    # (an unknown job) is err(190011), 400.
    fake.route(
        "POST",
        "/deployments",
        httpx.Response(400, json=error_body(190011, "Can't find job 'nope' in release 'pgbosh'")),
    )
    with pytest.raises(DirectorError) as caught:
        await client.deploy("name: x\n", context_id="c")
    err = caught.value
    assert (err.status, err.code, err.method, err.path) == (400, 190011, "POST", "/deployments")
    assert "Can't find job 'nope'" in str(err) and "190011" in str(err)


async def test_deployed_manifest(client: DirectorClient, fake: FakeDirector) -> None:
    # deployments_controller.rb: get '/:deployment' -> JSON.generate('manifest' => deployment.manifest_text)
    fake.route("GET", "/deployments/pgbosh-default-demo", {"manifest": "name: pgbosh-default-demo\n"})
    assert await client.deployed_manifest("pgbosh-default-demo") == "name: pgbosh-default-demo\n"


async def test_unknown_deployment_manifest_is_none(client: DirectorClient, fake: FakeDirector) -> None:
    # errors.rb: DeploymentNotFound = err(70000, NOT_FOUND)
    fake.route(
        "GET",
        "/deployments/gone",
        httpx.Response(404, json=error_body(70000, "Deployment 'gone' doesn't exist")),
    )
    assert await client.deployed_manifest("gone") is None
    assert len(fake.to("GET", "/deployments/gone")) == 1


async def test_delete_deployment(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route("DELETE", "/deployments/pgbosh-default-demo", task_redirect(50))
    assert await client.delete_deployment("pgbosh-default-demo", context_id="ctx") == 50
    (req,) = fake.to("DELETE", "/deployments/pgbosh-default-demo")
    assert req.url.params["force"] == "true"
    assert req.headers["x-bosh-context-id"] == "ctx"


async def test_deleting_a_deployment_that_is_gone_is_none(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route(
        "DELETE",
        "/deployments/gone",
        httpx.Response(404, json=error_body(70000, "Deployment 'gone' doesn't exist")),
    )
    assert await client.delete_deployment("gone", context_id="ctx") is None


async def test_deployment_names_are_path_escaped(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route("GET", "/deployments/a/b", {"manifest": "x: 1\n"})  # the fake routes on the decoded path
    assert await client.deployed_manifest("a/b") == "x: 1\n"
    assert fake.requests[-1].url.raw_path == b"/deployments/a%2Fb"


async def test_cloud_config(client: DirectorClient, fake: FakeDirector) -> None:
    # configs_controller.rb `sql_to_hash`: {content, id (string in newer directors), type, name}.
    content = """
azs: [{name: z1}, {name: z2}, {name: z3}]
vm_types: [{name: small, cloud_properties: {}}, {name: large}]
disk_types: [{name: 10GB, disk_size: 10240}]
networks: [{name: default, type: manual, subnets: [{range: 10.0.0.0/24, gateway: 10.0.0.1, azs: [z1]}]}]
compilation: {workers: 2, network: default, az: z1, vm_type: small}
"""
    fake.route("GET", "/configs", [{"content": content, "id": "7", "type": "cloud", "name": "default"}])
    cloud = await client.cloud_config()
    assert cloud.azs == ("z1", "z2", "z3")
    assert cloud.vm_types == ("small", "large")
    assert cloud.disk_types == {"10GB": 10240}
    assert cloud.networks == ("default",)
    assert dict(fake.to("GET", "/configs")[0].url.params) == {"type": "cloud", "latest": "true"}


async def test_no_cloud_config_is_empty(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route("GET", "/configs", [])
    cloud = await client.cloud_config()
    assert (cloud.azs, cloud.vm_types, cloud.disk_types) == ((), (), {})


# ---- tasks -------------------------------------------------------------------------------


async def test_task(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route("GET", "/tasks/165", task_body(165, "processing", context_id="ctx-1"))
    task = await client.task(165)
    assert (task.id, task.state, task.deployment, task.context_id) == (
        165,
        "processing",
        "pgbosh-default-demo",
        "ctx-1",
    )
    assert not task.finished and task.started_at == 1440318199


async def test_unknown_task_is_a_404_error(client: DirectorClient, fake: FakeDirector) -> None:
    # errors.rb: TaskNotFound = err(10000, NOT_FOUND)
    fake.route("GET", "/tasks/9", httpx.Response(404, json=error_body(10000, "Task 9 not found")))
    with pytest.raises(DirectorError) as caught:
        await client.task(9)
    assert caught.value.not_found and caught.value.code == 10000
    assert len(fake.to("GET", "/tasks/9")) == 1  # a 4xx is not retried


async def test_tasks_filters(client: DirectorClient, fake: FakeDirector) -> None:
    # tasks_controller.rb get '/': state (comma list), verbose, context_id, limit, deployment; newest first.
    fake.route("GET", "/tasks", [task_body(12, "processing", context_id="ctx"), task_body(11, "done")])
    tasks = await client.tasks(
        deployment="pgbosh-default-demo", context_id="ctx", states=("queued", "processing"), limit=5
    )
    assert [t.id for t in tasks] == [12, 11]
    params = dict(fake.to("GET", "/tasks")[0].url.params)
    assert params == {
        "verbose": "2",
        "deployment": "pgbosh-default-demo",
        "context_id": "ctx",
        "state": "queued,processing",
        "limit": "5",
    }


# The event log of a deploy, in cloudfoundry/bosh src/bosh-director/lib/bosh/director/event_log.rb's
# shape (Stage#log_entry: time, stage, tags, total; Task#log_entry: task, index, state, progress, data).
EVENTS = json_lines(
    {
        "time": 1700000000,
        "stage": "Preparing deployment",
        "tags": [],
        "total": 1,
        "task": "Preparing deployment",
        "index": 1,
        "state": "started",
        "progress": 0,
    },
    {
        "time": 1700000001,
        "stage": "Preparing deployment",
        "tags": [],
        "total": 1,
        "task": "Preparing deployment",
        "index": 1,
        "state": "finished",
        "progress": 100,
    },
    {"time": 1700000002, "type": "warning", "message": "Deprecated: property 'x'"},
    {
        "time": 1700000003,
        "stage": "Updating instance",
        "tags": ["postgres"],
        "total": 3,
        "task": "postgres/0 (canary)",
        "index": 1,
        "state": "failed",
        "progress": 100,
        "data": {"error": "'postgres/0' is not running after update"},
    },
    # EventLog::Log#log_error: {time, error: {code, message}}
    {"time": 1700000004, "error": {"code": 400007, "message": "'postgres/0' is not running after update"}},
)


def test_event_lines_become_task_events() -> None:
    events = parse_events(EVENTS + b"not json\n")
    assert events[0] == TaskEvent(
        time=1700000000,
        stage="Preparing deployment",
        task="Preparing deployment",
        state="started",
        index=1,
        total=1,
        progress=0,
    )
    assert events[1].state == "finished" and events[1].progress == 100
    assert (events[2].stage, events[2].task) == ("Warning", "Deprecated: property 'x'")
    assert events[3].tags == ("postgres",) and events[3].error == "'postgres/0' is not running after update"
    assert events[3].summary == (
        "Updating instance: postgres/0 (canary) (1/3) failed: 'postgres/0' is not running after update"
    )
    assert events[4].error == "'postgres/0' is not running after update (code 400007)"
    assert len(events) == 5


def test_events_with_null_total_parse() -> None:
    # event_log.rb: begin_stage(stage_name, total = nil) logs "total": null.
    (event,) = parse_events(
        json_lines(
            {
                "time": 1,
                "stage": "s",
                "tags": [],
                "total": None,
                "task": "t",
                "index": 1,
                "state": "started",
                "progress": 0,
            }
        )
    )
    assert event.total == 0


class EventOutput:
    """GET /tasks/:id/output?type=event as tasks_controller.rb serves it from the database:
    no Range -> 200 whole; a satisfiable Range -> 206 with Content-Range; beyond the end -> 416
    (Content-Range bytes */size); no output yet -> 204."""

    def __init__(self) -> None:
        self.data = b""
        self.ranges: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.params["type"] == "event"
        header = request.headers.get("range")
        self.ranges.append(header)
        if not self.data:
            return httpx.Response(204)
        if header is None:
            return httpx.Response(200, content=self.data)
        start = int(header.removeprefix("bytes=").removesuffix("-"))
        if start >= len(self.data):
            return httpx.Response(
                416, text="Byte range unsatisfiable", headers={"Content-Range": f"bytes */{len(self.data)}"}
            )
        end = len(self.data) - 1
        return httpx.Response(
            206, content=self.data[start:], headers={"Content-Range": f"bytes {start}-{end}/{len(self.data)}"}
        )


async def test_events_are_tailed_with_range(client: DirectorClient, fake: FakeDirector) -> None:
    output = EventOutput()
    fake.route("GET", "/tasks/42/output", output)
    lines = EVENTS.splitlines(keepends=True)

    assert await client.task_events(42) == ([], 0)  # 204: nothing yet

    output.data = lines[0] + lines[1][:20]  # the second line is still being written
    events, offset = await client.task_events(42, 0)
    assert [e.state for e in events] == ["started"] and offset == len(lines[0])

    output.data = b"".join(lines[:3])
    events, offset = await client.task_events(42, offset)
    assert [e.state for e in events] == ["finished", ""] and offset == len(output.data)

    events, same = await client.task_events(42, offset)  # 416: nothing new
    assert events == [] and same == offset

    output.data = EVENTS
    events, offset = await client.task_events(42, offset)
    assert [e.error for e in events] == [
        "'postgres/0' is not running after update",
        "'postgres/0' is not running after update (code 400007)",
    ]
    assert offset == len(EVENTS)
    assert output.ranges == [
        "bytes=0-",
        "bytes=0-",
        f"bytes={len(lines[0])}-",
        f"bytes={len(b''.join(lines[:3]))}-",
        f"bytes={len(b''.join(lines[:3]))}-",
    ]


async def test_a_server_ignoring_range_still_gives_only_new_events(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.route("GET", "/tasks/42/output", httpx.Response(200, content=EVENTS))
    first = EVENTS.index(b"\n") + 1
    events, offset = await client.task_events(42, first)
    assert len(events) == 4 and offset == len(EVENTS)


# cloudfoundry/bosh-cli director/vms.go `VMInfo`: one JSON object per line of the result output.
INSTANCE_LINES = json_lines(
    {
        "agent_id": "a1",
        "job_name": "postgres",
        "id": "8d3c-0",
        "index": 0,
        "job_state": "running",
        "bootstrap": True,
        "ips": ["127.1.0.10"],
        "dns": [],
        "az": "z1",
        "state": "started",
        "vm_cid": "vm-1",
        "vm_type": "small",
        "disk_cid": "disk-1",
        "disk_cids": ["disk-1"],
        "ignore": False,
        "vm_created_at": "2026-11-25T22:00:00Z",
        "resurrection_paused": False,
        "processes": [
            {
                "name": "postgres",
                "state": "running",
                "uptime": {"secs": 40},
                "mem": {"kb": 1, "percent": 0.1},
                "cpu": {"total": 0.5},
            },
            {"name": "repmgrd", "state": "running"},
        ],
        "vitals": {
            "cpu": {"sys": "1", "user": "2", "wait": "0"},
            "mem": {"kb": "1", "percent": "1"},
            "swap": {"kb": "0", "percent": "0"},
            "load": ["0.1", "0.1", "0.1"],
            "uptime": {"secs": 50},
            "disk": {"system": {"percent": "10"}, "persistent": {"percent": "1"}},
        },
    },
    {
        "agent_id": "a2",
        "job_name": "postgres",
        "id": "8d3c-1",
        "index": 1,
        "job_state": "failing",
        "bootstrap": False,
        "ips": ["127.1.0.11"],
        "az": "z2",
        "state": "started",
        "vm_cid": "vm-2",
        "disk_cid": "disk-2",
        "resurrection_paused": True,
        "processes": [{"name": "postgres", "state": "running"}, {"name": "repmgrd", "state": "failing"}],
    },
    {
        "agent_id": None,
        "job_name": "postgres",
        "id": "8d3c-2",
        "index": 2,
        "job_state": "unresponsive agent",
        "ips": [],
        "az": "z3",
        "state": "started",
        "vm_cid": None,
        "disk_cid": "disk-3",
        "processes": [],
    },
)


async def test_instances_follow_the_task_to_its_result(
    client: DirectorClient, fake: FakeDirector, sleeps: Sleeps
) -> None:
    # deployments_controller.rb: get '/:deployment/instances' with format=full -> redirect "/tasks/:id";
    # bosh-cli director/task_client_request.go then polls /tasks/:id and reads output?type=result.
    fake.route("GET", "/deployments/pgbosh-default-demo/instances", task_redirect(7))
    states = iter(["queued", "processing", "done"])
    fake.route("GET", "/tasks/7", lambda _r: httpx.Response(200, json=task_body(7, next(states))))

    def output(request: httpx.Request) -> httpx.Response:
        if request.url.params["type"] == "result":
            return httpx.Response(200, content=INSTANCE_LINES)
        return httpx.Response(204)

    fake.route("GET", "/tasks/7/output", output)
    instances = await client.instances("pgbosh-default-demo")
    assert dict(fake.to("GET", "/deployments/pgbosh-default-demo/instances")[0].url.params) == {
        "format": "full"
    }
    assert [(i.name, i.index, i.az, i.ips) for i in instances] == [
        ("postgres/8d3c-0", 0, "z1", ("127.1.0.10",)),
        ("postgres/8d3c-1", 1, "z2", ("127.1.0.11",)),
        ("postgres/8d3c-2", 2, "z3", ()),
    ]
    assert [i.running for i in instances] == [True, False, False]
    assert [i.resurrection_paused for i in instances] == [False, True, False]
    assert instances[0].bootstrap and instances[0].vm_cid == "vm-1" and instances[0].disk_cid == "disk-1"
    assert len(fake.to("GET", "/tasks/7")) == 3
    assert sleeps.waits == [1.0, 1.0]


async def test_instances_task_error_raises_with_the_task_error(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.route("GET", "/deployments/d/instances", task_redirect(8))
    fake.route("GET", "/tasks/8", task_body(8, "error", result="boom"))
    error_line = json_lines({"time": 1, "error": {"code": 100, "message": "Agent timed out"}})
    fake.route("GET", "/tasks/8/output", httpx.Response(200, content=error_line))
    with pytest.raises(TaskFailed) as caught:
        await client.instances("d")
    assert caught.value.task_id == 8 and caught.value.state == "error"
    assert "task 8" in str(caught.value) and "Agent timed out" in str(caught.value)


async def test_instances_task_that_never_ends_gives_up(
    fake: FakeDirector, clock: Clock, sleeps: Sleeps
) -> None:
    fake.route("GET", "/deployments/d/instances", task_redirect(9))
    fake.route("GET", "/tasks/9", task_body(9, "processing"))
    fake.route("GET", "/tasks/9/output", httpx.Response(204))
    timeouts = DirectorTimeouts(instances_task=10, task_poll_interval=2)
    async with DirectorClient(
        config(timeouts=timeouts), transport=fake.transport(), sleep=sleeps, clock=clock
    ) as client:
        with pytest.raises(TaskFailed) as caught:
            await client.instances("d")
    assert str(caught.value) == "gave up waiting for BOSH task 9: still 'processing' after 10s"
    assert len(fake.to("GET", "/tasks/9")) == 6  # at 0, 2, 4, 6, 8, 10 s


async def test_wait_for_task_reports_events_as_they_come(client: DirectorClient, fake: FakeDirector) -> None:
    output = EventOutput()
    lines = EVENTS.splitlines(keepends=True)
    states = iter(["processing", "processing", "done"])

    def task(_request: httpx.Request) -> httpx.Response:
        state = next(states)
        output.data = b"".join(lines[: {"processing": 1 + len(output.ranges), "done": 3}[state]])
        return httpx.Response(200, json=task_body(42, state))

    fake.route("GET", "/tasks/42", task)
    fake.route("GET", "/tasks/42/output", output)
    seen: list[list[str]] = []

    async def on_events(events: list[TaskEvent]) -> None:
        seen.append([e.state for e in events])

    task_done = await client.wait_for_task(42, on_events=on_events)
    assert task_done.succeeded
    assert seen == [["started"], ["finished"], [""]]


async def test_set_resurrection(client: DirectorClient, fake: FakeDirector) -> None:
    # bosh-cli director/deployment.go (Client.EnableResurrection): PUT .../jobs/:job/:id/resurrection,
    # JSON {"resurrection_paused": !enabled}, Content-Type application/json.
    path = "/deployments/pgbosh-default-demo/jobs/postgres/8d3c-0/resurrection"
    fake.route("PUT", path, httpx.Response(200))
    await client.set_resurrection("pgbosh-default-demo", "postgres", "8d3c-0", paused=True)
    (req,) = fake.to("PUT", path)
    assert json.loads(req.content) == {"resurrection_paused": True}
    assert req.headers["content-type"] == "application/json"


async def test_change_job_state(client: DirectorClient, fake: FakeDirector, sleeps: Sleeps) -> None:
    # bosh-cli director/deployment.go (Client.ChangeJobState): PUT /deployments/:d/jobs/:job/:id?state=...
    # with a text/yaml body, answered by a task redirect.
    path = "/deployments/pgbosh-default-demo/jobs/postgres/8d3c-1"
    fake.route("PUT", path, task_redirect(61))
    task_id = await client.change_job_state(
        "pgbosh-default-demo", "postgres", "8d3c-1", "stopped", context_id="c"
    )
    assert task_id == 61
    (req,) = fake.to("PUT", path)
    assert req.url.params["state"] == "stopped"
    assert req.headers["x-bosh-context-id"] == "c" and req.headers["content-type"] == "text/yaml"


async def test_change_job_state_is_not_retried(client: DirectorClient, fake: FakeDirector) -> None:
    path = "/deployments/d/jobs/postgres/0"
    fake.route("PUT", path, httpx.Response(502))
    with pytest.raises(DirectorError):
        await client.change_job_state("d", "postgres", "0", "restart", context_id="c")
    assert len(fake.to("PUT", path)) == 1


# ---- retries and failures -----------------------------------------------------------------


async def test_5xx_on_a_get_is_retried_with_capped_backoff_then_raised(
    client: DirectorClient, fake: FakeDirector, sleeps: Sleeps
) -> None:
    fake.route("GET", "/deployments", httpx.Response(500, json=error_body(100, "Internal server error")))
    with pytest.raises(DirectorError) as caught:
        await client.deployments()
    assert len(fake.to("GET", "/deployments")) == 4  # RetryPolicy.attempts
    assert sleeps.waits == [0.5, 1.0, 2.0]
    assert caught.value.status == 500 and caught.value.code == 100
    assert str(caught.value) == (
        f"GET /deployments at {DIRECTOR_URL} failed with HTTP 500 (code 100: Internal server error)"
    )


async def test_backoff_is_capped(fake: FakeDirector, clock: Clock, sleeps: Sleeps) -> None:
    fake.route("GET", "/deployments", httpx.Response(503))
    policy = RetryPolicy(attempts=7, base_delay=1.0, max_delay=4.0)
    async with DirectorClient(
        config(retry=policy), transport=fake.transport(), sleep=sleeps, clock=clock, draw=no_jitter
    ) as client:
        with pytest.raises(DirectorError):
            await client.deployments()
    assert sleeps.waits == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert len(fake.to("GET", "/deployments")) == 7


async def test_backoff_is_jittered_below_the_full_delay(
    fake: FakeDirector, clock: Clock, sleeps: Sleeps
) -> None:
    fake.route("GET", "/deployments", httpx.Response(503))
    draws = iter([0.0, 0.5, 0.999])
    policy = RetryPolicy(attempts=4, base_delay=1.0, max_delay=8.0, jitter=0.25)
    async with DirectorClient(
        config(retry=policy), transport=fake.transport(), sleep=sleeps, clock=clock, draw=lambda: next(draws)
    ) as client:
        with pytest.raises(DirectorError):
            await client.deployments()
    assert sleeps.waits == pytest.approx([1.0, 2.0 * 0.875, 4.0 * (1 - 0.25 * 0.999)])


async def test_a_transient_5xx_recovers(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route("GET", "/deployments", failing(httpx.Response(503), httpx.Response(200, json=[{"name": "a"}])))
    assert await client.deployments() == ["a"]
    assert len(fake.to("GET", "/deployments")) == 2


@pytest.mark.parametrize(
    "error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.RemoteProtocolError]
)
async def test_no_answer_is_director_unavailable_after_bounded_retries(
    client: DirectorClient, fake: FakeDirector, error: type[Exception]
) -> None:
    fake.route("GET", "/tasks/5", failing(error))
    with pytest.raises(DirectorUnavailable) as caught:
        await client.task(5)
    assert len(fake.to("GET", "/tasks/5")) == 4
    assert caught.value.attempts == 4
    assert str(caught.value).startswith(f"GET /tasks/5 at {DIRECTOR_URL} got no answer after 4 attempts: ")
    assert error.__name__ in str(caught.value)


async def test_director_down_at_info_is_unavailable(fake: FakeDirector, clock: Clock, sleeps: Sleeps) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    async with DirectorClient(
        config(), transport=httpx.MockTransport(down), sleep=sleeps, clock=clock
    ) as client:
        with pytest.raises(DirectorUnavailable) as caught:
            await client.deployed_manifest("d")
    assert "GET /info" in str(caught.value) and "Connection refused" in str(caught.value)


async def test_resurrection_put_is_idempotent_and_retried(client: DirectorClient, fake: FakeDirector) -> None:
    path = "/deployments/d/jobs/postgres/0/resurrection"
    fake.route("PUT", path, failing(httpx.Response(502), httpx.Response(200)))
    await client.set_resurrection("d", "postgres", "0", paused=False)
    assert len(fake.to("PUT", path)) == 2


async def test_real_timeouts_are_configured() -> None:
    c = DirectorClient(config(timeouts=DirectorTimeouts(connect=1.5, read=7, write=8, pool=2)))
    assert c._http.timeout == httpx.Timeout(connect=1.5, read=7, write=8, pool=2)
    assert c._http.follow_redirects is False
    await c.aclose()


# ---- secrets ------------------------------------------------------------------------------


async def test_no_secret_or_token_in_any_exception_message(
    fake: FakeDirector, clock: Clock, sleeps: Sleeps
) -> None:
    """Every failure path, with a server that echoes credentials back where it can."""
    errors: list[BaseException] = []

    async def collect(call: Callable[[DirectorClient], Any], setup: Callable[[FakeDirector], None]) -> None:
        fresh = FakeDirector()
        setup(fresh)
        async with DirectorClient(config(), transport=fresh.transport(), sleep=sleeps, clock=clock) as c:
            try:
                await call(c)
            except BoshError as exc:
                errors.append(exc)
                fake.tokens.extend(fresh.tokens)
            else:
                raise AssertionError("expected a failure")

    def echo(status: int) -> Callable[[httpx.Request], httpx.Response]:
        return lambda r: httpx.Response(
            status, json=error_body(1, f"bad header {r.headers.get('authorization')}")
        )

    def raising(r: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused {r.headers.get('authorization')}", request=r)

    def uaa_echo(fresh: FakeDirector) -> None:
        fresh.uaa_answer = lambda r: httpx.Response(
            400, text=f"bad client {CLIENT_SECRET} {r.headers['authorization']}"
        )

    await collect(lambda c: c.deployments(), lambda f: f.route("GET", "/deployments", echo(400)))
    await collect(lambda c: c.deployments(), lambda f: f.route("GET", "/deployments", echo(500)))
    await collect(lambda c: c.deployments(), lambda f: f.route("GET", "/deployments", echo(401)))
    await collect(
        lambda c: c.deploy("x: 1\n", context_id="c"), lambda f: f.route("POST", "/deployments", echo(500))
    )
    await collect(
        lambda c: c.deploy("x: 1\n", context_id="c"), lambda f: f.route("POST", "/deployments", raising)
    )
    await collect(lambda c: c.task(1), lambda f: f.route("GET", "/tasks/1", raising))
    await collect(lambda c: c.deployments(), uaa_echo)
    assert len(errors) == 7
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert fake.tokens, "tokens were issued, so the check below is not vacuous"
    for exc in errors:
        for text in (str(exc), repr(exc), repr(exc.args)):
            assert CLIENT_SECRET not in text, text
            assert basic not in text, text
            for token in fake.tokens:
                assert token not in text, text


def test_config_repr_hides_the_secret() -> None:
    c = config()
    assert CLIENT_SECRET not in repr(c) and CLIENT_SECRET not in str(c.client_secret)
    assert c.client_secret is not None and c.client_secret.reveal() == CLIENT_SECRET


# ---- answers that are not what the API promises --------------------------------------------


async def test_a_task_answer_that_is_not_json_names_the_call(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.route("GET", "/tasks/3", httpx.Response(200, text="<html>proxy error</html>"))
    with pytest.raises(DirectorError) as caught:
        await client.task(3)
    assert str(caught.value) == (
        f"GET /tasks/3 at {DIRECTOR_URL} failed with HTTP 200 (unexpected answer: the answer is not JSON)"
    )


async def test_a_task_without_an_id_is_an_unexpected_answer(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.route("GET", "/tasks/3", {"state": "done"})
    with pytest.raises(DirectorError, match="unexpected answer: not a task"):
        await client.task(3)


async def test_a_broken_instance_line_is_an_unexpected_answer(
    client: DirectorClient, fake: FakeDirector
) -> None:
    fake.route("GET", "/deployments/d/instances", task_redirect(4))
    fake.route("GET", "/tasks/4", task_body(4, "done"))

    def output(request: httpx.Request) -> httpx.Response:
        if request.url.params["type"] == "result":
            return httpx.Response(200, content=b'{"job_name": "postgres", "id": "x"}\n{"job_na')
        return httpx.Response(204)

    fake.route("GET", "/tasks/4/output", output)
    with pytest.raises(DirectorError, match=r"GET /tasks/4/output .*not instance lines"):
        await client.instances("d")


async def test_a_redirect_elsewhere_is_not_a_task(client: DirectorClient, fake: FakeDirector) -> None:
    fake.route("POST", "/deployments", httpx.Response(302, headers={"Location": "/login"}))
    with pytest.raises(DirectorError, match="expected a redirect to /tasks/<id>, got Location '/login'"):
        await client.deploy("name: x\n", context_id="c")
