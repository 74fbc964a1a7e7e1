"""The CRD is generated from the models, structural, and committed as generated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from controller.api.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "crds" / "postgresclusters.pgbosh.dev.yaml"


def test_committed_crd_is_the_generated_one() -> None:
    assert COMMITTED.read_text() == crd_yaml(), (
        "crds/ is stale: run `pgbosh crd > crds/postgresclusters.pgbosh.dev.yaml`"
    )


def test_pgbosh_crd_prints_it() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "controller", "crd"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout == COMMITTED.read_text()


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in (node.get("properties") or {}).items():
        found += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_schema_is_structural() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path} has no type"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "patternProperties", "propertyNames", "title"):
            assert forbidden not in node, f"{path} has {forbidden}"
        assert node.get("additionalProperties") is not False, path


def test_names_subresources_and_columns() -> None:
    doc = yaml.safe_load(COMMITTED.read_text())
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "postgresclusters.pgbosh.dev"
    assert spec["group"] == "pgbosh.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["pgc"] and spec["names"]["kind"] == "PostgresCluster"
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.instances"
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Instances", "Ready", "Primary", "Phase", "Age"]
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec_schema["properties"]["instances"]["minimum"] == 1
    assert spec_schema["properties"]["instances"]["maximum"] == 9
    assert spec_schema["properties"]["resurrection"]["default"] is True
    assert spec_schema["properties"]["replication"]["properties"]["mode"]["enum"] == ["async", "sync"]
    rules = [r["rule"] for r in spec_schema["x-kubernetes-validations"]]
    assert any("oldSelf.postgresVersion" in r for r in rules)
    assert any("quantity(self.storage.size)" in r for r in rules)
    assert any("self.instances >= 2" in r for r in rules)


def _version() -> dict[str, Any]:
    doc = yaml.safe_load(COMMITTED.read_text())
    version: dict[str, Any] = doc["spec"]["versions"][0]
    return version


def _status_schema() -> dict[str, Any]:
    status: dict[str, Any] = _version()["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["type"] == "object"
    return status


def _types(node: dict[str, Any]) -> dict[str, str]:
    return {name: sub["type"] for name, sub in node["properties"].items()}


def test_status_has_every_field_the_api_promises() -> None:
    status = _status_schema()
    fields = status["properties"]
    assert fields["phase"]["type"] == "string"
    assert fields["phase"]["enum"] == [
        "Pending", "Provisioning", "Ready", "Updating", "Degraded", "FailingOver", "Deleting", "Failed"
    ]
    # conditions: the Kubernetes shape (metav1.Condition), a map keyed by type.
    conditions = fields["conditions"]
    assert conditions["type"] == "array"
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    condition = conditions["items"]
    assert _types(condition) == {
        "type": "string",
        "status": "string",
        "reason": "string",
        "message": "string",
        "lastTransitionTime": "string",
        "observedGeneration": "integer",
    }
    assert condition["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert set(condition["required"]) == {"type", "status", "reason", "lastTransitionTime"}
    assert fields["observedGeneration"]["type"] == "integer"
    assert fields["deployment"]["type"] == "string"
    task = fields["boshTask"]
    assert task["type"] == "object"
    assert {"id": "integer", "state": "string", "description": "string"}.items() <= _types(task).items()
    assert set(task["required"]) >= {"id", "state"}
    instances = fields["instances"]
    assert instances["type"] == "array"
    assert {
        "name": "string",
        "az": "string",
        "address": "string",
        "role": "string",
        "state": "string",
        "lagBytes": "integer",
    }.items() <= _types(instances["items"]).items()
    assert instances["items"]["properties"]["role"]["enum"] == ["primary", "replica", "unknown"]
    assert fields["readyInstances"]["type"] == "integer"
    assert fields["currentPrimary"]["type"] == "string"
    assert _types(fields["endpoint"]) == {"host": "string", "port": "integer"}
    assert fields["endpoint"]["properties"]["port"]["default"] == 5432
    assert fields["credentialsSecret"]["type"] == "string"


def test_scale_subresource_and_printer_columns_point_at_real_fields() -> None:
    version = _version()
    scale = version["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.instances"
    assert scale["statusReplicasPath"] == ".status.instanceCount"
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["properties"]["status"]["properties"]["instanceCount"]["type"] == "integer"
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Instances": ("integer", ".spec.instances"),
        "Ready": ("integer", ".status.readyInstances"),
        "Primary": ("string", ".status.currentPrimary"),
        "Phase": ("string", ".status.phase"),
        "Age": ("date", ".metadata.creationTimestamp"),
    }
    # Each column's path names a field of the schema (or of every object's metadata).
    for _, path in columns.values():
        top, _, leaf = path.lstrip(".").partition(".")
        if top != "metadata":
            assert leaf in schema["properties"][top]["properties"], path


def test_the_three_cel_rules_are_in_the_schema() -> None:
    spec = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {r["rule"]: r["message"] for r in spec["x-kubernetes-validations"]}
    # The disk may not shrink (a transition rule on the storage size).
    shrink = [r for r in rules if "oldSelf.storage.size" in r]
    assert len(shrink) == 1 and "compareTo" in shrink[0] and "quantity(self.storage.size)" in shrink[0]
    assert "may not shrink" in rules[shrink[0]]
    # The major version may not go down.
    assert "self.postgresVersion >= oldSelf.postgresVersion" in rules
    assert "may not go down" in rules["self.postgresVersion >= oldSelf.postgresVersion"]
    # Sync replication needs at least 2 instances.
    assert "self.replication.mode != 'sync' || self.instances >= 2" in rules
    assert "at least 2 instances" in rules["self.replication.mode != 'sync' || self.instances >= 2"]
