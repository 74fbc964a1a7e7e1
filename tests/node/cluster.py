"""Real node agents for tests: started like the local director starts them."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[2]
ADMIN_USER = "pgbosh_admin"
# Quotes and colons on purpose: they must survive SQL, pgpass and conf quoting.
ADMIN_PASSWORD = "admin'pw:1"
REPLICATION_PASSWORD = "repl'pw:2"
PORT = 5432
CONSUL_SERVICE = "pg-test"
# repmgrd notices a lost primary within seconds: the failover tests' timings.
FAST_DETECTION = {"monitor_interval_secs": 1, "reconnect_attempts": 2, "reconnect_interval": 1}


def free_addresses(count: int) -> list[str]:
    """Loopback addresses nobody listens on at PORT: test runs (yours, a colleague's,
    CI's) may overlap, and a standby cloned from another run's primary is a mess."""
    rng = random.Random()
    for _ in range(50):
        prefix = f"127.{rng.randint(202, 250)}.{rng.randint(1, 254)}"
        addresses = [f"{prefix}.{10 + i}" for i in range(count)]
        if all(_can_bind(address) for address in addresses):
            return addresses
    raise RuntimeError("no free loopback addresses found")


def _can_bind(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, PORT))
        except OSError:
            return False
    return True


def make_base_dir() -> Path:
    """A directory the postgres user can traverse (pytest's tmp_path may sit in a 0700 home)."""
    base = Path(tempfile.mkdtemp(prefix="pgbosh-node-", dir="/var/tmp"))
    base.chmod(0o755)
    return base


def properties(
    repmgr: dict[str, Any] | None = None,
    replication: dict[str, Any] | None = None,
    passwords: tuple[str, str] = (ADMIN_PASSWORD, REPLICATION_PASSWORD),
    parameters: dict[str, str] | None = None,
    consul_addr: str = "",
) -> dict[str, Any]:
    return {
        "postgres": {
            "major_version": 15,
            "port": PORT,
            "parameters": {"shared_buffers": "16MB", "max_connections": "40", **(parameters or {})},
            "replication": replication or {"mode": "async"},
            "admin_user": ADMIN_USER,
            "admin_password": passwords[0],
            "replication_password": passwords[1],
            "databases": [{"name": "app"}],
        },
        "repmgr": {
            # Slower detection than production: a restarted primary must not be failed over here.
            "monitor_interval_secs": 2,
            "reconnect_attempts": 6,
            "reconnect_interval": 5,
            "failover": "automatic",
            "priority_by_index": True,
            **(repmgr or {}),
        },
        "consul": {"service": CONSUL_SERVICE, "http_addr": consul_addr},
    }


@dataclass
class Node:
    index: int
    address: str
    base: Path
    generation: int = 0
    process: subprocess.Popen[bytes] | None = None
    peers: list[dict[str, Any]] = field(default_factory=list)
    repmgr: dict[str, Any] = field(default_factory=dict)
    replication: dict[str, Any] = field(default_factory=dict)
    passwords: tuple[str, str] = (ADMIN_PASSWORD, REPLICATION_PASSWORD)  # admin, replication
    parameters: dict[str, str] = field(default_factory=dict)  # extra postgres.parameters
    consul_addr: str = ""  # a Consul HTTP address for the promote hook and the former primary's check

    @property
    def vm_dir(self) -> Path:
        # A new VM directory per generation, like a recreated VM.
        return self.base / "vms" / f"vm-{self.index}-{self.generation}"

    @property
    def disk(self) -> Path:
        return self.base / "disks" / f"disk-{self.index}"

    @property
    def socket(self) -> Path:
        return self.vm_dir / "agent.sock"

    def agent_json(self) -> dict[str, Any]:
        return {
            "deployment": "pgbosh-test-node",
            "instance_group": "postgres",
            "index": self.index,
            "id": f"node-{self.index}",
            "az": f"z{self.index + 1}",
            "address": self.address,
            "bootstrap": self.index == 0,
            "agent_id": f"agent-{self.index}-{self.generation}",
            "vm_dir": str(self.vm_dir),
            "persistent_disk": str(self.disk),
            "run_as": "postgres",
            "peers": self.peers,
            "jobs": [
                {
                    "name": "postgres",
                    "properties": properties(
                        self.repmgr, self.replication, self.passwords, self.parameters, self.consul_addr
                    ),
                }
            ],
        }

    def start_agent(self) -> None:
        # A new VM for this node: the old one is gone, whatever a test did before (tests of a
        # module that ran out of order left agents of earlier generations running).
        if self.process is not None and self.process.poll() is None:
            self.kill_agent()
        for path in (self.vm_dir, self.disk):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)
        config = self.vm_dir / "agent.json"
        config.write_text(json.dumps(self.agent_json()))
        config.chmod(0o600)
        out = (self.vm_dir / "agent.out").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controller.node", "agent", "--config", str(config)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, like a director VM
        )
        out.close()

    def start_job(self) -> None:
        """What the director does once the agent answers: POST /jobs/start."""
        wait_for(self.status, 30, f"agent {self.index} answering")
        state = self.request("POST", "/jobs/start")["job_state"]
        assert state in ("starting", "running"), state

    def request(self, method: str, path: str, timeout: float = 10.0) -> dict[str, Any]:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://agent", timeout=timeout) as client:
            response = client.request(method, path)
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    def status(self) -> dict[str, Any] | None:
        try:
            return self.request("GET", "/status")
        except (httpx.HTTPError, OSError):
            return None

    def process_state(self, name: str) -> str | None:
        status = self.status()
        if status is None:
            return None
        for process in status["processes"]:
            if process["name"] == name:
                return str(process["state"])
        return None

    def postmaster_pid(self) -> int:
        return int((self.disk / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[0])

    def connect(self, dbname: str = "app", timeout: int = 3) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            host=self.address,
            port=PORT,
            user=ADMIN_USER,
            password=self.passwords[0],
            dbname=dbname,
            connect_timeout=timeout,
            autocommit=True,
        )

    def stop_agent(self, timeout: float = 60.0) -> None:
        """SIGTERM (like /shutdown), then make sure the whole process group is gone."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill_agent()

    def kill_agent(self) -> None:
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        self.process = None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (psycopg.Error, OSError, httpx.HTTPError) as error:
            last_error = error
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")


def role(node: Node) -> str | None:
    """The role the node's agent reports (None: the agent does not answer)."""
    status = node.status()
    return None if status is None else str(status["role"])


def notes(node: Node) -> set[str]:
    """The rows of the tests' `notes` table on this node."""
    with node.connect() as conn:
        return {str(row[0]) for row in conn.execute("SELECT note FROM notes").fetchall()}


def writable(node: Node) -> bool:
    """Whether the node's PostgreSQL accepts writes now (down or a standby: False)."""
    try:
        with node.connect("postgres", timeout=1) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error:
        return False
    return row == (False,)


def streaming_from(node: Node) -> list[str]:
    """application_name of every standby streaming from this node."""
    with node.connect("postgres") as conn:
        rows = conn.execute("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'").fetchall()
    return [str(row[0]) for row in rows]


def job_running(node: Node) -> bool:
    return (node.status() or {}).get("job_state") == "running"


def agent_log_tail(node: Node, lines: int = 40) -> str:
    text = ""
    for path in sorted(node.base.glob(f"vms/vm-{node.index}-*/agent.log")):
        text += f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-lines:]) + "\n"
    return text


def wait_for_node(
    node: Node, predicate: Callable[[], Any], timeout: float, what: str, *, log_lines: int = 40
) -> Any:
    """wait_for, with the tail of the node agent's log in the failure."""
    try:
        return wait_for(predicate, timeout, what)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{agent_log_tail(node, log_lines)}") from None


def start_nodes(nodes: list[Node], timeout: float) -> None:
    """Start every agent and its job, then wait until each job runs (agent log on failure)."""
    for node in nodes:
        node.start_agent()
    for node in nodes:
        node.start_job()
    for node in nodes:
        wait_for_node(node, functools.partial(job_running, node), timeout, f"node {node.index}")


def link_peers(nodes: list[Node]) -> None:
    """Every node learns every peer, as the director writes them into agent.json."""
    peers = [
        {
            "index": n.index,
            "id": f"node-{n.index}",
            "az": f"z{n.index + 1}",
            "address": n.address,
            "bootstrap": n.index == 0,
        }
        for n in nodes
    ]
    for node in nodes:
        node.peers = peers


@contextlib.contextmanager
def running_cluster(
    size: int,
    repmgr: dict[str, Any] | None = None,
    replication: dict[str, Any] | None = None,
    parameters: dict[str, str] | None = None,
    consul_addr: str = "",
) -> Iterator[list[Node]]:
    addresses = free_addresses(size)
    base = make_base_dir()
    nodes = [
        Node(
            index=i,
            address=address,
            base=base,
            repmgr=repmgr or {},
            replication=replication or {},
            parameters=parameters or {},
            consul_addr=consul_addr,
        )
        for i, address in enumerate(addresses)
    ]
    link_peers(nodes)
    try:
        start_nodes(nodes, 120)
        yield nodes
    finally:
        for node in nodes:
            node.stop_agent()
        if os.environ.get("PGBOSH_KEEP_TEST_DIRS"):
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
