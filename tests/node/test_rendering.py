"""Pure parts of the node agent: agent.json validation, rendered files, provisioning plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.node.agent import _current_peers
from controller.node.config import AgentConfig, ConfigError, Peer, PostgresJobProperties, load_agent_config
from controller.node.job import (
    PeerPresence,
    PeerRole,
    Provisioning,
    judge_bootstrap,
    judge_former_primary,
    plan_provisioning,
)
from controller.node.layout import NodeLayout
from controller.node.pgconf import (
    render_pg_hba,
    render_pgpass,
    render_postgresql_conf,
    render_repmgr_conf,
)

SECRET = "s3cr'et:pw"


def agent_json(index: int = 1, **postgres: object) -> dict[str, object]:
    return {
        "deployment": "pgbosh-default-demo",
        "instance_group": "postgres",
        "index": index,
        "id": f"uuid-{index}",
        "az": "z2",
        "address": "127.1.0.11",
        "bootstrap": index == 0,
        "agent_id": "agent-1",
        "vm_dir": "/var/vcap/vm",
        "persistent_disk": "/var/vcap/disk",
        "peers": [],
        "jobs": [
            {
                "name": "postgres",
                "properties": {
                    "postgres": {
                        "admin_password": SECRET,
                        "replication_password": SECRET,
                        "parameters": {
                            "max_connections": 200,
                            "port": "1",
                            "shared_preload_libraries": "pg_stat_statements",
                        },
                        **postgres,
                    },
                    "repmgr": {"monitor_interval_secs": 1, "reconnect_attempts": 2, "reconnect_interval": 1},
                },
            }
        ],
    }


def parsed(data: dict[str, object]) -> tuple[AgentConfig, PostgresJobProperties]:
    config = AgentConfig.model_validate(data)
    job = config.postgres_job()
    assert job is not None
    return config, job


def test_postgresql_conf_keeps_managed_settings_and_merges_preload() -> None:
    config, job = parsed(agent_json())
    layout = NodeLayout.for_config(config, 15)
    conf, ignored = render_postgresql_conf(config, job, layout)
    assert ignored == ["port"]
    assert "listen_addresses = '127.1.0.11'" in conf
    assert "port = '5432'" in conf
    assert "unix_socket_directories = '/var/vcap/vm/run'" in conf
    assert "shared_preload_libraries = 'repmgr,pg_stat_statements'" in conf
    assert "max_connections = '200'" in conf
    assert "wal_log_hints = 'on'" in conf
    assert "max_slot_wal_keep_size = '2GB'" in conf
    assert "synchronous_standby_names" not in conf


def test_sync_mode_names_any_n_standbys() -> None:
    data = agent_json(replication={"mode": "sync", "sync_standbys": 2})
    data["peers"] = [{"index": i, "id": f"uuid-{i}", "address": f"127.1.0.1{i}"} for i in range(3)]
    config, job = parsed(data)
    conf, _ = render_postgresql_conf(config, job, NodeLayout.for_config(config, 15))
    # Every other peer by its repmgr node_name (the walreceiver's application_name).
    assert "synchronous_standby_names = 'ANY 2 (\"uuid-0\", \"uuid-2\")'" in conf


def test_repmgr_conf_is_per_node() -> None:
    config, job = parsed(agent_json(index=1))
    text = render_repmgr_conf(config, job, NodeLayout.for_config(config, 15))
    assert "node_id=2\n" in text
    assert "node_name='uuid-1'" in text
    assert "conninfo='host=127.1.0.11 port=5432 user=repmgr dbname=repmgr connect_timeout=2'" in text
    assert "repmgrd_pid_file='/var/vcap/vm/run/repmgrd.pid'" in text
    # Not the AZ: see pgconf.render_repmgr_conf (repmgrd would never fail over across AZs).
    assert "location='default'" in text
    assert "priority=90\n" in text
    assert "failover='automatic'" in text
    assert "monitor_interval_secs=1\n" in text
    # Shell hooks in the VM directory (controller/node/hooks.py) run repmgr's own
    # promote/follow and then tell the agent.
    assert "promote_command='/var/vcap/vm/hooks/promote 2'" in text
    assert "follow_command='/var/vcap/vm/hooks/follow %n'" in text
    assert "event_notification_command='/var/vcap/vm/hooks/event %n %e %s'" in text
    assert "pg_ctl -D /var/vcap/disk/postgres/data" in text
    assert SECRET not in text


@pytest.mark.parametrize("consensus", [None, False, True], ids=["default", "false", "true"])
def test_primary_visibility_consensus_is_a_job_property(consensus: bool | None) -> None:
    data = agent_json()
    if consensus is not None:
        job = data["jobs"][0]  # type: ignore[index]
        job["properties"]["repmgr"]["primary_visibility_consensus"] = consensus
    config, job_props = parsed(data)
    text = render_repmgr_conf(config, job_props, NodeLayout.for_config(config, 15))
    expected = "true" if consensus else "false"
    assert f"primary_visibility_consensus='{expected}'\n" in text
    assert text.count("primary_visibility_consensus=") == 1


def test_passwords_only_in_pgpass_escaped() -> None:
    config, job = parsed(agent_json())
    assert render_pgpass(job) == "*:5432:*:repmgr:s3cr'et\\:pw\n"
    assert SECRET not in render_pg_hba(config)
    assert SECRET not in repr(config) + repr(job)


def test_validation_errors_never_echo_secrets(tmp_path: Path) -> None:
    data = agent_json()
    data["jobs"] = [{"name": "postgres", "properties": {"postgres": {"admin_password": SECRET, "port": "x"}}}]
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as error:
        load_agent_config(path)
    assert "replication_password" in str(error.value)
    assert "port" in str(error.value)
    assert SECRET not in str(error.value)


def test_unknown_job_is_refused(tmp_path: Path) -> None:
    data = agent_json()
    data["jobs"] = [{"name": "redis", "properties": {}}]
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="unknown job"):
        load_agent_config(path)


@pytest.mark.parametrize(
    ("bootstrap", "initialized", "provisioned", "plan"),
    [
        (True, False, False, Provisioning.BOOTSTRAP),
        (True, True, False, Provisioning.FINISH_BOOTSTRAP),
        (True, True, True, Provisioning.REUSE),
        (False, False, False, Provisioning.CLONE),
        (False, True, False, Provisioning.CLONE),
        (False, True, True, Provisioning.REUSE),
        (False, False, True, Provisioning.CLONE),
        # The marker outlived the data: the disk belonged to a cluster.
        (True, False, True, Provisioning.CLONE),
    ],
)
def test_provisioning_plan(bootstrap: bool, initialized: bool, provisioned: bool, plan: Provisioning) -> None:
    assert plan_provisioning(bootstrap=bootstrap, initialized=initialized, provisioned=provisioned) is plan


@pytest.mark.parametrize(
    ("initialized", "provisioned", "plan"),
    [
        (False, False, Provisioning.CLONE),
        (True, False, Provisioning.CLONE),
        (True, True, Provisioning.REUSE),
    ],
)
def test_a_disk_whose_rejoin_clone_is_pending_is_never_bootstrapped(
    initialized: bool, provisioned: bool, plan: Provisioning
) -> None:
    """After a rejoin's fallback moved the data aside (tests/node/test_rejoin.py), even
    the bootstrap instance clones: an initdb would make a second, empty primary."""
    assert (
        plan_provisioning(bootstrap=True, initialized=initialized, provisioned=provisioned, clone_pending=True)
        is plan
    )


@pytest.mark.parametrize("initialized", [False, True], ids=["empty", "initdb-done"])
def test_bootstrap_instance_clones_when_a_peer_has_the_cluster(initialized: bool) -> None:
    """A replaced or wiped disk on instance 0 while its peers run the cluster
    (tests/node/test_replaced_disk.py): clone, never a second, empty primary."""
    assert (
        plan_provisioning(bootstrap=True, initialized=initialized, provisioned=False, peers_have_cluster=True)
        is Provisioning.CLONE
    )
    # A provisioned disk is started as it is; the former-primary checks take over.
    assert (
        plan_provisioning(bootstrap=True, initialized=True, provisioned=True, peers_have_cluster=True)
        is Provisioning.REUSE
    )


@pytest.mark.parametrize(
    ("provisioned", "former_data_aside"),
    [(True, False), (False, True), (True, True)],
    ids=["provisioned-marker", "former-primary-aside", "both"],
)
def test_a_disk_that_belonged_to_a_cluster_is_never_bootstrapped(provisioned: bool, former_data_aside: bool) -> None:
    """The data directory is gone but the disk remembers a cluster: clone (and wait for
    a primary, however long) even when no peer answers right now."""
    plan = plan_provisioning(
        bootstrap=True, initialized=False, provisioned=provisioned, former_data_aside=former_data_aside
    )
    assert plan is Provisioning.CLONE


def _peer(index: int) -> Peer:
    return Peer(index=index, id=f"n{index}", address=f"127.1.0.{10 + index}")


def test_bootstrap_of_a_new_deployment_is_not_delayed() -> None:
    """All VMs start at once: the peers' hosts refuse the port (their jobs wait for a
    registered primary), and instance 0 initdb's at once."""
    peers = [(_peer(1), PeerPresence.NO_SERVER), (_peer(2), PeerPresence.NO_SERVER)]
    verdict = judge_bootstrap(peers, waited_enough=False)
    assert verdict.bootstrap and not verdict.wait
    assert judge_bootstrap([], waited_enough=False).bootstrap  # a single instance


@pytest.mark.parametrize("others", [PeerPresence.NO_SERVER, PeerPresence.SILENT])
def test_bootstrap_refused_when_any_peer_runs_postgres(others: PeerPresence) -> None:
    # A standby (with data, maybe electing a new primary right now) is enough.
    verdict = judge_bootstrap([(_peer(1), others), (_peer(2), PeerPresence.SERVER)], waited_enough=True)
    assert not verdict.bootstrap and not verdict.wait
    assert "127.1.0.12 (index 2) runs PostgreSQL" in verdict.reason


def test_bootstrap_waits_for_a_silent_peer_then_goes_ahead() -> None:
    peers = [(_peer(1), PeerPresence.NO_SERVER), (_peer(2), PeerPresence.SILENT)]
    waiting = judge_bootstrap(peers, waited_enough=False)
    assert waiting.wait and not waiting.bootstrap
    assert "127.1.0.12 (index 2)" in waiting.reason
    assert judge_bootstrap(peers, waited_enough=True).bootstrap


def test_vm_dir_too_long_for_unix_sockets_is_refused(tmp_path: Path) -> None:
    data = agent_json()
    data["vm_dir"] = "/var/vcap/" + "x" * 90
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="vm_dir is too long"):
        load_agent_config(path)


def _role(index: int, *, writable: bool = False, timeline: int | None = 1) -> PeerRole:
    peer = Peer(index=index, id=f"n{index}", address=f"127.1.0.{10 + index}")
    return PeerRole(peer, writable=writable, registered=writable, timeline=timeline)


def test_former_primary_starts_beside_standbys_of_its_own_timeline() -> None:
    verdict = judge_former_primary(1, [_role(1), _role(2)], waited_enough=False)
    assert verdict.start


def test_former_primary_refuses_beside_a_writable_peer() -> None:
    verdict = judge_former_primary(1, [_role(1, writable=True, timeline=2), None], waited_enough=True)
    assert not verdict.start and not verdict.wait
    assert "127.1.0.11 (index 1) is the primary now" in verdict.reason


def test_former_primary_refuses_when_a_peer_saw_a_newer_timeline() -> None:
    # The promoted node is down; its follower still proves a promotion happened.
    verdict = judge_former_primary(1, [None, _role(2, timeline=2)], waited_enough=True)
    assert not verdict.start and not verdict.wait
    assert "timeline 2" in verdict.reason


def test_former_primary_waits_for_some_peer_then_starts_alone() -> None:
    assert judge_former_primary(3, [None, None], waited_enough=False).wait
    assert judge_former_primary(3, [None, None], waited_enough=True).start
    assert judge_former_primary(3, [], waited_enough=False).start


def test_former_primary_refuses_when_consul_names_another_member() -> None:
    """The promoted node and every standby that followed it are down, or refuse this
    node's login (rotated passwords): Consul's master record still tells of the
    promotion, so even after the wait the former primary does not start alone."""
    for peers in ([None, None], [_role(1), None]):
        verdict = judge_former_primary(1, peers, waited_enough=True, published_elsewhere="127.1.0.11:5432")
        assert not verdict.start and not verdict.wait
        assert "Consul's master record names 127.1.0.11:5432" in verdict.reason
    # A writable peer or a newer timeline still say it first.
    beside = judge_former_primary(
        1, [_role(1, writable=True, timeline=2)], waited_enough=True, published_elsewhere="127.1.0.12:5432"
    )
    assert "is the primary now" in beside.reason


def test_multi_line_password_is_refused_without_echo(tmp_path: Path) -> None:
    data = agent_json(admin_password="line one\nline two")
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="admin_password") as error:
        load_agent_config(path)
    assert "line one" not in str(error.value)


def test_agent_rereads_peers_from_agent_json(tmp_path: Path) -> None:
    data = agent_json(index=1)
    data["vm_dir"] = str(tmp_path)
    data["peers"] = [{"index": 0, "id": "uuid-0", "address": "127.1.0.10"}]
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(data))
    config, _ = load_agent_config(path)
    data["peers"] = [
        {"index": 0, "id": "uuid-0", "address": "127.1.0.10"},
        {"index": 2, "id": "uuid-2", "address": "127.1.0.12"},
    ]
    path.write_text(json.dumps(data))
    assert [peer.index for peer in _current_peers(path, config)] == [0, 2]
    path.write_text("{not json")
    assert [peer.index for peer in _current_peers(path, config)] == [0]
