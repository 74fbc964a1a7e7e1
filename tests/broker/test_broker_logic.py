"""Pure parts of the broker: names, operation state, merge patches, SCRAM verifiers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from controller.broker import naming
from controller.broker.operations import Operation, fingerprint, observe
from controller.broker.roles import scram_verifier
from controller.broker.service import merge_diff

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
IDS = ["6c1d3f5e-7f0a-4c53-9a57-4b1f2a6a7c01", "ABC", "abc", "a" * 100, "--", "x_y", "Ünïcode id", "-" * 70]


@pytest.mark.parametrize("ident", IDS)
def test_names_are_valid_and_bounded(ident: str) -> None:
    name = naming.cluster_name(ident)
    assert DNS_LABEL.match(name) and len(name) <= 40
    secret = naming.binding_secret_name(ident)
    assert DNS_LABEL.match(secret) and len(secret) <= 63
    role = naming.binding_role_name(ident)
    assert re.match(r"^[a-z_][a-z0-9_]*$", role) and len(role) <= 63
    label = naming.label_value(ident)
    assert LABEL_VALUE.match(label) and len(label) <= 63


def test_names_are_kept_when_valid_and_distinct_when_altered() -> None:
    guid = "6c1d3f5e-7f0a-4c53-9a57-4b1f2a6a7c01"
    assert naming.cluster_name(guid) == f"pg-{guid}"
    assert naming.label_value(guid) == guid
    assert naming.cluster_name("ABC") != naming.cluster_name("abc")
    assert naming.label_value("a" * 64) != naming.label_value("a" * 65)
    names = {naming.cluster_name(i) for i in IDS}
    assert len(names) == len(IDS)


def cluster(status: dict[str, object] | None, op: Operation | None = None, **meta: object) -> dict[str, object]:
    annotations = {naming.ANNOTATION_OPERATION: op.annotation()} if op else {}
    return {"metadata": {"annotations": annotations, **meta}, "status": status or {}}


def ready(generation: int, phase: str = "Ready", message: str = "") -> dict[str, object]:
    return {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": [{"type": "Ready", "status": "True", "message": message}],
    }


def test_observe() -> None:
    op = Operation("update-1", "update", generation=2, request="x")
    assert observe(cluster(None, Operation("p", "provision", 1))).state == "in progress"
    assert observe(cluster(ready(1), op)).state == "in progress"  # operator still on generation 1
    assert observe(cluster(ready(2), op)).state == "succeeded"
    assert observe(cluster(ready(2, "Updating", "rolling"), op)).description == "Updating: rolling"
    failed = observe(cluster(ready(2, "Failed", "disk full"), op))
    assert (failed.state, failed.description) == ("failed", "disk full")
    assert observe(cluster(ready(2), op, deletionTimestamp="now")).state == "in progress"
    # An operator that records no observedGeneration: only the phase counts.
    assert observe(cluster({"phase": "Ready"}, op)).state == "succeeded"
    assert observe(cluster({"phase": "Ready"})).operation is None
    broken = {"metadata": {"annotations": {naming.ANNOTATION_OPERATION: "{not json"}}, "status": {"phase": "Ready"}}
    assert observe(broken).operation is None


def test_merge_diff() -> None:
    old = {"instances": 1, "parameters": {"a": "1", "b": "2"}, "storage": {"size": "10Gi"}, "gone": True}
    new = {"instances": 3, "parameters": {"a": "1", "c": "3"}, "storage": {"size": "10Gi"}}
    assert merge_diff(old, new) == {"instances": 3, "parameters": {"b": None, "c": "3"}, "gone": None}
    assert merge_diff(new, new) == {}


def test_scram_verifier_matches_rfc_7677_construction() -> None:
    salt = b"0123456789abcdef"
    verifier = scram_verifier("pencil", salt=salt, iterations=4096)
    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    assert method == "SCRAM-SHA-256"
    assert iterations_salt == f"4096:{base64.b64encode(salt).decode()}"
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()
    assert keys.split(":")[0] == base64.b64encode(stored).decode()
    assert "pencil" not in verifier


def test_fingerprint_is_stable() -> None:
    # Stored in pgbosh.dev/osb-provision and compared with every repeat: it may never change.
    document = {
        "service_id": "s",
        "plan_id": "p",
        "organization_guid": "o",
        "space_guid": None,
        "parameters": {"postgresVersion": 16, "parameters": {"work_mem": "é"}},
    }
    assert fingerprint(document) == "799ac6e82af8d3d2209f761e0b1d6cfe"
    assert fingerprint(dict(reversed(document.items()))) == fingerprint(document)
