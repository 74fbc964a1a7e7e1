"""Consul's master record as evidence for a former primary (controller/node/job.py,
judge_former_primary): the promote hook moves the record to the promoted node, so a
former primary whose peers are all down still learns that a promotion happened and
does not start alone on its older data, which would lose the new primary's writes."""

from __future__ import annotations

import functools

import consul
import psycopg
import pytest

from controller.consul.publisher import MASTER_TAG, parse_http_addr
from controller.local.consul.server import serve_in_thread

from .cluster import (
    CONSUL_SERVICE,
    FAST_DETECTION,
    PORT,
    Node,
    job_running,
    notes,
    role,
    running_cluster,
    wait_for,
    wait_for_node,
)

pytestmark = pytest.mark.slow



def master(http_addr: str) -> str | None:
    """address:port of the one master record (None: none, or more than one)."""
    scheme, host, port = parse_http_addr(http_addr)
    _, entries = consul.Consul(host=host, port=port, scheme=scheme).catalog.service(CONSUL_SERVICE)
    masters = [f"{e['ServiceAddress']}:{e['ServicePort']}" for e in entries if MASTER_TAG in e["ServiceTags"]]
    return masters[0] if len(masters) == 1 else None


def failing_with(node: Node, text: str) -> dict[str, object] | None:
    status = node.status()
    if status is not None and status.get("job_state") == "failing" and text in str(status.get("error")):
        return status
    return None


def test_former_primary_does_not_start_alone_when_consul_names_the_promoted_node() -> None:
    with serve_in_thread(http_port=0, dns_port=0) as consul_server:
        http_addr = consul_server.http_addr
        with running_cluster(2, FAST_DETECTION, consul_addr=http_addr) as nodes:
            old, new = nodes
            wait_for(lambda: role(new) == "standby", 30, "node 1 a standby")
            with old.connect() as conn:
                conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, note text)")
                conn.execute("INSERT INTO notes (note) VALUES ('before the failover')")
            wait_for(lambda: "before the failover" in notes(new), 30, "the row on node 1")

            old.kill_agent()
            wait_for(lambda: role(new) == "primary", 30, "node 1 promoted")
            wait_for(lambda: master(http_addr) == f"{new.address}:{PORT}", 15, "Consul naming node 1")
            with new.connect() as conn:
                conn.execute("INSERT INTO notes (note) VALUES ('written on the new primary')")
            new.stop_agent()  # the new primary is down too: no peer can tell node 0 anything

            old.generation += 1
            old.start_agent()
            old.start_job()
            status = wait_for_node(old, lambda: failing_with(old, "Consul's master record"), 20, "the refusal")
            assert f"names {new.address}:{PORT}" in str(status["error"])
            assert "refusing to start a second primary" in str(status["error"])
            with pytest.raises(psycopg.OperationalError):
                old.connect()  # its postgres never started

            # Node 1 comes back on its disk: Consul names it, so it starts once the failover
            # window has passed, and the refused node 0 rejoins it as a standby.
            new.generation += 1
            new.start_agent()
            new.start_job()
            wait_for(lambda: role(new) == "primary", 60, "node 1 primary again")
            wait_for_node(old, functools.partial(job_running, old), 120, "node 0 rejoined")
            wait_for(lambda: role(old) == "standby", 10, "node 0 a standby")
            wait_for(
                lambda: {"before the failover", "written on the new primary"} <= notes(old),
                30,
                "both rows on node 0",
            )
            assert master(http_addr) == f"{new.address}:{PORT}"
