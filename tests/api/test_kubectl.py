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
    # As from the API server: the name only with -o wide.
    assert out.splitlines()[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    code, out, err = await kubectl(kubeconfig, "get", "events", "-o", "wide")
    assert code == 0 and out.splitlines()[0].split()[-1] == "NAME" and "demo.1" in out, err


async def test_kubectl_get_watch_prints_a_row_per_change_with_the_printer_columns(kube_api, kube) -> None:
    """`kubectl get pgc -w`, which `pgbosh dev` suggests: the watch stream is JSON (kubectl
    refuses an octet-stream), and each event's object a Table row with the CRD's columns.
    `-o json -w` still gets the objects themselves; `-l` chooses what the watch sends, and
    `--output-watch-events` shows the list's object ADDED and the change MODIFIED."""
    import asyncio
    import json
    import os
    from collections.abc import Awaitable, Callable

    from conftest import kubectl_binary

    _, _, kubeconfig = kube_api
    path = "/apis/pgbosh.dev/v1alpha1/namespaces/default/postgresclusters"
    body = {"apiVersion": "pgbosh.dev/v1alpha1", "kind": "PostgresCluster",
            "metadata": {"name": "watched", "namespace": "default"}, "spec": {"instances": 3}}  # fmt: skip

    async def watch(
        status: dict[str, object],
        *args: str,
        ends_an_item: Callable[[str], bool],
        also: Callable[[], Awaitable[object]] | None = None,
    ) -> list[str]:
        """kubectl's lines until it printed one item (the list), then, after the change (and
        ``also``'s, first), a second."""
        proc = await asyncio.create_subprocess_exec(
            kubectl_binary(), "--kubeconfig", kubeconfig, "get", "pgc", "-w", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HOME": os.path.dirname(kubeconfig)},
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        try:
            for item in range(2):
                if item == 1:
                    if also is not None:
                        await also()
                    await kube.merge_patch(f"{path}/watched/status", {"status": status})
                while True:
                    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
                    if not line:  # kubectl stopped watching
                        raise AssertionError((await proc.stderr.read()).decode())
                    lines.append(line.rstrip("\n"))
                    if ends_an_item(lines[-1]):
                        break
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
        return lines

    await kube.create(path, body)
    lines = await watch({"phase": "Ready", "readyInstances": 3}, ends_an_item=lambda line: line.startswith("watched"))
    header, *rows = lines
    assert header.split() == ["NAME", "INSTANCES", "READY", "PRIMARY", "PHASE", "AGE"]
    assert [r.split()[:2] for r in rows] == [["watched", "3"], ["watched", "3"]]
    assert rows[-1].split()[2:4] == ["3", "Ready"]  # the change, with the columns filled in

    provisioning = {"phase": "Provisioning", "readyInstances": 1}
    lines = await watch(provisioning, "-o", "json", ends_an_item=lambda line: line == "}")
    objects = json.loads("[" + "\n".join(lines).replace("}\n{", "},\n{") + "]")
    assert [o["kind"] for o in objects] == ["PostgresCluster", "PostgresCluster"]
    assert [o["status"]["phase"] for o in objects] == ["Ready", "Provisioning"]

    await kube.merge_patch(f"{path}/watched", {"metadata": {"labels": {"tier": "db"}}})

    def unlabelled() -> Awaitable[object]:
        return kube.create(path, {**body, "metadata": {"name": "unlabelled", "namespace": "default"}})

    args = ("-l", "tier=db", "--output-watch-events")
    lines = await watch(
        {"phase": "Ready"}, *args, ends_an_item=lambda line: line.split()[1:2] == ["watched"], also=unlabelled
    )
    header, *rows = lines
    assert header.split()[:2] == ["EVENT", "NAME"]
    assert [r.split()[:2] for r in rows] == [["ADDED", "watched"], ["MODIFIED", "watched"]]
