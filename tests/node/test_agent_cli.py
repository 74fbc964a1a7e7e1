"""`python -m controller.node agent --config FILE` as the director runs it, with bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import ADMIN_PASSWORD, REPO, Node, make_base_dir


@pytest.fixture
def base() -> Iterator[Path]:
    path = make_base_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_agent(base: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = base / "agent.json"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "controller.node", "agent", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_invalid_agent_json_exits_2_without_echoing_values(base: Path) -> None:
    config = Node(index=0, address="127.250.250.10", base=base).agent_json()
    postgres = config["jobs"][0]["properties"]["postgres"]
    postgres["port"] = "not-a-port"
    del postgres["replication_password"]
    result = run_agent(base, config)
    assert result.returncode == 2
    assert "port" in result.stderr and "replication_password" in result.stderr
    assert ADMIN_PASSWORD not in result.stderr + result.stdout
    assert not (base / "vms").exists()  # nothing started, no socket


def test_unknown_run_as_user_exits_2(base: Path) -> None:
    config = Node(index=0, address="127.250.250.10", base=base).agent_json()
    config["run_as"] = "no-such-user-pgbosh"
    result = run_agent(base, config)
    assert result.returncode == 2
    assert "no-such-user-pgbosh" in result.stderr
    assert not list(base.rglob("agent.sock"))


def test_usage_error_without_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller.node", "agent"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--config" in result.stderr
