"""The real kubectl against the local Kubernetes API: apply the examples, read the columns."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import kubectl

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


async def test_examples_apply_and_get_pgc_shows_the_printer_columns(kube_api, kube) -> None:
    _, _, kubeconfig = kube_api
    assert EXAMPLES
    for path in EXAMPLES:
        code, out, err = await kubectl(kubeconfig, "apply", "-f", str(path))
        assert code == 0, f"{path.name}: {err}"
        assert "created" in out
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in EXAMPLES]
    # Play the operator: a status as pgbosh writes it.
    await kube.merge_patch(
        f"/apis/pgbosh.dev/v1alpha1/namespaces/default/postgresclusters/{names[0]}/status",
        {"status": {"phase": "Ready", "readyInstances": 3, "currentPrimary": "postgres/abc"}},
    )
    code, out, err = await kubectl(kubeconfig, "get", "pgc")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "INSTANCES", "READY", "PRIMARY", "PHASE", "AGE"]
    first = next(r.split() for r in rows if r.split()[0] == names[0])
    assert first[1:5] == ["3", "3", "postgres/abc", "Ready"]
    # Applying the same file again changes nothing; the spec came back with defaults filled in.
    code, out, _ = await kubectl(kubeconfig, "apply", "-f", str(EXAMPLES[0]))
    assert "unchanged" in out
    code, out, _ = await kubectl(kubeconfig, "get", "pgc", names[0], "-o", "yaml")
    spec = yaml.safe_load(out)["spec"]
    assert spec["resurrection"] is True and spec["replication"]["mode"] in ("async", "sync")
    code, out, err = await kubectl(kubeconfig, "scale", "pgc", names[0], "--replicas=5")
    assert code == 0, err
    code, out, _ = await kubectl(kubeconfig, "get", "pgc", names[0], "-o", "jsonpath={.spec.instances}")
    assert out == "5"
    code, out, err = await kubectl(kubeconfig, "delete", "pgc", names[0])
    assert code == 0 and "deleted" in out, err


async def test_kubectl_get_events_with_a_field_selector(kube_api, kube) -> None:
    _, _, kubeconfig = kube_api
    for name, reason in (("demo", "Deploying"), ("other", "Deleting")):
        await kube.create(
            "/api/v1/namespaces/default/events",
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{name}.1", "namespace": "default"},
                "involvedObject": {"kind": "PostgresCluster", "name": name, "namespace": "default"},
                "reason": reason,
                "message": f"{reason} {name}",
                "type": "Normal",
            },
        )
    code, out, err = await kubectl(kubeconfig, "get", "events", "--field-selector", "involvedObject.name=demo")
    assert code == 0, err
    assert "Deploying" in out and "Deleting" not in out
