"""Where VM and disk directories go: reachable by the database user, and short enough for unix sockets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controller.local.director.director import MAX_VM_ROOT_LEN, choose_vm_root

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the database user only matters when running as root")


def test_state_dir_reachable_by_postgres_keeps_the_vms(short_tmp: Path) -> None:
    state = short_tmp / "st"
    state.mkdir(mode=0o755)
    assert choose_vm_root(state, "postgres") == state / "vms-and-disks"


def test_a_parent_closed_to_postgres_moves_the_vms_to_var_lib(short_tmp: Path) -> None:
    closed = short_tmp / "closed"
    closed.mkdir(mode=0o700)
    state = closed / "st"
    state.mkdir(mode=0o755)
    root = choose_vm_root(state, "postgres")
    assert root.parent == Path("/var/lib/pgbosh") and root.name.startswith("st-")
    assert choose_vm_root(state, "postgres") == root  # stable for the same state dir
    os.chmod(closed, 0o701)  # others may traverse: enough
    assert choose_vm_root(state, "postgres") == state / "vms-and-disks"


def test_a_long_state_dir_moves_the_vms_to_var_lib(short_tmp: Path) -> None:
    state = short_tmp / ("x" * 40)
    state.mkdir(mode=0o755)
    root = choose_vm_root(state, "postgres")
    assert root.parent == Path("/var/lib/pgbosh") and len(str(root)) <= MAX_VM_ROOT_LEN
