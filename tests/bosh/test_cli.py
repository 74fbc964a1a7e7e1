"""`pgbosh manifest -f cluster.yaml`."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from controller.cli import main

CLUSTER = """\
apiVersion: pgbosh.dev/v1alpha1
kind: PostgresCluster
metadata:
  name: orders
  namespace: shop
spec:
  instances: 5
  vmType: medium
  storage: {size: 20Gi}
  replication: {mode: sync, syncStandbys: 2}
  parameters: {max_connections: "300"}
"""


@pytest.fixture(autouse=True)
def _no_operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("PGBOSH_BOSH_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return str(path)


def test_prints_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "-f", write(tmp_path, CLUSTER)]) == 0
    out = capsys.readouterr()
    doc = yaml.safe_load(out.out)
    assert out.err == ""
    assert doc["name"] == "pgbosh-shop-orders"
    group = doc["instance_groups"][0]
    assert (group["instances"], group["vm_type"], group["persistent_disk"]) == (5, "medium", 20480)
    postgres = group["jobs"][0]["properties"]["postgres"]
    assert postgres["replication"] == {"mode": "sync", "sync_standbys": 2}
    assert postgres["parameters"] == {"max_connections": "300"}
    assert group["jobs"][0]["properties"]["consul"]["service"] == "pg-shop-orders"


def test_namespace_option_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "-f", write(tmp_path, CLUSTER), "--namespace", "staging"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "pgbosh-staging-orders"


def test_namespace_defaults_to_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "-f", write(tmp_path, CLUSTER.replace("  namespace: shop\n", ""))]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "pgbosh-default-orders"


def test_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(CLUSTER))
    assert main(["manifest", "-f", "-"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "pgbosh-shop-orders"


def test_operator_configuration_applies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGBOSH_BOSH_NETWORK", "db")
    monkeypatch.setenv("PGBOSH_BOSH_RELEASE_VERSION", "2.0.0")
    assert main(["manifest", "-f", write(tmp_path, CLUSTER)]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["instance_groups"][0]["networks"] == [{"name": "db"}]
    assert doc["releases"][0]["version"] == "2.0.0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [b", "is not valid YAML"),
        ("kind: Deployment\napiVersion: apps/v1\n", "holds no PostgresCluster"),
        (CLUSTER.replace("pgbosh.dev/v1alpha1", "pgbosh.dev/v9"), "apiVersion is 'pgbosh.dev/v9'"),
        (CLUSTER.replace("  name: orders\n", ""), "metadata.name is missing"),
        (
            CLUSTER.replace("syncStandbys: 2", "syncStandbys: 5"),
            "syncStandbys must be smaller than instances",
        ),
        (CLUSTER.replace("vmType: medium", "vmType: medium\n  colour: blue"), "spec.colour: Extra inputs"),
        (CLUSTER.replace('max_connections: "300"', 'port: "6543"'), "pgbosh manages"),
        (CLUSTER + "---\n" + CLUSTER, "holds 2 PostgresCluster documents"),
    ],
)
def test_bad_input_is_a_clear_error_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    assert main(["manifest", "-f", write(tmp_path, text)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("pgbosh manifest: ")
    assert expected in out.err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "-f", str(tmp_path / "nope.yaml")]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "nope.yaml" in err
