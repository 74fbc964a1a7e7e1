"""with_lag (controller/pg/probe.py), the pure part of the operator's node probe; the
real-process probe is in tests/node/test_cluster.py."""

from __future__ import annotations

import subprocess
import sys

from controller.pg.probe import with_lag
from controller.pg.types import NodeState
from controller.reconcile.planner import choose_primary


def test_lag_is_measured_against_the_primary_choose_primary_picks() -> None:
    """Two writable nodes: a stale former primary on timeline 1 that wrote further,
    and the promoted one on timeline 2. Lag is behind the timeline-2 primary."""
    stale = NodeState("127.1.0.10", True, in_recovery=False, timeline=1, current_lsn=9_000)
    promoted = NodeState("127.1.0.11", True, in_recovery=False, timeline=2, current_lsn=5_000)
    standby = NodeState("127.1.0.12", True, in_recovery=True, timeline=2, received_lsn=4_800, replayed_lsn=4_700)
    behind_stale = NodeState("127.1.0.13", True, in_recovery=True, timeline=1, received_lsn=8_000)
    nodes = with_lag([stale, promoted, standby, behind_stale])
    assert choose_primary(nodes) == promoted
    assert [n.lag_bytes for n in nodes] == [None, None, 300, 0]


def test_lag_without_a_primary_is_not_measured() -> None:
    standby = NodeState("127.1.0.12", True, in_recovery=True, timeline=2, replayed_lsn=4_700)
    down = NodeState("127.1.0.10", False, error="connection refused")
    assert with_lag([standby, down]) == [standby, down]


def test_probe_and_planner_import_in_either_order() -> None:
    """Both use choose_primary from controller.pg.types: no import cycle either way."""
    for first, second in [
        ("controller.pg.probe", "controller.reconcile.planner"),
        ("controller.reconcile.planner", "controller.pg.probe"),
    ]:
        subprocess.run([sys.executable, "-c", f"import {first}, {second}"], check=True, timeout=60)
