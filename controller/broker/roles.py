"""Database roles for bindings, created on the cluster's primary with psycopg.

Each binding gets its own login role, a member of one group role that holds the
privileges on the application database. The binding role's sessions switch to
the group role (``ALTER ROLE ... SET role``), so the tables an app creates
belong to the group: they survive unbind and are shared by every binding.

The password reaches PostgreSQL only as a SCRAM-SHA-256 verifier computed here,
so no plaintext appears in the server's statement log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

APP_DATABASE = "app"
GROUP_ROLE = "pgbosh_app_users"
CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT = "15s"
SCRAM_ITERATIONS = 4096
# One lock id for all binding DDL in a cluster: concurrent binds would otherwise race
# on creating the group role.
_ADVISORY_LOCK = 0x70676273  # "pgbs"


class DatabaseUnavailable(Exception):
    """The primary could not be reached or refused the work; the message holds no secret."""


@dataclass(frozen=True)
class AdminTarget:
    """Where and as whom to manage roles: the primary's address, never a DNS name."""

    host: str
    port: int
    username: str
    password: str
    database: str = APP_DATABASE

    def __repr__(self) -> str:
        return (
            f"AdminTarget(host={self.host!r}, port={self.port}, username={self.username!r},"
            f" database={self.database!r})"
        )


class RoleManager(Protocol):
    async def ensure_login_role(self, target: AdminTarget, role: str, password: str) -> None: ...

    async def drop_login_role(self, target: AdminTarget, role: str) -> bool: ...


def generate_password() -> str:
    return secrets.token_urlsafe(32)


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The ``SCRAM-SHA-256$...`` string PostgreSQL stores for a password (RFC 5802/7677)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


class PsycopgRoleManager:
    """RoleManager on a fresh connection per call: bindings are rare, connections to a primary may move."""

    async def _connect(self, target: AdminTarget) -> psycopg.AsyncConnection[tuple[object, ...]]:
        try:
            return await psycopg.AsyncConnection.connect(
                host=target.host,
                port=target.port,
                user=target.username,
                password=target.password,
                dbname=target.database,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name="pgbosh-broker",
                # Explicit transaction blocks only: each one commits at its end.
                autocommit=True,
            )
        except psycopg.Error as exc:
            raise DatabaseUnavailable(
                f"cannot connect to {target.host}:{target.port} database {target.database}"
                f" as {target.username}: {_sqlstate(exc)}"
            ) from None

    async def ensure_login_role(self, target: AdminTarget, role: str, password: str) -> None:
        verifier = scram_verifier(password)
        conn = await self._connect(target)
        try:
            async with conn.transaction():
                await self._prepare(conn, target)
                exists = await self._role_exists(conn, role)
                ident = sql.Identifier(role)
                if exists:
                    await conn.execute(
                        sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(ident, sql.Literal(verifier))
                    )
                else:
                    await conn.execute(
                        sql.SQL("CREATE ROLE {} WITH LOGIN PASSWORD {}").format(ident, sql.Literal(verifier))
                    )
                group = sql.Identifier(GROUP_ROLE)
                await conn.execute(sql.SQL("GRANT {} TO {}").format(group, ident))
                await conn.execute(sql.SQL("ALTER ROLE {} SET role = {}").format(ident, sql.Literal(GROUP_ROLE)))
            log.info("binding role %s ready on %s:%s/%s", role, target.host, target.port, target.database)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"creating role {role} failed: {_sqlstate(exc)}") from None
        finally:
            await conn.close()

    async def drop_login_role(self, target: AdminTarget, role: str) -> bool:
        """Terminate the role's sessions and drop it; False when it did not exist."""
        conn = await self._connect(target)
        try:
            async with conn.transaction():
                await self._prepare(conn, target)
                if not await self._role_exists(conn, role):
                    return False
                ident = sql.Identifier(role)
                await conn.execute(sql.SQL("ALTER ROLE {} WITH NOLOGIN").format(ident))
            # Outside the transaction: terminated sessions must see NOLOGIN before they could reconnect.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE usename = %s AND pid <> pg_backend_pid()",
                (role,),
            )
            async with conn.transaction():
                await self._prepare(conn, target)
                await conn.execute(
                    sql.SQL("REASSIGN OWNED BY {} TO {}").format(ident, sql.Identifier(GROUP_ROLE))
                )
                await conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
                await conn.execute(sql.SQL("DROP ROLE {}").format(ident))
            log.info("dropped binding role %s on %s:%s", role, target.host, target.port)
            return True
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"dropping role {role} failed: {_sqlstate(exc)}") from None
        finally:
            await conn.close()

    @staticmethod
    async def _role_exists(conn: psycopg.AsyncConnection[tuple[object, ...]], role: str) -> bool:
        cursor = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        return await cursor.fetchone() is not None

    @staticmethod
    async def _prepare(conn: psycopg.AsyncConnection[tuple[object, ...]], target: AdminTarget) -> None:
        """Serialize binding DDL and make sure the group role holds the app database privileges."""
        await conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(STATEMENT_TIMEOUT)))
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK,))
        group = sql.Identifier(GROUP_ROLE)
        if not await PsycopgRoleManager._role_exists(conn, GROUP_ROLE):
            await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(group))
        await conn.execute(
            sql.SQL("GRANT CONNECT, CREATE, TEMPORARY ON DATABASE {} TO {}").format(
                sql.Identifier(target.database), group
            )
        )
        await conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(group))


def _sqlstate(exc: psycopg.Error) -> str:
    # The server's message may echo a statement; keep to the class name and SQLSTATE,
    # plus the primary message, which PostgreSQL never fills with parameter values.
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    state = getattr(exc, "sqlstate", None)
    parts = [type(exc).__name__]
    if state:
        parts.append(str(state))
    if primary:
        parts.append(str(primary))
    return " ".join(parts)
