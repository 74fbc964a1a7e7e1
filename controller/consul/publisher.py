"""Publish a cluster's primary and replicas in Consul's catalog with py-consul.

Each cluster is one catalog *external node* (named after the service, since the
operator runs off-node and no agent owns it; Consul docs "Register external
services") holding one stable service instance per role:

  <service>-master                      tag "master"   (exactly one, its address moves)
  <service>-replica-<address>-<port>    tag "replica"  (one per replica)

Moving the single master instance's address is one catalog write, so DNS
`master.<service>.service.consul` never names two nodes (see
shared/contracts/consul-api.md, "Publishing the primary").
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import consul
import consul.aio
from consul.callback import CB

from controller.consul.types import Member, Published

MASTER_TAG = "master"
REPLICA_TAG = "replica"
DEFAULT_TIMEOUT = 5.0

T = TypeVar("T")


class ConsulPublishError(RuntimeError):
    """A Consul call failed; the message names the call and never carries the token."""


def master_id(service: str) -> str:
    return f"{service}-master"


def replica_id(service: str, member: Member) -> str:
    safe = re.sub(r"[^A-Za-z0-9]+", "-", member.address).strip("-")
    return f"{service}-replica-{safe}-{member.port}"


def parse_http_addr(http_addr: str) -> tuple[str, str, int]:
    """(scheme, host, port) of "http://127.0.0.1:8500" or "127.0.0.1:8500"."""
    parsed = urllib.parse.urlsplit(http_addr if "//" in http_addr else f"//{http_addr}")
    scheme = parsed.scheme or "http"
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or (443 if scheme == "https" else 8500)
    return scheme, host, port


def registration(service: str, service_id: str, tag: str, member: Member, role: str) -> dict[str, Any]:
    """The body of PUT /v1/catalog/register for one role instance on the cluster's external node."""
    return {
        "Node": service,
        "Address": member.address,
        "NodeMeta": {"external-node": "true", "external-probe": "false", "pgbosh-service": service},
        "SkipNodeUpdate": True,
        "Service": {
            "ID": service_id,
            "Service": service,
            "Tags": [tag],
            "Address": member.address,
            "Port": member.port,
            "Meta": {"role": role, "managed-by": "pgbosh"},
        },
        "Check": {
            "CheckID": f"service:{service_id}",
            "Name": f"pgbosh {role}",
            "Status": "passing",
            "ServiceID": service_id,
            "Notes": "published by pgbosh; the operator withdraws it when the role moves",
        },
    }


def _redact(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "<redacted>")
        text = text.replace(urllib.parse.quote(token, safe=""), "<redacted>")
    return text


def _describe(exc: BaseException, token: str | None) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    detail = _redact(str(exc), token).strip()
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


class ConsulPublisher:
    """`PrimaryPublisher` on py-consul's asyncio client.

    ``ConsulPublisher("http://127.0.0.1:8500", token=None, timeout=5.0)``; call
    ``await publisher.close()`` (or use ``async with``) to release the HTTP session.
    """

    def __init__(
        self, http_addr: str = "http://127.0.0.1:8500", token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.scheme, self.host, self.port = parse_http_addr(http_addr)
        self._token = token or None
        self.timeout = timeout
        self._client: Any = None

    def __repr__(self) -> str:
        return f"ConsulPublisher({self.scheme}://{self.host}:{self.port}, token={'set' if self._token else 'none'})"

    def _consul(self) -> Any:
        # created lazily: aiohttp wants its session made inside the running loop
        if self._client is None:
            self._client = consul.aio.Consul(
                host=self.host,
                port=self.port,
                scheme=self.scheme,
                token=self._token,
                connections_timeout=self.timeout,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> ConsulPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self._token} if self._token else {}

    async def _call(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await make()
        except Exception as exc:
            # `from None`: the cause's traceback could hold the request with its token
            raise ConsulPublishError(
                f"consul {self.scheme}://{self.host}:{self.port}: {what} failed: {_describe(exc, self._token)}"
            ) from None

    async def _register(self, body: dict[str, Any]) -> None:
        # the raw endpoint, not Catalog.register(): that one sends the token in the URL
        # and NodeMeta as a query filter that Consul ignores on writes
        client = self._consul()
        ok = await self._call(
            f"register {body['Service']['ID']}",
            lambda: client.http.put(CB.json(), "/v1/catalog/register", headers=self._headers(), data=json.dumps(body)),
        )
        if ok is not True:
            raise ConsulPublishError(f"consul: register {body['Service']['ID']} was refused ({ok!r})")

    async def _deregister(self, node: str, service_id: str | None = None) -> None:
        client = self._consul()
        body: dict[str, Any] = {"Node": node}
        if service_id:
            body["ServiceID"] = service_id
        await self._call(
            f"deregister {service_id or node}",
            lambda: client.http.put(
                CB.json(), "/v1/catalog/deregister", headers=self._headers(), data=json.dumps(body)
            ),
        )

    async def _entries(self, service: str) -> list[dict[str, Any]]:
        client = self._consul()
        _index, entries = await self._call(
            f"read {service}", lambda: client.catalog.service(service, token=self._token)
        )
        return list(entries or [])

    async def publish(self, service: str, primary: Member | None, replicas: list[Member]) -> None:
        entries = [e for e in await self._entries(service) if e.get("Node") == service]
        present = {str(e["ServiceID"]): e for e in entries}
        wanted_replicas = {replica_id(service, m): m for m in replicas if m != primary}
        # 1. drop replica records that are no longer wanted (the new primary's among them)
        for sid in present:
            if sid != master_id(service) and sid not in wanted_replicas:
                await self._deregister(service, sid)
        # 2. move the one master record: a single write, never two masters
        if primary is None:
            if master_id(service) in present:
                await self._deregister(service, master_id(service))
        else:
            await self._register(registration(service, master_id(service), MASTER_TAG, primary, "primary"))
        # 3. add or refresh replicas
        for sid, member in wanted_replicas.items():
            entry = present.get(sid)
            if (
                entry is None
                or entry.get("ServiceAddress") != member.address
                or entry.get("ServicePort") != member.port
            ):
                await self._register(registration(service, sid, REPLICA_TAG, member, "replica"))

    async def published(self, service: str) -> Published:
        primary: list[Member] = []
        replicas: list[Member] = []
        for entry in await self._entries(service):
            member = Member(
                str(entry.get("ServiceAddress") or entry.get("Address")), int(entry.get("ServicePort") or 0)
            )
            tags = entry.get("ServiceTags") or []
            if MASTER_TAG in tags:
                primary.append(member)
            elif REPLICA_TAG in tags:
                replicas.append(member)
        return Published(primary=tuple(primary), replicas=tuple(sorted(replicas, key=lambda m: (m.address, m.port))))

    async def withdraw(self, service: str) -> None:
        await self._deregister(service)


def publish_primary_sync(
    http_addr: str,
    service: str,
    address: str,
    port: int = 5432,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Point `master.<service>` at address:port now (the node agent's promote hook).

    One catalog write moves the master record; the replica record of the promoted
    node, if any, is removed afterwards. The operator reconciles the rest.
    """
    scheme, host, http_port = parse_http_addr(http_addr)
    client = consul.Consul(host=host, port=http_port, scheme=scheme, token=token, connections_timeout=timeout)
    headers = {"X-Consul-Token": token} if token else {}
    member = Member(address, port)
    body = registration(service, master_id(service), MASTER_TAG, member, "primary")
    try:
        ok = client.http.put(CB.json(), "/v1/catalog/register", headers=headers, data=json.dumps(body))
        if ok is not True:
            raise ConsulPublishError(f"consul: register {master_id(service)} was refused ({ok!r})")
        client.http.put(
            CB.json(),
            "/v1/catalog/deregister",
            headers=headers,
            data=json.dumps({"Node": service, "ServiceID": replica_id(service, member)}),
        )
    except ConsulPublishError:
        raise
    except Exception as exc:
        raise ConsulPublishError(
            f"consul {scheme}://{host}:{http_port}: publish primary of {service} failed: {_describe(exc, token)}"
        ) from None
