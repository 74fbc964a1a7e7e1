"""Partition: the primary is cut off from its peers (nftables in a network namespace
this test creates; only that namespace's loopback is used). The majority side
promotes and Consul's DNS follows; the isolated old primary fences itself (its agent
stops postgres once it cannot see a majority) and, after the partition heals,
rejoins as a standby on the new timeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("partition_scenario.py")


def test_partition_majority_promotes_and_the_isolated_primary_stops_writing() -> None:
    if not shutil.which("nft") or not shutil.which("ip"):
        pytest.skip("needs nftables and iproute2 (scripts/setup installs them)")
    namespace = f"pgbosh-part-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        run = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, str(SCENARIO)],
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert run.returncode == 0 and "error" not in result, result
    print(json.dumps(result))
    assert result["majority_promoted_after_s"] < 15
    assert result["isolated_refuses_writes_after_s"] < 20
    assert result["isolated_still_refuses_after_3s"] is True
    # The isolated primary fenced itself before the majority promoted: no window in
    # which both sides accepted writes.
    last = result["isolated_last_write_after_s"]
    assert last is None or last < result["majority_promoted_after_s"], result
    assert result["rejoined_timeline"] == result["old_timeline"] + 1
    assert "majority side" in result["notes_on_new_primary"]
    # What the isolated primary accepted before it fenced itself is gone (async mode).
    assert "isolated side" not in result["notes_on_new_primary"]
