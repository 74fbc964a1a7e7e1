"""The provision path's shortcuts give the answers the long way gives.

The broker keeps validated specs per plan and parameters, skips the JSON Schema for
an empty parameter object the schema accepts, decodes each originating identity once
and logs one line per request above debug; none of that may change an answer.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from typing import Any

import pytest

from controller.broker import cli, server
from controller.broker.config import BrokerConfig
from controller.broker.errors import BrokerError
from controller.broker.operations import Operation
from controller.broker.service import SPEC_CACHE_SIZE, Broker

from .conftest import CONFIG, PLANS, World, identity_header

ASYNC = {"accepts_incomplete": "true"}


class NoKube:
    """The spec and parameter checks never reach Kubernetes."""


def broker(config: BrokerConfig = CONFIG) -> Broker:
    return Broker(config, NoKube(), NoKube())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "op",
    [
        Operation("provision-0123456789ab", "provision", generation=1, request="f" * 32),
        Operation("update-x", "update", generation=None, request=None),
        Operation("deprovision-y", "deprovision"),
    ],
)
def test_operation_annotation_is_unchanged(op: Operation) -> None:
    # Annotations written by earlier brokers must keep comparing equal.
    assert op.annotation() == json.dumps(asdict(op), sort_keys=True, separators=(",", ":"))
    assert Operation.of({"metadata": {"annotations": {"pgbosh.dev/osb-operation": op.annotation()}}}) == op


def test_operation_ids_keep_their_form() -> None:
    ids = {broker()._operation("provision") for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"provision-[0-9a-f]{12}", i) for i in ids)


@pytest.mark.parametrize(
    "parameters",
    [
        {},
        {"postgresVersion": 17},
        {"parameters": {"work_mem": "64MB", "max_connections": "200"}},
        {"postgresVersion": 15, "parameters": {"work_mem": "8MB"}},
    ],
)
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_cached_spec_is_the_validated_spec(plan: str, parameters: dict[str, Any]) -> None:
    b = broker()
    expected = Broker._spec({}, PLANS[plan], parameters)
    first = b._new_spec(PLANS[plan], parameters)
    assert first == expected
    first["instances"] = 99  # a caller's change does not leak into the next request
    first.setdefault("parameters", {})["x"] = "y"
    assert b._new_spec(PLANS[plan], parameters) == expected


def test_spec_cache_tells_parameters_apart_and_stays_bounded() -> None:
    b = broker()
    plan = PLANS["small-single"]
    assert b._new_spec(plan, {"postgresVersion": 16})["postgresVersion"] == 16
    assert b._new_spec(plan, {"postgresVersion": 17})["postgresVersion"] == 17
    # Key order in the request does not matter; the values do.
    one = b._new_spec(plan, {"parameters": {"a.b": "1", "c": "2"}})
    two = b._new_spec(plan, {"parameters": {"c": "2", "a.b": "1"}})
    assert one == two
    for n in range(SPEC_CACHE_SIZE + 50):
        b._new_spec(plan, {"parameters": {"work_mem": f"{n}kB"}})
    assert len(b._spec_cache) == SPEC_CACHE_SIZE


def test_refused_parameters_are_not_cached() -> None:
    b = broker()
    for _ in range(2):
        with pytest.raises(BrokerError) as refused:
            b._new_spec(PLANS["small-single"], {"parameters": {"port": "5433"}})
        assert refused.value.status == 400 and "port" in refused.value.description
    assert b._spec_cache == {}


def config_requiring(name: str) -> BrokerConfig:
    raw = CONFIG.model_dump(mode="json", exclude_none=True)
    raw["catalog"]["services"][0]["parameters_schema"] = {
        "type": "object",
        "required": [name],
        "properties": {name: {"type": "integer"}},
    }
    return BrokerConfig.model_validate(raw)


def test_empty_parameters_shortcut_only_where_the_schema_accepts_them() -> None:
    plan = PLANS["small-single"]
    assert CONFIG.parameter_errors(plan, {}) == []
    assert CONFIG.parameter_errors(plan, {"instances": 5}) != []  # the shortcut is for {} only
    strict = config_requiring("postgresVersion")
    assert strict.parameter_errors(plan, {}) == ["parameters: 'postgresVersion' is a required property"]
    with pytest.raises(BrokerError) as refused:
        broker(strict)._check_parameters(plan, None)
    assert refused.value.status == 400 and refused.value.error == "InvalidParameters"


async def test_provision_logs_one_line_with_the_identity(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server._decode_identity.cache_clear()
    for instance in ("log-a", "log-b"):
        response = await world.http.put(
            f"/v2/service_instances/{instance}",
            params=ASYNC,
            json=world.provision_body(),
            headers={
                "X-Broker-API-Originating-Identity": identity_header("u-7"),
                "X-Broker-API-Request-Identity": f"req-{instance}",
            },
        )
        assert response.status_code == 202
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("controller.broker")]
    assert len(lines) == 2, lines
    assert all("identity: cloudfoundry u-7" in line for line in lines)
    assert "PUT /v2/service_instances/log-a -> 202" in lines[0] and "request: req-log-a" in lines[0]
    assert server._decode_identity.cache_info().hits >= 1  # decoded once for both requests


def test_originating_identity_decoding() -> None:
    assert server._originating_identity(None) == "-"
    assert server._originating_identity(identity_header("u-1")) == "cloudfoundry u-1"
    assert server._originating_identity("kubernetes !!!") == "kubernetes <undecodable>"
    assert server._originating_identity("cloudfoundry " + "WzFd") == "cloudfoundry"  # [1]: not an object


async def test_provision_body_not_utf8(world: World) -> None:
    response = await world.http.put(
        "/v2/service_instances/bytes",
        params=ASYNC,
        content=b'{"service_id": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json() == {"error": "BadRequest", "description": "the request body is not valid JSON"}
    assert await world.clusters() == []


def test_serve_quiets_httpx_request_lines() -> None:
    httpx_log = logging.getLogger("httpx")
    before = httpx_log.level
    try:
        cli.configure_logging("INFO")
        assert not httpx_log.isEnabledFor(logging.INFO)
        cli.configure_logging("DEBUG")
        assert httpx_log.level == logging.NOTSET  # --log-level DEBUG shows every call again
    finally:
        httpx_log.setLevel(before)
