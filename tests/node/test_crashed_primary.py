"""A primary whose postmaster died starts again only if no standby was promoted meanwhile.

repmgrd on the standbys promotes one of them once the primary has been gone for the
failover window. If the agent then restarted the old postmaster on its disk as it was,
two nodes would accept writes. The agent now takes the former primary's path instead:
it waits out the window, then starts as the primary if nobody was promoted, or rejoins
the new primary as its standby (pg_rewind)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from .cluster import FAST_DETECTION, Node, notes, role, running_cluster, streaming_from, wait_for, writable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Node]]:
    with running_cluster(3, FAST_DETECTION) as nodes:
        yield nodes


def test_a_dead_primary_postmaster_rejoins_a_standby_promoted_meanwhile(cluster: list[Node]) -> None:
    """The agent is frozen while its postmaster is killed (a slow agent, or a VM that
    stalled), so the standbys promote one of them first. Once it runs again it must not
    start the old primary beside the new one: it becomes a standby of it."""
    old_primary, *standbys = cluster
    with old_primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO notes (note) VALUES ('before the crash')")
    wait_for(lambda: len(streaming_from(old_primary)) == 2, 30, "2 standbys streaming")

    assert old_primary.process is not None
    agent = old_primary.process.pid
    os.kill(agent, signal.SIGSTOP)
    try:
        os.kill(old_primary.postmaster_pid(), signal.SIGKILL)
        new_primary = wait_for(
            lambda: next((node for node in standbys if writable(node)), None), 60, "a standby promoted"
        )
    finally:
        os.kill(agent, signal.SIGCONT)

    # From here on the old primary never accepts writes; it comes back as a standby.
    deadline = time.monotonic() + 120
    while not (role(old_primary) == "standby" and "node-0" in streaming_from(new_primary)):
        assert not writable(old_primary), "the old primary was restarted beside the promoted standby"
        assert time.monotonic() < deadline, "the old primary did not rejoin as a standby in 120 s"
        time.sleep(0.1)
    assert not writable(old_primary)
    with new_primary.connect() as conn:
        conn.execute("INSERT INTO notes (note) VALUES ('after the crash')")
    wait_for(lambda: notes(old_primary) >= {"before the crash", "after the crash"}, 30, "rows on the old primary")
