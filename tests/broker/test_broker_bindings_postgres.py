"""Bind and unbind against a real PostgreSQL: the role can write in `app`, and is gone after unbind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from controller.broker import naming
from controller.broker.roles import GROUP_ROLE, PsycopgRoleManager

from .conftest import NAMESPACE, PLANS, SERVICE, World

pytestmark = pytest.mark.slow

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ADDRESS = "127.203.0.10"
PORT = 5432
ADMIN = "pgbosh_admin"
ADMIN_PASSWORD = "admin-Pw-for-test"
INSTANCE = "pg-bind-instance"


@dataclass
class Postgres:
    root: Path
    socket_dir: Path
    log: Path

    def superuser(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host=str(self.socket_dir), port=PORT, user="postgres", dbname=dbname, autocommit=True)


def _as_postgres(*argv: str, **kwargs: object) -> list[str]:
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="pgbosh-broker-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    data, sockets, log = root / "data", root / "sock", root / "postgres.log"
    sockets.mkdir()
    log.touch()
    shutil.chown(root, "postgres", "postgres")
    for path in (sockets, log):
        shutil.chown(path, "postgres", "postgres")
    process: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            _as_postgres(
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ),
            cwd="/tmp",
            check=True,
            capture_output=True,
        )
        with open(log, "ab") as out:
            process = subprocess.Popen(
                _as_postgres(
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(data),
                    "-c",
                    f"listen_addresses={ADDRESS}",
                    "-c",
                    f"port={PORT}",
                    "-c",
                    f"unix_socket_directories={sockets}",
                    # Every statement is logged: the test checks no plaintext password reaches it.
                    "-c",
                    "log_statement=all",
                ),
                cwd="/tmp",
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((ADDRESS, PORT), timeout=0.5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        pg = Postgres(root, sockets, log)
        for _ in range(50):
            try:
                with pg.superuser() as conn:
                    conn.execute(f"CREATE ROLE {ADMIN} LOGIN SUPERUSER PASSWORD '{ADMIN_PASSWORD}'")
                    conn.execute("CREATE DATABASE app")
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        yield pg
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def roles() -> PsycopgRoleManager:
    return PsycopgRoleManager()


async def ready_cluster(world: World) -> None:
    response = await world.http.put(
        f"/v2/service_instances/{INSTANCE}",
        params={"accepts_incomplete": "true"},
        json=world.provision_body("small-ha"),
    )
    assert response.status_code == 202
    name = naming.cluster_name(INSTANCE)
    await world.kube.apply_secret(NAMESPACE, f"{name}-admin", {"username": ADMIN, "password": ADMIN_PASSWORD})
    await world.play_operator(
        INSTANCE,
        "Ready",
        ready_status={
            "currentPrimary": f"{name}/0",
            "instances": [{"name": f"{name}/0", "address": ADDRESS, "role": "primary"}],
            "endpoint": {"host": f"master.{name}.service.consul", "port": PORT},
            "credentialsSecret": f"{name}-admin",
        },
    )


def connect(credentials: dict[str, object]) -> psycopg.Connection[tuple[object, ...]]:
    # The hostname is a Consul DNS name the local Consul would resolve; here the address stands in
    # for that resolution (hostaddr), and everything else comes from the uri as an app would use it.
    return psycopg.connect(str(credentials["uri"]), hostaddr=ADDRESS, connect_timeout=5)


async def test_bind_writes_and_unbind_removes_the_role(world: World, postgres: Postgres) -> None:
    await ready_cluster(world)
    path = f"/v2/service_instances/{INSTANCE}/service_bindings"
    body = {"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id, "bind_resource": {"app_guid": "app-1"}}
    unbind = {"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id}

    first = await world.http.put(f"{path}/binding-a", json=body)
    assert first.status_code == 201, first.text
    creds_a = first.json()["credentials"]
    assert creds_a["hostname"] == f"master.{naming.cluster_name(INSTANCE)}.service.consul"
    assert creds_a["name"] == "app" and creds_a["port"] == PORT

    session = connect(creds_a)
    with session.cursor() as cur:
        cur.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        cur.execute("INSERT INTO notes (body) VALUES ('hello')")
    session.commit()

    # Objects belong to the shared group role: a second binding reads and writes them too.
    second = await world.http.put(f"{path}/binding-b", json=body)
    assert second.status_code == 201
    with connect(second.json()["credentials"]) as other:
        other.execute("INSERT INTO notes (body) VALUES ('from b')")
        assert other.execute("SELECT count(*) FROM notes").fetchone() == (2,)

    # Idempotent bind: same credentials, password unchanged, still valid.
    again = await world.http.put(f"{path}/binding-a", json=body)
    assert (again.status_code, again.json()["credentials"]) == (200, creds_a)

    unbound = await world.http.delete(f"{path}/binding-a", params=unbind)
    assert (unbound.status_code, unbound.json()) == (200, {})
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")  # its session was terminated
    session.close()
    with pytest.raises(psycopg.OperationalError):
        connect(creds_a)
    with postgres.superuser("app") as admin:
        assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (creds_a["username"],)).fetchone() is None
        assert admin.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'notes'").fetchone() == (GROUP_ROLE,)
        assert admin.execute("SELECT count(*) FROM notes").fetchone() == (2,)
    assert (await world.http.get(f"{path}/binding-a")).status_code == 404
    repeat = await world.http.delete(f"{path}/binding-a", params=unbind)
    assert (repeat.status_code, repeat.json()) == (410, {})

    assert (await world.http.delete(f"{path}/binding-b", params=unbind)).status_code == 200
    server_log = postgres.log.read_text()
    assert "CREATE ROLE" in server_log  # the statement log is on
    for secret in (creds_a["password"], second.json()["credentials"]["password"]):
        assert secret not in server_log
