"""The bootstrap instance back on an empty (replaced) disk never starts a second primary.

Instance 0 is the primary. Its VM stops, its persistent disk is wiped (every file,
the agent's markers included: a new disk), and it starts again at once, while the
standby may still be electing itself. The old agent planned "bootstrap" for an empty disk on
the bootstrap instance: initdb, `repmgr primary register`, a second, empty writable
primary once repmgrd promoted the standby. Now it sees a peer running PostgreSQL
(controller/node/job.py judge_bootstrap), waits for that peer to be a registered
primary and clones from it. A poller watches both nodes the whole time: never two
writable at once.
"""

from __future__ import annotations

import functools
import re
import shutil
import threading
import time
from collections.abc import Iterator

import pytest

from .cluster import (
    FAST_DETECTION,
    Node,
    agent_log_tail,
    job_running,
    notes,
    role,
    running_cluster,
    streaming_from,
    wait_for,
    wait_for_node,
    writable,
)

pytestmark = pytest.mark.slow



@pytest.fixture
def cluster() -> Iterator[list[Node]]:
    # Two nodes: the standby is promoted by repmgrd alone, without the isolation
    # guard (3 or more nodes) in the story.
    with running_cluster(2, FAST_DETECTION) as nodes:
        yield nodes


class WriterWatch:
    """Polls every node's pg_is_in_recovery() until stopped; remembers every round in
    which more than one node accepted writes."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.rounds = 0
        self.split: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            writers = [node.index for node in self.nodes if writable(node)]
            self.rounds += 1
            if len(writers) > 1:
                self.split.append((time.monotonic() - start, writers))
            self._stop.wait(0.1)

    def __enter__(self) -> WriterWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_bootstrap_instance_on_a_replaced_disk_clones_from_the_current_primary(cluster: list[Node]) -> None:
    first, second = cluster
    with first.connect() as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO notes (note) VALUES ('before the disk was replaced')")
    wait_for(lambda: "before the disk was replaced" in notes(second), 30, "row on the standby")

    with WriterWatch(cluster) as watch:
        try:
            first.stop_agent()
            shutil.rmtree(first.disk)  # a new, empty persistent disk
            first.generation += 1
            first.start_agent()
            first.start_job()
            wait_for_node(
                first, functools.partial(job_running, first), 180, "instance 0 running on its new disk", log_lines=80
            )
            wait_for(lambda: role(second) == "primary", 10, "instance 1 the primary")
            wait_for(lambda: role(first) == "standby", 10, "instance 0 a standby")
            wait_for(lambda: "node-0" in streaming_from(second), 30, "instance 0 streams from instance 1")
            with second.connect() as conn:
                conn.execute("INSERT INTO notes (note) VALUES ('after the clone')")
            wait_for(lambda: "after the clone" in notes(first), 30, "row on the cloned node")
        except AssertionError as error:
            raise AssertionError(f"{error}\nrounds with two writable nodes: {watch.split[:5]}") from None
        time.sleep(1)  # a few more rounds with both nodes up

    assert watch.rounds > 20, watch.rounds
    assert not watch.split, f"two writable nodes: {watch.split[:5]}\n{agent_log_tail(first, 80)}"

    agent_log = (first.vm_dir / "agent.log").read_text()
    assert re.findall(r"provisioning plan: (\S+)", agent_log) == ["clone"], agent_log_tail(first, 80)
    assert "runs PostgreSQL: the cluster exists" in agent_log
    assert notes(first) == {"before the disk was replaced", "after the clone"}
    with first.connect() as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    assert not (first.disk / "postgres" / "pgbosh-clone-pending").exists()  # the clone completed
    # repmgr's metadata agrees, so that repmgrd can fail over again later.
    with second.connect("repmgr") as conn:
        nodes = conn.execute("SELECT node_id, type, upstream_node_id, active FROM repmgr.nodes ORDER BY 1").fetchall()
    assert nodes == [(1, "standby", 2, True), (2, "primary", None, True)]
