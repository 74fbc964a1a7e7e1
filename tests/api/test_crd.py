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
