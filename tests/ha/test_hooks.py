"""The repmgr hooks and what the agent does with their events (no PostgreSQL needed)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from node.cluster import make_base_dir

from controller.local.consul.server import serve_in_thread
from controller.node.config import AgentConfig, Peer, PostgresJobProperties
from controller.node.hooks import (
    HookEvents,
    events_file,
    hook_path,
    install_hooks,
    parse_event,
    publish_promotion,
    render_hooks,
)
from controller.node.layout import NodeLayout
from controller.node.pgconf import render_postgresql_conf, render_repmgr_conf, sync_standby_names

from .harness import dns_a, master_name


@pytest.fixture
def base() -> Iterator[Path]:
    path = make_base_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_config(
    base: Path, index: int = 1, peers: int = 3, consul: str = ""
) -> tuple[AgentConfig, PostgresJobProperties]:
    config = AgentConfig.model_validate(
        {
            "deployment": "d",
            "instance_group": "postgres",
            "index": index,
            "id": f"node-{index}",
            "address": f"127.9.9.{10 + index}",
            "agent_id": "a",
            "vm_dir": str(base / "vm"),
            "persistent_disk": str(base / "disk"),
            "peers": [{"index": i, "id": f"node-{i}", "address": f"127.9.9.{10 + i}"} for i in range(peers)],
            "jobs": [
                {
                    "name": "postgres",
                    "properties": {
                        "postgres": {
                            "admin_password": "a'pw",
                            "replication_password": "r:pw",
                            "replication": {"mode": "sync", "sync_standbys": 1},
                        },
                        "consul": {"service": "pg-ha-test", "http_addr": consul},
                    },
                }
            ],
        }
    )
    props = config.postgres_job()
    assert props is not None
    return config, props


def test_sync_standby_names_name_every_other_peer(base: Path) -> None:
    config, props = agent_config(base)
    assert sync_standby_names(config, 1) == 'ANY 1 ("node-0", "node-2")'
    assert sync_standby_names(config, 5) == 'ANY 2 ("node-0", "node-2")'
    assert sync_standby_names(config, 1, peers=[]) == ""
    assert sync_standby_names(config, 1, peers=[Peer(index=7, id='we"ird', address="x")]) == 'ANY 1 ("we""ird")'
    conf, _ = render_postgresql_conf(config, props, NodeLayout.for_config(config, 15))
    assert 'synchronous_standby_names = \'ANY 1 ("node-0", "node-2")\'' in conf


def test_repmgr_conf_runs_the_hooks(base: Path) -> None:
    config, props = agent_config(base)
    layout = NodeLayout.for_config(config, 15)
    conf = render_repmgr_conf(config, props, layout)
    assert f"promote_command='{hook_path(layout, 'promote')} 2'" in conf
    assert f"follow_command='{hook_path(layout, 'follow')} %n'" in conf
    assert f"event_notification_command='{hook_path(layout, 'event')} %n %e %s'" in conf
    assert "connection_check_type='ping'" in conf
    assert "primary_visibility_consensus='false'" in conf
    for script in render_hooks(layout).values():
        assert "pw" not in script


def test_event_hook_runs_as_the_database_user_and_the_agent_reads_it(base: Path) -> None:
    config, _ = agent_config(base)
    layout = NodeLayout.for_config(config, 15)
    user = pwd.getpwnam("postgres")
    layout.socket_dir.mkdir(parents=True)

    os.chown(layout.socket_dir, user.pw_uid, user.pw_gid)
    layout.socket_dir.chmod(0o700)
    install_hooks(layout, user.pw_uid, user.pw_gid)
    watcher = HookEvents(layout, 2, on_promoted=lambda event: asyncio.sleep(0))
    watcher.start = lambda: None  # type: ignore[method-assign]
    subprocess.run(
        [
            "setpriv",
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
            str(hook_path(layout, "event")),
            "2",
            "standby_promote",
            "1",
        ],
        cwd="/tmp",
        check=True,
        timeout=10,
    )
    events = watcher.read_new()
    assert len(events) == 1 and events[0].promoted and events[0].node == 2
    assert events_file(layout).stat().st_uid == user.pw_uid
    assert watcher.read_new() == []  # read once


def test_parse_event() -> None:
    promote = parse_event("1700000000.5 promote 0 2")
    assert promote is not None and promote.promoted and promote.node == 2
    failed = parse_event("1700000000.5 promote 1 2")
    assert failed is not None and not failed.promoted
    follow = parse_event("1700000000.5 event 1 3 standby_follow")
    assert follow is not None and not follow.promoted and follow.name == "standby_follow"
    assert parse_event("garbage") is None


def test_promotion_moves_the_master_record(base: Path) -> None:
    with serve_in_thread(http_port=0, dns_port=0) as consul:
        config, props = agent_config(base, consul=consul.http_addr)
        assert asyncio.run(publish_promotion(config, props))
        assert dns_a(master_name(), consul.dns_port) == [config.address]


def test_own_timeline_includes_the_wal_of_a_promotion_not_yet_checkpointed(base: Path) -> None:
    from controller.node.job import newest_wal_timeline

    wal = base / "pg_wal"
    wal.mkdir()
    assert newest_wal_timeline(wal) is None
    (wal / "000000010000000000000004").touch()
    (wal / "00000002.history").touch()
    (wal / "archive_status").mkdir()
    assert newest_wal_timeline(wal) == 2
    (wal / "0000000A0000000000000001.partial").touch()  # not a segment name we read
    assert newest_wal_timeline(wal) == 2


def test_failover_window_follows_the_repmgr_timings(base: Path) -> None:
    from controller.node.job import failover_window

    _, props = agent_config(base)
    # repmgr defaults in config.py: monitor 2, reconnect 6 x 10
    assert failover_window(props) == 6 * 10 + 2 * 2 + 2
    fast = props.model_copy(
        update={
            "repmgr": props.repmgr.model_copy(
                update={"monitor_interval_secs": 1, "reconnect_attempts": 2, "reconnect_interval": 1}
            )
        }
    )
    assert failover_window(fast) == 6
