"""`pgbosh dev` itself, as a user runs it: the real command, kubectl, real PostgreSQL VMs.

It starts `.venv/bin/pgbosh dev --home TMP` on free loopback ports, waits for dev.json
(every endpoint, mode 0600, each one answering), drives the cluster with the real
kubectl through the kubeconfig it wrote (apply examples/cluster.yaml, Ready with
conditions, delete runs the finalizer and the BOSH deployment goes), and stops it with
SIGTERM while a second cluster still runs: nothing of it may be left, no postgres, no
node agent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ROOT, eventually, kubectl
from ports import free_port

pytestmark = pytest.mark.slow

PGBOSH = ROOT / ".venv" / "bin" / "pgbosh"
# A second, one-VM cluster that still runs when SIGTERM arrives: stopping must take its VM down too.
SECOND = """
apiVersion: pgbosh.dev/v1alpha1
kind: PostgresCluster
metadata:
  name: left-running
  namespace: default
spec:
  instances: 1
  storage:
    size: 1Gi
"""



def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, session id, start time) of a live process, None when it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[3]), fields[19]


def processes_of(dev_pid: int, markers: list[str]) -> dict[int, tuple[str, str]]:
    """Every live process that belongs to the dev run: its own session, anything whose command
    line names its folders (node agents, postmasters), and all their descendants (a postmaster's
    workers name no folder). pid -> (start time, command line)."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = info
    ours = {
        pid
        for pid, (_, sid, _) in table.items()
        if pid != os.getpid() and (sid == dev_pid or pid == dev_pid or any(m in _cmdline(pid) for m in markers))
    }
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in table.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return {pid: (table[pid][2], _cmdline(pid)) for pid in ours}


def still_alive(snapshot: dict[int, tuple[str, str]]) -> dict[int, str]:
    alive = {}
    for pid, (started, cmd) in snapshot.items():
        info = _stat(pid)
        if info is not None and info[2] == started:
            alive[pid] = cmd
    return alive


@contextlib.asynccontextmanager
async def pgbosh_dev(home: Path, log: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, int]]]:
    ports = {
        "kube": free_port(),
        "director": free_port(),
        "consul_http": free_port(),
        "consul_dns": free_port(socket.SOCK_DGRAM),
        "broker": free_port(),
    }
    out = open(log, "ab")  # noqa: ASYNC230 - the child owns it for its whole life
    proc = await asyncio.create_subprocess_exec(
        str(PGBOSH),
        "dev",
        "--home",
        str(home),
        "--kube",
        f"127.0.0.1:{ports['kube']}",
        "--director",
        f"127.0.0.1:{ports['director']}",
        "--consul-http",
        f"127.0.0.1:{ports['consul_http']}",
        "--consul-dns",
        f"127.0.0.1:{ports['consul_dns']}",
        "--broker",
        f"127.0.0.1:{ports['broker']}",
        "--resync",
        "2",
        "--resurrection-delay",
        "1",
        "--log-level",
        "info",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        cwd=home,
        start_new_session=True,
    )
    out.close()
    try:
        yield proc, ports
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def _director_deployments(info: dict[str, Any]) -> list[str]:
    director = json.loads(Path(info["director"]["config"]).read_text())
    async with httpx.AsyncClient(base_url=director["url"], timeout=10) as http:
        token = await http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(director["client_id"], director["client_secret"]),
            headers={"Accept": "application/json"},
        )
        answer = await http.get(
            "/deployments", headers={"Authorization": f"bearer {token.json()['access_token']}"}
        )
    answer.raise_for_status()
    return sorted(d["name"] for d in answer.json())


async def _dig(dns: str, name: str) -> list[str]:
    host, _, port = dns.rpartition(":")
    proc = await asyncio.create_subprocess_exec(
        "dig", f"@{host}", "-p", port, name, "A", "+short", "+time=2", "+tries=1", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return sorted(out.decode().split())


async def test_pgbosh_dev_runs_the_example_and_stops_everything_on_sigterm() -> None:
    began = time.monotonic()
    # The database user must traverse the home folder to reach its disks (pytest's tmp_path is 0700).
    home = Path(tempfile.mkdtemp(prefix="pgbdev-", dir="/tmp"))
    home.chmod(0o755)
    log = Path(tempfile.mkdtemp(prefix="pgbdev-log-", dir="/tmp")) / "dev.log"
    try:
        async with pgbosh_dev(home, log) as (proc, ports):
            dev_json = home / "dev.json"

            def up() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"pgbosh dev exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
                return dev_json.exists()

            await eventually(up, timeout=90, interval=0.2)
            started = time.monotonic() - began

            # dev.json: private, and every endpoint it started, each answering.
            assert stat.S_IMODE(dev_json.stat().st_mode) == 0o600
            info = json.loads(dev_json.read_text())
            assert info["home"] == str(home)
            assert info["kubernetes"]["url"] == f"http://127.0.0.1:{ports['kube']}"
            kubeconfig = info["kubernetes"]["kubeconfig"]
            assert kubeconfig == str(home / "kubeconfig") and Path(kubeconfig).exists()
            assert info["director"]["url"] == f"http://127.0.0.1:{ports['director']}"
            director_json = Path(info["director"]["config"])
            assert director_json.exists() and stat.S_IMODE(director_json.stat().st_mode) == 0o600
            assert json.loads(director_json.read_text())["url"] == info["director"]["url"]
            assert info["consul"]["http"].endswith(f"127.0.0.1:{ports['consul_http']}")
            assert info["consul"]["dns"] == f"127.0.0.1:{ports['consul_dns']}"
            assert info["broker"]["url"] == f"http://127.0.0.1:{ports['broker']}"
            broker_file = Path(info["broker"]["credentials"])
            assert stat.S_IMODE(broker_file.stat().st_mode) == 0o600
            broker_login = yaml.safe_load(broker_file.read_text())
            consul_http = info["consul"]["http"]
            if "://" not in consul_http:
                consul_http = f"http://{consul_http}"
            async with httpx.AsyncClient(timeout=10) as http:
                assert (await http.get(f"{info['kubernetes']['url']}/version")).status_code == 200
                assert (await http.get(f"{info['director']['url']}/info")).status_code == 200
                assert (await http.get(f"{consul_http}/v1/catalog/services")).status_code == 200
                catalog = await http.get(
                    f"{info['broker']['url']}/v2/catalog",
                    auth=(broker_login["username"], broker_login["password"]),
                    headers={"X-Broker-API-Version": "2.17"},
                )
                assert catalog.status_code == 200 and catalog.json()["services"]
                refused = await http.get(
                    f"{info['broker']['url']}/v2/catalog", headers={"X-Broker-API-Version": "2.17"}
                )
                assert refused.status_code == 401

            # The kubeconfig works with the real kubectl.
            code, out, err = await kubectl(kubeconfig, "get", "pgc")
            assert code == 0, err
            assert "No resources found" in out + err

            code, _, err = await kubectl(kubeconfig, "apply", "-f", str(ROOT / "examples" / "cluster.yaml"))
            assert code == 0, err
            code, _, err = await kubectl(kubeconfig, "apply", "-f", "-", stdin=SECOND)
            assert code == 0, err

            async def ready(name: str, instances: int) -> dict[str, Any] | None:
                code, out, _ = await kubectl(kubeconfig, "get", "pgc", name, "-o", "json")
                status = json.loads(out).get("status") or {} if code == 0 else {}
                ok = status.get("phase") == "Ready" and status.get("readyInstances") == instances
                return status if ok else None

            status = await eventually(lambda: ready("demo", 3), timeout=240, interval=1)
            conditions = {c["type"]: c for c in status["conditions"]}
            assert conditions["Ready"]["status"] == "True" and conditions["Ready"]["reason"]
            assert conditions["Ready"]["message"] and conditions["SpecValid"]["status"] == "True"
            assert sorted(i["az"] for i in status["instances"]) == ["z1", "z2", "z3"]
            assert status["endpoint"]["host"] == "master.pg-default-demo.service.consul"
            code, table, err = await kubectl(kubeconfig, "get", "pgc", "demo")
            assert code == 0 and "Ready" in table, err
            # Consul's DNS (the endpoint dev.json names) answers with the primary.
            primary = next(i["address"] for i in status["instances"] if i["name"] == status["currentPrimary"])

            async def dns_names_primary() -> bool:
                return await _dig(info["consul"]["dns"], status["endpoint"]["host"]) == [primary]

            await eventually(dns_names_primary, timeout=30, interval=0.5)
            await eventually(lambda: ready("left-running", 1), timeout=120, interval=1)
            assert await _director_deployments(info) == ["pgbosh-default-demo", "pgbosh-default-left-running"]
            secret = await kubectl(kubeconfig, "get", "secret", "demo-pgbosh-credentials", "-o", "json")
            password = base64.b64decode(json.loads(secret[1])["data"]["password"]).decode()
            ready_at = time.monotonic() - began

            # kubectl delete: the finalizer deletes the BOSH deployment, then the resource goes.
            code, _, err = await kubectl(kubeconfig, "delete", "pgc", "demo", "--wait=false")
            assert code == 0, err

            async def gone() -> bool:
                code, _, err = await kubectl(kubeconfig, "get", "pgc", "demo")
                return code != 0 and "NotFound" in err

            await eventually(gone, timeout=120, interval=1)
            assert await _director_deployments(info) == ["pgbosh-default-left-running"]

            # SIGTERM with a cluster still running: everything stops, nothing is left behind.
            vm_root = json.loads(director_json.read_text())["vm_root"]
            running = processes_of(proc.pid, [str(home), vm_root])
            commands = " ".join(cmd for _, cmd in running.values())
            assert "postgres" in commands and "controller.node" in commands, commands
            stopping = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), timeout=60)
            stopped_in = time.monotonic() - stopping
            assert code == 0, log.read_text()[-4000:]
            assert "pgbosh dev: stopping" in log.read_text()
            await eventually(lambda: not still_alive(running), timeout=15, interval=0.2)
            assert not processes_of(proc.pid, [str(home), vm_root])
            assert password not in log.read_text()
        print(
            f"\npgbosh dev: up in {started:.1f}s, both clusters Ready at {ready_at:.1f}s, "
            f"stopped in {stopped_in:.1f}s, whole test {time.monotonic() - began:.1f}s"
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(log.parent, ignore_errors=True)
