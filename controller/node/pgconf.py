"""Pure rendering of the node's configuration files (postgresql, pg_hba, repmgr, pgpass)."""

from __future__ import annotations

from controller.node.config import AgentConfig, Peer, PostgresJobProperties
from controller.node.hooks import repmgr_hook_settings
from controller.node.layout import NodeLayout

REPMGR_USER = "repmgr"
REPMGR_DATABASE = "repmgr"
PGBOSH_CONF = "pgbosh.conf"
INCLUDE_LINE = f"include_if_exists = '{PGBOSH_CONF}'  # pgbosh: managed settings, written at every start"
IDENT_MAP = "pgbosh"
CLUSTER_LOCATION = "default"

# Settings the agent owns: a user parameter with one of these names is ignored
# (shared_preload_libraries is merged instead), because the node breaks without them.
MANAGED_PARAMETERS = frozenset(
    {
        "listen_addresses",
        "port",
        "unix_socket_directories",
        "hba_file",
        "ident_file",
        "data_directory",
        "config_file",
        "wal_level",
        "hot_standby",
        "wal_log_hints",
        "logging_collector",
    }
)


def quote_conf(value: str) -> str:
    """A single-quoted value for postgresql.conf and repmgr.conf."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def render_postgresql_conf(
    config: AgentConfig, job: PostgresJobProperties, layout: NodeLayout, peers: list[Peer] | None = None
) -> tuple[str, list[str]]:
    """pgbosh.conf (included last by postgresql.conf) and the user parameters that were ignored."""
    pg = job.postgres
    user = dict(pg.parameters)
    ignored = sorted(name for name in user if name in MANAGED_PARAMETERS)
    preload = ["repmgr"]
    for library in user.pop("shared_preload_libraries", "").split(","):
        library = library.strip().strip('"')
        if library and library not in preload:
            preload.append(library)
    settings: dict[str, str] = {
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "wal_keep_size": "128MB",
        # repmgr uses slots; a standby that never comes back (VM deleted, instance
        # scaled away) must not fill the primary's disk. Past this it needs a re-clone.
        "max_slot_wal_keep_size": "2GB",
        "hot_standby_feedback": "on",
        "password_encryption": "scram-sha-256",
    }
    if pg.replication.mode == "sync":
        names = sync_standby_names(config, pg.replication.sync_standbys, peers)
        if names:
            settings["synchronous_standby_names"] = names
    settings.update({k: v for k, v in user.items() if k not in MANAGED_PARAMETERS})
    settings.update(
        {
            "listen_addresses": config.address,
            "port": str(pg.port),
            "unix_socket_directories": str(layout.socket_dir),
            "shared_preload_libraries": ",".join(preload),
            "wal_level": "replica",
            "hot_standby": "on",
            "wal_log_hints": "on",
            "logging_collector": "off",
        }
    )
    lines = ["# Written by the pgbosh node agent at every start; edits are overwritten."]
    lines += [f"{name} = {quote_conf(value)}" for name, value in settings.items()]
    return "\n".join(lines) + "\n", ignored


def peer_node_name(config: AgentConfig, peer: Peer) -> str:
    """repmgr's node_name of a peer: the application_name its walreceiver reports."""
    return peer.id or f"{config.instance_group}-{peer.index}"


def sync_standby_names(config: AgentConfig, count: int, peers: list[Peer] | None = None) -> str:
    """`ANY n ("a", "b")` over every other node of the instance group.

    Quorum commit: a commit is acknowledged once n of the listed standbys flushed it,
    and repmgrd promotes the standby with the most WAL received, so a failover keeps
    every acknowledged commit. The list names all peers (not `*`: a pg_basebackup with
    a slot also reports flush positions and must never count), so it is already
    right on whichever standby repmgrd promotes; the agent rewrites it when the
    director changes the peers. n is capped at the number of peers; with none, the
    setting is left out (a single node cannot be synchronous).
    """
    others = config.other_peers() if peers is None else peers
    names = sorted(peer_node_name(config, peer) for peer in others)
    if not names:
        return ""
    quoted = ", ".join('"' + name.replace('"', '""') + '"' for name in names)
    return f"ANY {min(count, len(names))} ({quoted})"


def render_pg_hba(config: AgentConfig) -> str:
    # A real deployment would restrict the host lines to the deployment's network;
    # on one machine every VM is somewhere in 127.0.0.0/8.
    return "\n".join(
        [
            "# Written by the pgbosh node agent at every start; edits are overwritten.",
            f"local   all          {config.run_as:<12} peer  map={IDENT_MAP}",
            "local   all          all          scram-sha-256",
            "host    replication  all          127.0.0.0/8  scram-sha-256",
            "host    all          all          127.0.0.0/8  scram-sha-256",
            "",
        ]
    )


def render_pg_ident(config: AgentConfig) -> str:
    # The agent runs as root and talks to its local server over the unix socket as
    # the database superuser; root owns the VM anyway.
    return "\n".join(
        [
            "# Written by the pgbosh node agent at every start; edits are overwritten.",
            f"{IDENT_MAP}  {config.run_as}  {config.run_as}",
            f"{IDENT_MAP}  root  {config.run_as}",
            "",
        ]
    )


def node_id(config: AgentConfig) -> int:
    return config.index + 1


def node_priority(config: AgentConfig, job: PostgresJobProperties) -> int:
    if not job.repmgr.priority_by_index:
        return 100
    return max(1, 100 - 10 * config.index)


def local_conninfo(config: AgentConfig, job: PostgresJobProperties) -> str:
    return (
        f"host={config.address} port={job.postgres.port} user={REPMGR_USER} dbname={REPMGR_DATABASE} connect_timeout=2"
    )


def pg_ctl_command(layout: NodeLayout, action: str) -> str:
    base = f"{layout.binary('pg_ctl')} -D {layout.data_dir} -w -t 120"
    if action == "stop":
        return f"{base} -m fast stop"
    if action in ("start", "restart"):
        # pgbosh.conf in the data directory already names the socket directory.
        return f"{base} -l {layout.postgres_log} {action}"
    if action in ("promote", "reload"):
        return f"{base} {action}"
    raise ValueError(action)


def render_repmgr_conf(config: AgentConfig, job: PostgresJobProperties, layout: NodeLayout) -> str:
    values: list[tuple[str, str | int]] = [
        ("node_id", node_id(config)),
        ("node_name", config.node_name),
        ("conninfo", local_conninfo(config, job)),
        ("data_directory", str(layout.data_dir)),
        ("pg_bindir", str(layout.bindir)),
        ("replication_user", REPMGR_USER),
        ("use_replication_slots", "yes"),
        ("pg_basebackup_options", "--checkpoint=fast"),
        # One location for the whole cluster, NOT the AZ: repmgrd refuses to promote
        # when no node of the primary's location is visible ("assuming network
        # split"), so with one node per AZ a lost primary AZ would never fail over.
        ("location", CLUSTER_LOCATION),
        ("priority", node_priority(config, job)),
        ("log_file", str(layout.repmgr_log)),
        ("log_level", "INFO"),
        ("repmgrd_pid_file", str(layout.repmgrd_pid_file)),
        ("failover", job.repmgr.failover),
        # Shell hooks (controller/node/hooks.py): repmgr's own promote/follow, then a
        # line to the agent, which moves Consul's master record at once.
        *repmgr_hook_settings(config, layout),
        ("monitor_interval_secs", job.repmgr.monitor_interval_secs),
        ("reconnect_attempts", job.repmgr.reconnect_attempts),
        ("reconnect_interval", job.repmgr.reconnect_interval),
        # Failover timing (docs/local-world.md "Failover timings"): repmgrd checks the
        # upstream every monitor_interval_secs; once a check fails it retries
        # reconnect_attempts times, reconnect_interval apart, then elects. With the
        # manifest's 1/2/1 a dead primary is declared dead 2-3 s after it died.
        # connection_check_type 'ping' (PQping, repmgr's default): it needs no backend
        # slot and no authentication, so a primary saturated by clients (even at
        # max_connections) still answers; 'connection' and 'query' would turn load
        # into false failovers.
        ("connection_check_type", "ping"),
        # Job property repmgr.primary_visibility_consensus, default false (repmgr's
        # default too). With 1 s monitoring "true" cancelled elections ("cancelling
        # failover as some nodes can still see the primary") because a sibling had
        # seen the dead primary within the last second: tests/ha/test_node_loss.py
        # with "true" had no new primary within 30 s in 2 of 3 runs (the third:
        # 2.3 s). Split-brain protection comes instead from repmgrd's majority rule,
        # the agent fencing an isolated primary, sync mode's quorum commit, and the
        # operator fencing a second writable node (docs/local-world.md). "true" is
        # there for clusters with slower monitoring (a monitor_interval_secs well
        # above the time siblings need to notice the loss), where a standby that
        # alone lost its primary then never promotes while others still see it.
        ("primary_visibility_consensus", "true" if job.repmgr.primary_visibility_consensus else "false"),
        # Off (repmgr's default): with it every standby would first wait up to
        # sibling_nodes_disconnect_timeout for the others to drop their WAL
        # receivers; the primary is gone already, the LSN comparison is stable.
        ("standby_disconnect_on_failover", "false"),
        # A follower waits this long for the winner's notification, then re-elects.
        ("primary_notification_timeout", 10),
        ("election_rerun_interval", 5),
        ("service_start_command", pg_ctl_command(layout, "start")),
        ("service_stop_command", pg_ctl_command(layout, "stop")),
        ("service_restart_command", pg_ctl_command(layout, "restart")),
        ("service_reload_command", pg_ctl_command(layout, "reload")),
        ("service_promote_command", pg_ctl_command(layout, "promote")),
    ]
    lines = ["# Written by the pgbosh node agent at every start; edits are overwritten."]
    for name, value in values:
        rendered = str(value) if isinstance(value, int) else quote_conf(value)
        lines.append(f"{name}={rendered}")
    return "\n".join(lines) + "\n"


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def render_pgpass(job: PostgresJobProperties) -> str:
    """libpq password file for repmgr, repmgrd and the walreceiver (all via PGPASSFILE)."""
    secret = _pgpass_field(job.postgres.replication_password.get_secret_value())
    return f"*:{job.postgres.port}:*:{REPMGR_USER}:{secret}\n"
