"""The `postgres` job: provision the node (bootstrap, clone or reuse the disk), then
run and supervise postgres and repmgrd.

Decisions about what to do with the data directory are made in `plan_provisioning`
(pure); everything else here is I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import pq, sql

from controller.consul.publisher import ConsulPublisher, ConsulPublishError
from controller.consul.types import Member
from controller.node.config import AgentConfig, Peer, PostgresJobProperties
from controller.node.hooks import HookEvent, HookEvents, install_hooks, publish_promotion
from controller.node.layout import NodeLayout
from controller.node.pgconf import (
    INCLUDE_LINE,
    PGBOSH_CONF,
    REPMGR_DATABASE,
    REPMGR_USER,
    node_id,
    render_pg_hba,
    render_pg_ident,
    render_pgpass,
    render_postgresql_conf,
    render_repmgr_conf,
)
from controller.node.processes import PostgresServer, RepmgrDaemon
from controller.node.rejoin import clone_pending_marker, former_data_dir, move_aside, rewind
from controller.node.runas import CommandFailed, RunAs
from controller.node.supervisor import Backoff, ProcessState, Supervisor

log = logging.getLogger(__name__)

PEER_CONNECT_TIMEOUT = 2
PRIMARY_WAIT_POLL = 1.0
# A former primary waits this long for some peer to answer before it starts alone.
FORMER_PRIMARY_PEER_WAIT = 30.0
# The bootstrap instance waits this long for peers that do not answer at all (their
# host is silent, not refusing) before it initdb's a new cluster.
BOOTSTRAP_PEER_WAIT = 30.0
PROVISION_RETRY_MAX = 30.0
SYNC_NAMES_POLL = 5.0
# How long the former primary waits for Consul's answer when it reads the master record.
CONSUL_READ_TIMEOUT = 2.0
# The isolation guard on the primary checks its peers this often.
ISOLATION_POLL = 1.0
ISOLATION_CONNECT_TIMEOUT = 1.0
POSTGRES_READY_TIMEOUT = 300.0


class Provisioning(enum.Enum):
    BOOTSTRAP = "bootstrap"  # initdb a new primary
    CLONE = "clone"  # repmgr standby clone from the primary
    FINISH_BOOTSTRAP = "finish-bootstrap"  # initdb done, roles/registration maybe not
    REUSE = "reuse"  # a provisioned disk: start it as it is


class ProvisioningRefused(Exception):
    """Starting this node now would be unsafe (e.g. a second writable primary)."""


def plan_provisioning(
    *,
    bootstrap: bool,
    initialized: bool,
    provisioned: bool,
    clone_pending: bool = False,
    former_data_aside: bool = False,
    peers_have_cluster: bool = False,
) -> Provisioning:
    """What to do with this disk's data directory.

    The bootstrap instance initdb's only a disk that never belonged to a cluster, in a
    deployment none of whose peers has one. Evidence on the disk that it did belong
    to one: `clone_pending` (a rejoin moved the data aside, or a clone started and has
    not completed: controller/node/rejoin.py), the provisioned marker without a data
    directory (the data is gone, the marker is not), a former primary's data moved
    aside. `peers_have_cluster`: a peer runs PostgreSQL (see judge_bootstrap), so the
    disk was replaced or wiped while the cluster lives on. Either way the node is
    cloned from the current primary: an initdb would make a second, empty, writable
    primary beside it."""
    if provisioned and initialized:
        return Provisioning.REUSE
    disk_was_in_cluster = clone_pending or provisioned or former_data_aside
    if bootstrap and not disk_was_in_cluster and not peers_have_cluster:
        return Provisioning.FINISH_BOOTSTRAP if initialized else Provisioning.BOOTSTRAP
    # A standby whose clone or registration did not finish: clone again from scratch.
    return Provisioning.CLONE


class PeerPresence(enum.Enum):
    SERVER = "server"  # PostgreSQL answers (accepting or rejecting connections): it has a data directory
    NO_SERVER = "no-server"  # the host refuses the port: its VM is there, PostgreSQL is not (yet)
    SILENT = "silent"  # no answer at all: the VM is away or the network is cut


@dataclass(frozen=True)
class BootstrapVerdict:
    bootstrap: bool
    wait: bool = False
    reason: str = ""


def judge_bootstrap(peers: list[tuple[Peer, PeerPresence]], *, waited_enough: bool) -> BootstrapVerdict:
    """May the bootstrap instance initdb a new cluster on its empty disk?

    Not when a peer runs PostgreSQL: a non-bootstrap instance only ever starts
    PostgreSQL on data cloned from a primary, so the cluster exists and this disk is
    a replaced or wiped one. On a new deployment every peer's host is there and
    refuses the port (its job waits for a registered primary): bootstrap at once. A
    peer whose host does not answer at all may be a running cluster member behind a
    slow or cut network: wait for it, up to BOOTSTRAP_PEER_WAIT, before initdb."""
    for peer, presence in peers:
        if presence is PeerPresence.SERVER:
            return BootstrapVerdict(
                bootstrap=False,
                reason=f"{peer.address} (index {peer.index}) runs PostgreSQL: the cluster exists",
            )
    silent = [peer for peer, presence in peers if presence is PeerPresence.SILENT]
    if silent and not waited_enough:
        names = ", ".join(f"{peer.address} (index {peer.index})" for peer in silent)
        return BootstrapVerdict(bootstrap=False, wait=True, reason=f"no answer yet from {names}")
    if silent:
        return BootstrapVerdict(bootstrap=True, reason=f"{len(silent)} peer(s) never answered; no peer has a cluster")
    return BootstrapVerdict(bootstrap=True, reason="no peer runs PostgreSQL: a new cluster")


@dataclass(frozen=True)
class PeerRole:
    peer: Peer
    writable: bool  # answers and is not in recovery
    registered: bool  # repmgr metadata exists and names an active primary
    timeline: int | None = None  # the newest timeline the peer knows of


@dataclass(frozen=True)
class FormerPrimaryVerdict:
    start: bool
    wait: bool = False
    reason: str = ""


def judge_former_primary(
    own_timeline: int | None,
    peers: list[PeerRole | None],
    *,
    waited_enough: bool,
    published_elsewhere: str | None = None,
) -> FormerPrimaryVerdict:
    """May a disk that held a primary start as one? Not beside a writable peer, not
    when a peer has seen a newer timeline (a promotion happened since, even if that
    new primary is down now), not when Consul's master record names another member
    (`published_elsewhere`: its promote hook moved the record there, so it was promoted
    since, even if it and every standby that followed it are down or refuse our
    login), and not before some peer answered, unless we waited."""
    answered = [role for role in peers if role is not None]
    for role in answered:
        if role.writable:
            return FormerPrimaryVerdict(
                start=False,
                reason=f"{role.peer.address} (index {role.peer.index}) is the primary now",
            )
    for role in answered:
        if own_timeline is not None and role.timeline is not None and role.timeline > own_timeline:
            return FormerPrimaryVerdict(
                start=False,
                reason=(
                    f"{role.peer.address} (index {role.peer.index}) is on timeline {role.timeline}, "
                    f"this disk on {own_timeline}: a standby was promoted since"
                ),
            )
    if published_elsewhere is not None:
        return FormerPrimaryVerdict(
            start=False,
            reason=f"Consul's master record names {published_elsewhere}: it was promoted while this node was down",
        )
    if peers and not answered and not waited_enough:
        return FormerPrimaryVerdict(start=False, wait=True, reason="no peer answers yet")
    return FormerPrimaryVerdict(start=True)


WAL_NAME = re.compile(r"^([0-9A-F]{8})(?:[0-9A-F]{16}|\.history)$")


def newest_wal_timeline(pg_wal: Path) -> int | None:
    """The highest timeline among the WAL segments and history files in pg_wal."""
    try:
        names = os.listdir(pg_wal)
    except OSError:
        return None
    timelines = [int(m.group(1), 16) for name in names if (m := WAL_NAME.match(name))]
    return max(timelines, default=None)


def failover_window(props: PostgresJobProperties) -> float:
    """How long after a primary's death repmgrd may still promote a standby: the
    failed check, the reconnect attempts, one more monitoring round and the promotion."""
    repmgr = props.repmgr
    return float(repmgr.reconnect_attempts * repmgr.reconnect_interval + 2 * repmgr.monitor_interval_secs + 2)


class PostgresJob:
    def __init__(
        self,
        config: AgentConfig,
        props: PostgresJobProperties,
        run_as: RunAs,
        current_peers: Callable[[], list[Peer]] | None = None,
    ) -> None:
        self.config = config
        # The director rewrites agent.json's peers when the instance group scales.
        self.current_peers = current_peers or config.other_peers
        self.props = props
        self.layout = NodeLayout.for_config(config, props.postgres.major_version)
        self.run_as = run_as
        self.postgres = PostgresServer(self.layout, run_as, props.postgres.port)
        self.repmgrd = RepmgrDaemon(self.layout, run_as)
        self.supervisors = [
            Supervisor(self.postgres, may_restart=self._may_restart_postgres),
            Supervisor(self.repmgrd, Backoff(grace=0.0)),
        ]
        self.desired_running = False
        self.provisioning = False
        self.error: str | None = None
        self._provisioned = False
        self._task: asyncio.Task[None] | None = None
        self.hook_events = HookEvents(self.layout, node_id(config), self._on_promoted)
        self._sync_names_task: asyncio.Task[None] | None = None
        self._guard_task: asyncio.Task[None] | None = None
        self._fenced = False

    # --- public ------------------------------------------------------------------
    def start(self) -> None:
        """Idempotent: a running or starting job is left alone."""
        if self.desired_running and (self._provisioned or (self._task is not None and not self._task.done())):
            return
        self.desired_running = True
        self._task = asyncio.create_task(self._run(), name="postgres-job")

    async def stop(self) -> None:
        """Drain: stop repmgrd first (no failover decisions while we go), then postgres fast."""
        self.desired_running = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.provisioning = False
        self._provisioned = False
        await self._stop_helpers()
        for supervisor in reversed(self.supervisors):
            await supervisor.stop()
        # A postmaster we did not start (repmgr's pg_ctl) is stopped as well.
        await self.postgres.terminate()
        log.info("job postgres stopped")

    def job_state(self) -> str:
        if not self.desired_running:
            return "stopped"
        if self.error is not None:
            return "failing"
        if self.provisioning:
            return "starting"
        states = {supervisor.state for supervisor in self.supervisors}
        if states == {ProcessState.RUNNING}:
            return "running"
        if ProcessState.FAILING in states:
            return "failing"
        return "starting"

    async def role(self) -> str:
        if self.postgres.current_pid() is None:
            return "unknown"
        in_recovery = await self.postgres.in_recovery()
        if in_recovery is None:
            return "unknown"
        return "standby" if in_recovery else "primary"

    # --- the job's life ------------------------------------------------------------
    async def _run(self) -> None:
        delay = 1.0
        while True:
            self.provisioning = True
            try:
                await self._provision_and_start()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.error = str(error)
                log.error("job postgres failing: %s", error)
                for supervisor in reversed(self.supervisors):
                    await supervisor.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, PROVISION_RETRY_MAX)
                continue
            self.error = None
            self.provisioning = False
            self._provisioned = True
            self._fenced = False
            return

    async def _provision_and_start(self) -> None:
        self._prepare_directories()
        await self._stop_orphan_postmaster()
        plan = self._plan()
        if plan in (Provisioning.BOOTSTRAP, Provisioning.FINISH_BOOTSTRAP) and await self._peers_have_cluster():
            plan = self._plan(peers_have_cluster=True)
        log.info("provisioning plan: %s", plan.value)
        if plan is Provisioning.CLONE:
            # From here until the clone is registered this disk is clone-only: a retry,
            # or an agent restarted meanwhile, never initdb's it (peers may all be
            # down by then), and a clone interrupted half way is never started as a
            # bootstrap that is "finished".
            marker = clone_pending_marker(self.layout)
            if not marker.exists():
                marker.write_text("a clone from the current primary is pending\n")
        if plan is Provisioning.BOOTSTRAP:
            self._wipe_data_dir()
            await self._initdb()
        elif plan is Provisioning.CLONE:
            primary = await self._wait_for_primary()
            self._wipe_data_dir()
            await self._clone(primary)
        elif plan is Provisioning.REUSE and not self.layout.data_dir_is_standby():
            current = await self._refuse_second_primary()
            if current is not None:
                await self._rejoin(current)
                plan = Provisioning.CLONE  # registered as a standby below, like a clone
        self._write_server_config()
        postgres = self.supervisors[0]
        postgres.start()
        await postgres.wait_running(POSTGRES_READY_TIMEOUT)
        if plan in (Provisioning.BOOTSTRAP, Provisioning.FINISH_BOOTSTRAP):
            await self._create_roles_and_databases()
            await self._repmgr("primary", "register", "--force")
        elif plan is Provisioning.CLONE:
            await self._repmgr("standby", "register", "--force")
        elif not self.layout.data_dir_is_standby():
            # A primary starting on its disk again: the job's properties are the truth on
            # every start, as BOSH means them. Passwords that changed (rotated, or credentials
            # made anew for a deployment that was adopted) and missing databases are applied;
            # the standbys get them through replication.
            await self._create_roles_and_databases()
        if plan is not Provisioning.REUSE:
            self.layout.provisioned_marker.write_text(f"{plan.value}\n")
            clone_pending_marker(self.layout).unlink(missing_ok=True)
        await self._wait_for_local_node_record()
        self.hook_events.start()
        if self.props.postgres.replication.mode == "sync":
            self._sync_names_task = asyncio.create_task(self._keep_sync_names(), name="sync-standby-names")
        self._guard_task = asyncio.create_task(self._guard_isolation(), name="isolation-guard")
        self.supervisors[1].start()
        await self.supervisors[1].wait_running(30)
        log.info("job postgres running")

    def _plan(self, *, peers_have_cluster: bool = False) -> Provisioning:
        layout = self.layout
        return plan_provisioning(
            bootstrap=self.config.bootstrap,
            initialized=layout.data_dir_initialized(),
            provisioned=layout.provisioned_marker.exists(),
            clone_pending=clone_pending_marker(layout).exists(),
            former_data_aside=former_data_dir(layout).exists(),
            peers_have_cluster=peers_have_cluster,
        )

    async def _stop_orphan_postmaster(self) -> None:
        """A postmaster we did not start still runs on this disk (an agent killed
        without its process group, or a pg_ctl start by repmgr): its sockets and
        password file belong to a VM directory that may be gone, so restart it ours."""
        if self.postgres.current_pid() is not None and not self.postgres.is_our_child():
            log.warning("stopping a postmaster this agent did not start (pid %s)", self.postgres.current_pid())
            await self.postgres.terminate()

    # --- files ---------------------------------------------------------------------
    def _prepare_directories(self) -> None:
        layout = self.layout
        self.run_as.make_dir(layout.socket_dir, 0o700)
        self.run_as.make_dir(layout.log_dir, 0o750)
        self.run_as.make_dir(layout.postgres_root, 0o700)
        self.run_as.write_file(layout.pgpass, render_pgpass(self.props), 0o600)
        self.run_as.write_file(layout.repmgr_conf, render_repmgr_conf(self.config, self.props, layout), 0o640)
        install_hooks(layout, self.run_as.uid, self.run_as.gid)

    def _wipe_data_dir(self) -> None:
        if self.layout.data_dir.exists():
            log.warning("removing incomplete data directory %s", self.layout.data_dir)
            shutil.rmtree(self.layout.data_dir)
        self.layout.provisioned_marker.unlink(missing_ok=True)
        self.run_as.make_dir(self.layout.data_dir, 0o700)

    def _write_server_config(self) -> None:
        data = self.layout.data_dir
        conf, ignored = render_postgresql_conf(self.config, self.props, self.layout, self.current_peers())
        if ignored:
            log.warning("ignoring parameters the agent manages: %s", ", ".join(ignored))
        self.run_as.write_file(data / PGBOSH_CONF, conf, 0o600)
        main_conf = data / "postgresql.conf"
        text = main_conf.read_text()
        if INCLUDE_LINE not in text:
            self.run_as.write_file(main_conf, text.rstrip("\n") + "\n\n" + INCLUDE_LINE + "\n", 0o600)
        self.run_as.write_file(data / "pg_hba.conf", render_pg_hba(self.config), 0o600)
        self.run_as.write_file(data / "pg_ident.conf", render_pg_ident(self.config), 0o600)
        self._drop_stale_passfile()

    def _drop_stale_passfile(self) -> None:
        """primary_conninfo must not name a password file of an earlier VM (its vm_dir
        is gone); the server finds ours through PGPASSFILE."""
        auto_conf = self.layout.data_dir / "postgresql.auto.conf"
        if not auto_conf.exists():
            return
        text = auto_conf.read_text()
        cleaned = re.sub(r"\s*passfile=(?:'(?:[^'\\]|\\.)*'|\S+?)(?=[\s']|$)", "", text)
        if cleaned != text:
            self.run_as.write_file(auto_conf, cleaned, 0o600)

    # --- steps -----------------------------------------------------------------------
    async def _initdb(self) -> None:
        await self.run_as.run(
            [
                self.layout.binary("initdb"),
                "-D",
                self.layout.data_dir,
                "--data-checksums",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                f"--username={self.run_as.user}",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
            ],
            time_limit=120,
        )

    async def _clone(self, primary: Peer) -> None:
        await self._repmgr(
            "standby",
            "clone",
            "-h",
            primary.address,
            "-p",
            str(self.props.postgres.port),
            "-U",
            REPMGR_USER,
            "-d",
            REPMGR_DATABASE,
            "--fast-checkpoint",
            time_limit=3600,
        )

    async def _repmgr(self, *args: str, time_limit: float = 120) -> str:
        return await self.run_as.run(
            [self.layout.binary("repmgr"), "-f", self.layout.repmgr_conf, *args], time_limit=time_limit
        )

    async def _create_roles_and_databases(self) -> None:
        """Idempotent: a bootstrap interrupted half way runs this again."""
        pg = self.props.postgres
        async with await self.postgres.connect() as conn:
            # Commits here must not wait for standbys that do not exist yet (sync mode).
            await conn.execute("SET synchronous_commit = local")
            roles = [
                (REPMGR_USER, pg.replication_password.get_secret_value(), "SUPERUSER REPLICATION LOGIN"),
                (pg.admin_user, pg.admin_password.get_secret_value(), "SUPERUSER CREATEDB CREATEROLE LOGIN"),
            ]
            for name, password, attributes in roles:
                # The server only ever sees a SCRAM verifier: even a statement logged on
                # error carries no password.
                verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256")
                exists = await (await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))).fetchone()
                verb = "ALTER" if exists else "CREATE"
                await conn.execute(
                    sql.SQL("{} ROLE {} WITH {} PASSWORD {}").format(
                        sql.SQL(verb), sql.Identifier(name), sql.SQL(attributes), sql.Literal(verifier.decode())
                    )
                )
            # repmgr's own bookkeeping never needs to wait for a synchronous standby.
            await conn.execute(
                sql.SQL("ALTER ROLE {} SET synchronous_commit = local").format(sql.Identifier(REPMGR_USER))
            )
            wanted = [(REPMGR_DATABASE, REPMGR_USER)] + [(db.name, pg.admin_user) for db in pg.databases]
            for database, owner in wanted:
                found = await (
                    await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                ).fetchone()
                if not found:
                    await conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(owner))
                    )
        log.info("roles %s, %s and databases %s are in place", REPMGR_USER, pg.admin_user, [d for d, _ in wanted])

    async def _wait_for_local_node_record(self, time_limit: float = 120.0) -> None:
        """repmgrd exits at once when its node record is missing locally; on a standby
        the record written by `standby register` arrives through replication."""
        deadline = asyncio.get_running_loop().time() + time_limit
        query = "SELECT 1 FROM repmgr.nodes WHERE node_id = %s"
        while True:
            try:
                async with await self.postgres.connect(REPMGR_DATABASE) as conn:
                    if await (await conn.execute(query, (node_id(self.config),))).fetchone():
                        return
            except psycopg.Error as error:
                log.info("repmgr metadata not readable yet: %s", error.__class__.__name__)
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"node record {node_id(self.config)} not visible locally after {time_limit:.0f} s")
            await asyncio.sleep(0.2)

    async def _probe_peer(self, peer: Peer) -> PeerRole | None:
        try:
            async with await psycopg.AsyncConnection.connect(
                host=peer.address,
                port=self.props.postgres.port,
                user=REPMGR_USER,
                password=self.props.postgres.replication_password.get_secret_value(),
                dbname=REPMGR_DATABASE,
                connect_timeout=PEER_CONNECT_TIMEOUT,
                autocommit=True,
            ) as conn:
                row = await (
                    await conn.execute(
                        # A standby that followed a promotion holds the new timeline's
                        # history file and segments even once its upstream is gone.
                        "SELECT pg_is_in_recovery(), GREATEST("
                        " (SELECT timeline_id FROM pg_control_checkpoint()),"
                        " (SELECT received_tli FROM pg_stat_wal_receiver),"
                        " (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int) FROM pg_ls_waldir()"
                        r"   WHERE name ~ '^[0-9A-F]{8}([0-9A-F]{16}|\.history)$'))"
                    )
                ).fetchone()
                if row is None:
                    return None
                timeline = int(row[1]) if row[1] is not None else None
                if row[0]:
                    return PeerRole(peer, writable=False, registered=False, timeline=timeline)
                registered = await (
                    await conn.execute(
                        "SELECT to_regclass('repmgr.nodes') IS NOT NULL"
                        " AND EXISTS (SELECT 1 FROM repmgr.nodes WHERE type = 'primary' AND active)"
                    )
                ).fetchone()
                return PeerRole(peer, writable=True, registered=bool(registered and registered[0]), timeline=timeline)
        except psycopg.Error:
            return None

    async def _published_primary(self, peers: list[Peer], *, warn: bool = True) -> Member | None:
        """The member Consul's master record names, when Consul is
        configured, answers, and names exactly one of this instance group's members
        (a peer or this node); None otherwise (no evidence either way). `warn`: log why
        Consul gave no answer (once per check, not once a second)."""
        consul = self.props.consul
        if not consul.http_addr or not consul.service:
            return None
        token = consul.token.get_secret_value() if consul.token is not None else None
        try:
            async with ConsulPublisher(consul.http_addr, token, timeout=CONSUL_READ_TIMEOUT) as publisher:
                published = await publisher.published(consul.service)
        except ConsulPublishError as error:  # the message never carries the token
            if warn:
                log.warning("could not read Consul's master record: %s", error)
            return None
        if len(published.primary) != 1:
            return None
        primary = published.primary[0]
        port = self.props.postgres.port
        if primary not in {Member(self.config.address, port), *(Member(peer.address, port) for peer in peers)}:
            if warn:
                log.warning("Consul's master record names %s:%d, not a member of this group: ignored",
                            primary.address, primary.port)
            return None
        return primary

    async def _peer_presence(self, peer: Peer) -> PeerPresence:
        """Does the peer run PostgreSQL? PQping needs no login: a server that is
        starting, in recovery or shutting down answers REJECT, which counts too."""
        conninfo = psycopg.conninfo.make_conninfo(
            host=peer.address,
            port=self.props.postgres.port,
            user=REPMGR_USER,
            dbname=REPMGR_DATABASE,
            connect_timeout=PEER_CONNECT_TIMEOUT,
        )
        answer = pq.Ping(await asyncio.to_thread(pq.PGconn.ping, conninfo.encode()))
        if answer in (pq.Ping.OK, pq.Ping.REJECT):
            return PeerPresence.SERVER
        # No server answered: a refused port is a host without PostgreSQL; an open
        # one (a server starting this instant) or a silent host is not known yet.
        return PeerPresence.NO_SERVER if await self._tcp_answer(peer) == "refused" else PeerPresence.SILENT

    async def _peers_have_cluster(self) -> bool:
        """Before the bootstrap instance initdb's: does any peer have the cluster
        already (judge_bootstrap)? Peers that do not answer at all are asked again
        every PRIMARY_WAIT_POLL seconds for up to BOOTSTRAP_PEER_WAIT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOOTSTRAP_PEER_WAIT
        logged = False
        while True:
            peers = self.current_peers()
            presences = await asyncio.gather(*(self._peer_presence(peer) for peer in peers))
            verdict = judge_bootstrap(list(zip(peers, presences, strict=True)), waited_enough=loop.time() > deadline)
            if not verdict.wait:
                if verdict.bootstrap:
                    log.info("bootstrap instance with an empty disk: %s", verdict.reason)
                else:
                    log.warning("bootstrap instance with an empty disk, but %s: cloning, not initdb", verdict.reason)
                return not verdict.bootstrap
            if not logged:
                log.warning("bootstrap instance with an empty disk: %s; waiting before initdb", verdict.reason)
                logged = True
            await asyncio.sleep(PRIMARY_WAIT_POLL)

    async def find_primary_peer(self, *, registered: bool) -> Peer | None:
        """A writable peer; with `registered`, only one repmgr already knows as primary
        (a standby registers against that record)."""
        results = await asyncio.gather(*(self._probe_peer(peer) for peer in self.current_peers()))
        for result in results:
            if result is not None and result.writable and (result.registered or not registered):
                return result.peer
        return None

    async def _wait_for_primary(self) -> Peer:
        logged = False
        while True:
            primary = await self.find_primary_peer(registered=True)
            if primary is not None:
                log.info("cloning from primary %s (index %d)", primary.address, primary.index)
                return primary
            if not logged:
                log.info("waiting for a peer to be a registered primary")
                logged = True
            await asyncio.sleep(PRIMARY_WAIT_POLL)

    async def _refuse_second_primary(self) -> Peer | None:
        """This disk held a primary. If another node was promoted meanwhile, starting
        ours would split the cluster in two (see judge_former_primary): return the
        writable peer to rejoin instead, None to start as the primary.

        Peers that answer as standbys may be electing a new primary right now (this
        node died a moment ago): within `failover_window()` of the job's start a
        writable peer may still appear, so the former primary waits that long
        before it starts as the primary. A promotion seen only as a newer timeline
        (its primary is down) is refused; the job retries and rejoins once a primary
        answers."""
        own_timeline = await self._own_timeline()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FORMER_PRIMARY_PEER_WAIT
        settle_until = loop.time() + failover_window(self.props)
        consul_warned = False
        while True:
            peers = self.current_peers()
            roles = list(await asyncio.gather(*(self._probe_peer(peer) for peer in peers)))
            writable = [role.peer for role in roles if role is not None and role.writable]
            if writable:
                log.warning("this disk holds a former primary but %s is writable: rejoining", writable[0].address)
                return writable[0]
            published = await self._published_primary(peers, warn=not consul_warned)
            consul_warned = True
            names_us = published == Member(self.config.address, self.props.postgres.port)
            # Consul naming this node means no promotion was published since it was the
            # primary: silent peers need not be waited for beyond the failover window.
            # A primary that fenced itself never starts alone again: a peer must answer.
            waited_enough = (loop.time() > deadline or (names_us and loop.time() > settle_until)) and not self._fenced
            verdict = judge_former_primary(
                own_timeline,
                roles,
                waited_enough=waited_enough,
                published_elsewhere=(
                    f"{published.address}:{published.port}" if published is not None and not names_us else None
                ),
            )
            if verdict.start:
                if any(role is not None for role in roles) and loop.time() < settle_until:
                    await asyncio.sleep(PRIMARY_WAIT_POLL)
                    continue
                if peers and all(role is None for role in roles):
                    if names_us and loop.time() <= deadline:
                        log.warning("no peer answers, and Consul's master record names this node: starting it")
                    else:
                        log.warning(
                            "no peer answered in %.0f s; starting the former primary", FORMER_PRIMARY_PEER_WAIT
                        )
                return None
            if not verdict.wait:
                break
            await asyncio.sleep(PRIMARY_WAIT_POLL)
        raise ProvisioningRefused(
            f"this disk holds a former primary but {verdict.reason}; "
            "refusing to start a second primary (it rejoins once the new primary answers)"
        )

    async def _rejoin(self, primary: Peer) -> None:
        """pg_rewind onto the new primary (controller/node/rejoin.py); when that fails
        the old data directory is moved aside and the node is cloned afresh. Either
        way the caller registers it as a standby like a clone."""
        try:
            await rewind(self.layout, self.run_as, primary, self.props, self.config.node_name)
        except (CommandFailed, psycopg.Error) as error:
            log.error("rejoin with pg_rewind failed, cloning afresh: %s", error)
            await self.postgres.terminate()
            move_aside(self.layout, f"pg_rewind onto {primary.address} failed")
            self.layout.provisioned_marker.unlink(missing_ok=True)
            self.run_as.make_dir(self.layout.data_dir, 0o700)
            await self._clone(primary)
            return
        log.info("rewound onto %s (index %d); starting as its standby", primary.address, primary.index)

    async def _stop_helpers(self) -> None:
        await self.hook_events.stop()
        current = asyncio.current_task()
        for name in ("_sync_names_task", "_guard_task"):
            task: asyncio.Task[None] | None = getattr(self, name)
            setattr(self, name, None)
            if task is not None and task is not current:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def isolation_fence_after(self) -> float:
        """About when the majority side's repmgrd promotes: the failed check and the
        reconnect attempts (3 s with the manifest's timings)."""
        repmgr = self.props.repmgr
        return float(repmgr.reconnect_attempts * repmgr.reconnect_interval + repmgr.monitor_interval_secs)

    async def _peer_reachable(self, peer: Peer) -> bool:
        """The peer's host answers on the network from this node's address (a refused
        connection is an answer too: its VM is there, its postgres is not)."""
        return await self._tcp_answer(peer) != "silent"

    async def _tcp_answer(self, peer: Peer) -> Literal["open", "refused", "silent"]:
        """A TCP connection from this node's address to the peer's PostgreSQL port."""
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    peer.address, self.props.postgres.port, local_addr=(self.config.address, 0)
                ),
                ISOLATION_CONNECT_TIMEOUT,
            )
        except ConnectionRefusedError:
            return "refused"
        except (OSError, TimeoutError):
            return "silent"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return "open"

    async def _guard_isolation(self) -> None:
        """A primary cut off from the majority of its instance group stops postgres
        (immediate shutdown) once the majority may have promoted another node, so that
        it never accepts writes beside the new primary. It then waits, as a former
        primary, until a peer answers, and rejoins (or, if nobody was promoted, starts
        again). Groups of fewer than 3 nodes are never fenced: there is no majority to
        lose a primary to. Cost: a primary whose peers are all down stops too."""
        loop = asyncio.get_running_loop()
        isolated_since: float | None = None
        while True:
            await asyncio.sleep(ISOLATION_POLL)
            peers = self.current_peers()
            if len(peers) < 2 or await self.role() != "primary":
                isolated_since = None
                continue
            reachable = sum(await asyncio.gather(*(self._peer_reachable(peer) for peer in peers)))
            if (reachable + 1) * 2 > len(peers) + 1:
                if isolated_since is not None:
                    log.info("peers reachable again (%d of %d)", reachable, len(peers))
                isolated_since = None
                continue
            now = loop.time()
            if isolated_since is None:
                isolated_since = now
                log.warning("primary sees %d of %d peers: isolated from the majority?", reachable, len(peers))
            if now - isolated_since >= self.isolation_fence_after():
                await self._fence(f"isolated from the majority of peers ({reachable} of {len(peers)} reachable)")
                return

    async def _fence(self, reason: str) -> None:
        log.error("fencing this primary: %s; stopping postgres immediately", reason)
        self._fenced = True
        self.error = f"fenced: {reason}"
        pid = self.postgres.current_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown: no new writes from now on
        await self._start_over()

    async def _may_restart_postgres(self) -> bool:
        """Asked by postgres' supervisor before it starts a postmaster that died while the job
        ran. A standby's starts again. A primary's does not: once it has been gone for the
        failover window repmgrd on the standbys promotes one of them, and the old disk
        started as it was would be a second primary (a slow restart, an agent that stalled).
        The job starts over as a former primary instead (_refuse_second_primary): it waits
        out the window, then starts as the primary if nobody was promoted, or rejoins the
        one that was. A primary without peers starts again without waiting. While the job
        provisions, its own flow handles a postmaster that does not come up."""
        if not self._provisioned or not self.desired_running or self.layout.data_dir_is_standby():
            return True
        log.warning("postgres died on this primary: starting over as a former primary (no second primary)")
        self.provisioning = True
        self._task = asyncio.create_task(self._start_over(), name="postgres-job-start-over")
        return False

    async def _start_over(self) -> None:
        """Stop the job's processes and provision again as a former primary: rejoin the new
        primary once one answers (see _refuse_second_primary)."""
        # postgres' supervisor first, or it would restart the postmaster while
        # repmgrd (stuck on a cut network, say) takes its time to stop.
        for supervisor in self.supervisors:
            await supervisor.stop()
        await self._stop_helpers()
        await self.postgres.terminate()
        self._provisioned = False
        self._task = asyncio.create_task(self._run(), name="postgres-job")

    async def _keep_sync_names(self) -> None:
        """The director rewrites agent.json's peers when the instance group scales:
        rewrite pgbosh.conf and reload, so that synchronous_standby_names names the
        standbys that exist (checked every SYNC_NAMES_POLL seconds)."""
        while True:
            await asyncio.sleep(SYNC_NAMES_POLL)
            try:
                conf, _ = render_postgresql_conf(self.config, self.props, self.layout, self.current_peers())
                path = self.layout.data_dir / PGBOSH_CONF
                if path.exists() and path.read_text() != conf:
                    self.run_as.write_file(path, conf, 0o600)
                    async with await self.postgres.connect() as conn:
                        await conn.execute("SELECT pg_reload_conf()")
                    log.info("peers changed: pgbosh.conf rewritten and reloaded")
            except (OSError, psycopg.Error) as error:
                log.warning("could not refresh synchronous_standby_names: %s", error)

    async def _on_promoted(self, event: HookEvent) -> None:
        log.info("repmgr promoted this node; publishing it as the primary")
        await publish_promotion(self.config, self.props)

    async def _own_timeline(self) -> int | None:
        output = await self.run_as.run(
            [self.layout.binary("pg_controldata"), "-D", self.layout.data_dir], time_limit=30, quiet=True
        )
        match = re.search(r"^Latest checkpoint's TimeLineID:\s+(\d+)", output, re.MULTILINE)
        checkpoint = int(match.group(1)) if match else None
        # A node promoted and killed before its first checkpoint on the new timeline
        # still has the old one in pg_control; its WAL already names the new one.
        return max(filter(None, [checkpoint, newest_wal_timeline(self.layout.data_dir / "pg_wal")]), default=None)
