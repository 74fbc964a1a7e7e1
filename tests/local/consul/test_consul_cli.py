"""`pgbosh consul serve` as a real process: serves, keeps state across restarts, exits 0 on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import consul
import pytest
from ports import free_port

TOKEN = "cli-token-never-logged"



def start(http: int, dns: int, state: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller",
            "consul",
            "serve",
            "--http",
            f"127.0.0.1:{http}",
            "--dns",
            f"127.0.0.1:{dns}",
            "--token",
            TOKEN,
            "--state-file",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"consul serve exited early: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with socket.create_connection(("127.0.0.1", http), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("consul serve did not listen in 15 s")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    return out


def test_serve_restart_keeps_registrations(tmp_path: Path) -> None:
    http, dns, state = free_port(), free_port(socket.SOCK_DGRAM), tmp_path / "consul-state.json"
    proc = start(http, dns, state)
    try:
        c = consul.Consul(port=http, token=TOKEN)
        assert c.catalog.register(
            "pg-cli",
            "127.0.0.95",
            service={"ID": "pg-cli-master", "Service": "pg-cli", "Tags": ["master"], "Port": 5432},
        )
        with pytest.raises(consul.ACLPermissionDenied):
            consul.Consul(port=http).kv.put("k", "v")  # anonymous write: 403
        dig = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(dns), "master.pg-cli.service.consul", "+short"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert dig.stdout.split() == ["127.0.0.95"]
    finally:
        out = stop(proc)
    assert TOKEN not in out
    assert state.exists()
    proc = start(http, dns, state)
    try:
        entries = consul.Consul(port=http, token=TOKEN).catalog.service("pg-cli")[1]
        assert [e["ServiceID"] for e in entries] == ["pg-cli-master"]
    finally:
        out = stop(proc)
    assert TOKEN not in out
