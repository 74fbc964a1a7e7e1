"""The catalog, health checks, KV store and sessions of the local Consul agent.

Everything is in memory and driven by one asyncio loop; `Store.tick()` runs the
timers (TTL checks, DeregisterCriticalServiceAfter, session TTLs). Deliberate
differences from a real agent, for fast tests: DeregisterCriticalServiceAfter has
no 1-minute floor and is reaped within a tick (not every 30 s), and the session TTL
floor is configurable (Consul's is 10 s; the default here is the same). Field names
and defaults follow Consul's own structs so the HTTP layer can return them as
they are.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
CHECK_STATUSES = (PASSING, WARNING, CRITICAL)

SERF_CHECK_ID = "serfHealth"
KV_VALUE_LIMIT = 512 * 1024  # Consul's default kv_max_value_size

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")


class ConsulError(Exception):
    """An error Consul reports with this HTTP status and plain-text body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_duration(value: Any) -> float:
    """Seconds in a Go duration ("15s", "1m30s", "100ms") or a number of nanoseconds."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        raise ConsulError(400, f"Request decode failed: invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    if not isinstance(value, str):
        raise ConsulError(400, f"Request decode failed: invalid duration {value!r}")
    text = value.strip()
    if text in ("0", ""):
        return 0.0
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConsulError(400, f'Request decode failed: time: invalid duration "{value}"')
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """A Go-style duration string ("15s", "1m0s") for the TTL fields Consul echoes."""
    if seconds == int(seconds):
        whole = int(seconds)
        hours, rest = divmod(whole, 3600)
        minutes, secs = divmod(rest, 60)
        if hours:
            return f"{hours}h{minutes}m{secs}s"
        if minutes:
            return f"{minutes}m{secs}s"
        return f"{secs}s"
    return f"{seconds:g}s"


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def field_of(body: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """Consul decodes JSON keys case-insensitively and accepts snake_case aliases."""
    if name in body:
        return body[name]
    wanted = _norm(name)
    for key, value in body.items():
        if _norm(key) == wanted:
            return value
    return default


def _str_list(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConsulError(400, "Request decode failed: expected a list of strings")
    return list(value)


def str_map(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConsulError(400, "Request decode failed: expected an object")
    return {str(k): str(v) for k, v in value.items()}


@dataclass
class Node:
    name: str
    address: str
    id: str = ""
    datacenter: str = "dc1"
    tagged_addresses: dict[str, str] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Node": self.name,
            "Address": self.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": self.tagged_addresses or {"lan": self.address, "wan": self.address},
            "Meta": self.meta,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Service:
    node: str
    id: str
    name: str
    tags: list[str] = field(default_factory=list)
    address: str = ""
    port: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    create_index: int = 0
    modify_index: int = 0

    def to_json(self, datacenter: str) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Address": self.address,
            "Meta": self.meta,
            "Port": self.port,
            "Weights": self.weights,
            "EnableTagOverride": self.enable_tag_override,
            "Datacenter": datacenter,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Check:
    node: str
    id: str
    name: str
    status: str = CRITICAL
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    type: str = ""
    ttl: float = 0.0
    deregister_after: float = 0.0
    create_index: int = 0
    modify_index: int = 0
    # runtime only (monotonic clock), not persisted
    expires_at: float | None = None
    critical_since: float | None = None

    def to_json(self) -> dict[str, Any]:
        definition: dict[str, Any] = {}
        if self.ttl:
            definition["TTL"] = format_duration(self.ttl)
        if self.deregister_after:
            definition["DeregisterCriticalServiceAfter"] = format_duration(self.deregister_after)
        return {
            "Node": self.node,
            "CheckID": self.id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.type,
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": definition,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class KVEntry:
    key: str
    value: bytes | None
    flags: int = 0
    session: str = ""
    lock_index: int = 0
    create_index: int = 0
    modify_index: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": None if self.value is None else base64.b64encode(self.value).decode("ascii"),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.session:
            out["Session"] = self.session
        return out


@dataclass
class Session:
    id: str
    name: str
    node: str
    lock_delay: float
    behavior: str
    ttl: float
    node_checks: list[str]
    create_index: int = 0
    modify_index: int = 0
    expires_at: float | None = None  # runtime only

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": int(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": format_duration(self.ttl) if self.ttl else "",
            "Checks": list(self.node_checks),  # deprecated in Consul 1.7, still sent
            "NodeChecks": list(self.node_checks),
            "ServiceChecks": None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


class Store:
    """One datacenter's state, with Consul's raft-like index and blocking waits."""

    def __init__(
        self,
        node_name: str = "pgbosh-local",
        node_address: str = "127.0.0.1",
        datacenter: str = "dc1",
        session_ttl_min: float = 10.0,
        session_ttl_multiplier: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.datacenter = datacenter
        self.node_name = node_name
        self.session_ttl_min = session_ttl_min
        self.session_ttl_multiplier = session_ttl_multiplier
        self.clock = clock
        self.index = 1
        self.nodes: dict[str, Node] = {}
        self.services: dict[tuple[str, str], Service] = {}
        self.checks: dict[tuple[str, str], Check] = {}
        self.kv: dict[str, KVEntry] = {}
        self.sessions: dict[str, Session] = {}
        # indexes that survive deletions, so blocking queries wake on removals too
        self.service_index: dict[str, int] = {}
        self.kv_index: dict[str, int] = {}
        self.nodes_index = 1
        self.sessions_index = 1
        self.lock_delays: dict[str, float] = {}
        self.dirty = False
        self._changed = asyncio.Event()
        self.nodes[node_name] = Node(
            name=node_name,
            address=node_address,
            id=str(uuid.uuid5(uuid.NAMESPACE_DNS, node_name)),
            datacenter=datacenter,
            create_index=1,
            modify_index=1,
        )
        self.checks[(node_name, SERF_CHECK_ID)] = Check(
            node=node_name,
            id=SERF_CHECK_ID,
            name="Serf Health Status",
            status=PASSING,
            output="Agent alive and reachable",
            type="",
            create_index=1,
            modify_index=1,
        )

    # ----- index and change notification -----

    def _bump(self) -> int:
        self.index += 1
        self.dirty = True
        self._changed.set()
        self._changed = asyncio.Event()
        return self.index

    def _touch_service(self, name: str, index: int) -> None:
        self.service_index[name] = index

    def _touch_node_services(self, node: str, index: int) -> None:
        for svc in self.services.values():
            if svc.node == node:
                self._touch_service(svc.name, index)

    async def wait(self, min_index: int, max_wait: float, current: Callable[[], int]) -> None:
        """Block until current() > min_index or max_wait passes (Consul's blocking query)."""
        if min_index <= 0:
            return
        deadline = self.clock() + max_wait
        while current() <= min_index:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return

    # ----- nodes, services, checks -----

    def ensure_node(
        self,
        name: str,
        address: str,
        tagged: Mapping[str, str] | None = None,
        meta: Mapping[str, str] | None = None,
        node_id: str = "",
        skip_update: bool = False,
    ) -> None:
        node = self.nodes.get(name)
        if node is not None and skip_update:
            return
        if node is None:
            idx = self._bump()
            self.nodes[name] = Node(
                name=name,
                address=address,
                id=node_id,
                datacenter=self.datacenter,
                tagged_addresses=dict(tagged or {}),
                meta=dict(meta or {}),
                create_index=idx,
                modify_index=idx,
            )
            self.nodes_index = idx
            return
        new = (address, dict(tagged or {}), dict(meta or {}), node_id or node.id)
        if (node.address, node.tagged_addresses, node.meta, node.id) != new:
            idx = self._bump()
            node.address, node.tagged_addresses, node.meta, node.id = new
            node.modify_index = idx
            self.nodes_index = idx
            self._touch_node_services(name, idx)

    def remove_node(self, name: str) -> None:
        if name not in self.nodes:
            return
        idx = self._bump()
        self._touch_node_services(name, idx)
        del self.nodes[name]
        self.services = {k: v for k, v in self.services.items() if k[0] != name}
        self.checks = {k: v for k, v in self.checks.items() if k[0] != name}
        self.nodes_index = idx
        self._invalidate_sessions(lambda s: s.node == name)

    def upsert_service(self, svc: Service) -> None:
        old = self.services.get((svc.node, svc.id))
        if old is not None and _same_service(old, svc):
            return
        idx = self._bump()
        svc.create_index = old.create_index if old else idx
        svc.modify_index = idx
        self.services[(svc.node, svc.id)] = svc
        self._touch_service(svc.name, idx)
        if old is not None:
            self._touch_service(old.name, idx)
        for chk in self.checks.values():
            if chk.node == svc.node and chk.service_id == svc.id:
                chk.service_name, chk.service_tags = svc.name, list(svc.tags)

    def remove_service(self, node: str, service_id: str) -> bool:
        svc = self.services.pop((node, service_id), None)
        if svc is None:
            return False
        idx = self._bump()
        self._touch_service(svc.name, idx)
        for key in [k for k, c in self.checks.items() if c.node == node and c.service_id == service_id]:
            del self.checks[key]
        return True

    def upsert_check(self, chk: Check, keep_status: bool = False) -> None:
        old = self.checks.get((chk.node, chk.id))
        if old is not None and keep_status:
            chk.status, chk.output = old.status, old.output
            chk.expires_at, chk.critical_since = old.expires_at, old.critical_since
        svc = self.services.get((chk.node, chk.service_id)) if chk.service_id else None
        if chk.service_id and svc is None:
            raise ConsulError(500, f'Missing service "{chk.service_id}" for check "{chk.id}"')
        if svc is not None:
            chk.service_name, chk.service_tags = svc.name, list(svc.tags)
        now = self.clock()
        if chk.ttl and chk.expires_at is None and chk.status != CRITICAL:
            chk.expires_at = now + chk.ttl
        if chk.status == CRITICAL and chk.critical_since is None:
            chk.critical_since = now
        if old is not None and _same_check(old, chk):
            old.ttl, old.deregister_after, old.expires_at = chk.ttl, chk.deregister_after, chk.expires_at
            return
        idx = self._bump()
        chk.create_index = old.create_index if old else idx
        chk.modify_index = idx
        self.checks[(chk.node, chk.id)] = chk
        self._after_check_change(chk, idx)

    def remove_check(self, node: str, check_id: str) -> bool:
        chk = self.checks.pop((node, check_id), None)
        if chk is None:
            return False
        idx = self._bump()
        self._after_check_change(chk, idx)
        return True

    def set_check_status(self, node: str, check_id: str, status: str, output: str) -> None:
        chk = self.checks.get((node, check_id))
        if chk is None:
            raise ConsulError(
                404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        now = self.clock()
        if chk.ttl:
            chk.expires_at = now + chk.ttl
        if status == CRITICAL:
            if chk.critical_since is None:
                chk.critical_since = now
        else:
            chk.critical_since = None
        if chk.status == status and chk.output == output:
            return
        idx = self._bump()
        chk.status, chk.output, chk.modify_index = status, output, idx
        self._after_check_change(chk, idx)

    def _after_check_change(self, chk: Check, idx: int) -> None:
        if chk.service_id:
            svc = self.services.get((chk.node, chk.service_id))
            if svc is not None:
                self._touch_service(svc.name, idx)
            if chk.service_name:
                self._touch_service(chk.service_name, idx)
        else:
            self._touch_node_services(chk.node, idx)
        if chk.status == CRITICAL or (chk.node, chk.id) not in self.checks:
            self._invalidate_sessions(lambda s: s.node == chk.node and chk.id in s.node_checks)

    def service_checks(self, svc: Service) -> list[Check]:
        return [
            c for c in self.checks.values() if c.node == svc.node and (c.service_id == "" or c.service_id == svc.id)
        ]

    def instances(self, name: str, tags: Iterable[str] = ()) -> list[Service]:
        wanted = [t.lower() for t in tags]
        found = []
        for svc in self.services.values():
            if svc.name != name:
                continue
            have = {t.lower() for t in svc.tags}
            if all(t in have for t in wanted):
                found.append(svc)
        return sorted(found, key=lambda s: (s.node, s.id))

    def service_exists(self, name: str) -> bool:
        return any(s.name == name for s in self.services.values())

    # ----- KV -----

    def kv_put(
        self,
        key: str,
        value: bytes,
        flags: int = 0,
        cas: int | None = None,
        acquire: str = "",
        release: str = "",
    ) -> bool:
        if len(value) > KV_VALUE_LIMIT:
            raise ConsulError(413, f"Request body(KV value) too large, max size: {KV_VALUE_LIMIT} bytes.")
        entry = self.kv.get(key)
        if cas is not None:
            if cas == 0 and entry is not None:
                return False
            if cas != 0 and (entry is None or entry.modify_index != cas):
                return False
        lock_index = entry.lock_index if entry else 0
        session = entry.session if entry else ""
        if acquire:
            if acquire not in self.sessions:
                raise ConsulError(500, f'invalid session "{acquire}"')
            if entry is not None and entry.session and entry.session != acquire:
                return False
            if self.lock_delays.get(key, 0.0) > self.clock():
                return False
            if session != acquire:
                lock_index += 1
                session = acquire
        elif release:
            if entry is None or entry.session != release:
                return False
            session = ""
        idx = self._bump()
        self.kv[key] = KVEntry(
            key=key,
            value=value,
            flags=flags,
            session=session,
            lock_index=lock_index,
            create_index=entry.create_index if entry else idx,
            modify_index=idx,
        )
        self.kv_index[key] = idx
        return True

    def kv_delete(self, key: str, recurse: bool = False, cas: int | None = None) -> bool:
        if recurse:
            keys = [k for k in self.kv if k.startswith(key)]
        else:
            entry = self.kv.get(key)
            if cas is not None and (entry is None or cas == 0 or entry.modify_index != cas):
                return False
            keys = [key] if entry is not None else []
        if not keys:
            return True
        idx = self._bump()
        for k in keys:
            del self.kv[k]
            self.kv_index[k] = idx
        return True

    def kv_prefix_index(self, prefix: str) -> int:
        return max([i for k, i in self.kv_index.items() if k.startswith(prefix)], default=1)

    # ----- sessions -----

    def create_session(self, body: Mapping[str, Any]) -> Session:
        node = str(field_of(body, "Node") or self.node_name)
        if node not in self.nodes:
            raise ConsulError(500, f"Missing node registration: {node}")
        ttl = parse_duration(field_of(body, "TTL"))
        if ttl and not (self.session_ttl_min <= ttl <= 86400):
            raise ConsulError(
                400,
                f"Invalid Session TTL '{int(ttl * 1e9)}', must be between "
                f"[{format_duration(self.session_ttl_min)}=24h0m0s]",
            )
        raw_delay = field_of(body, "LockDelay")
        if raw_delay is None:
            lock_delay = 15.0
        elif isinstance(raw_delay, int | float) and not isinstance(raw_delay, bool) and raw_delay < 1000:
            lock_delay = float(raw_delay)  # Consul reads small numbers as seconds
        else:
            lock_delay = parse_duration(raw_delay)
        behavior = str(field_of(body, "Behavior") or "release")
        if behavior not in ("release", "delete"):
            raise ConsulError(400, f"Invalid Behavior setting '{behavior}'")
        checks = field_of(body, "NodeChecks")
        if checks is None:
            checks = field_of(body, "Checks")
        node_checks = [SERF_CHECK_ID] if checks is None else _str_list(checks)
        for check_id in node_checks:
            chk = self.checks.get((node, check_id))
            if chk is None:
                raise ConsulError(500, f"Missing check '{check_id}' registration")
            if chk.status == CRITICAL:
                raise ConsulError(500, f"Check '{check_id}' is in critical state")
        idx = self._bump()
        sess = Session(
            id=str(uuid.uuid4()),
            name=str(field_of(body, "Name") or ""),
            node=node,
            lock_delay=lock_delay,
            behavior=behavior,
            ttl=ttl,
            node_checks=node_checks,
            create_index=idx,
            modify_index=idx,
        )
        if ttl:
            sess.expires_at = self.clock() + ttl * self.session_ttl_multiplier
        self.sessions[sess.id] = sess
        self.sessions_index = idx
        return sess

    def renew_session(self, session_id: str) -> Session:
        sess = self.sessions.get(session_id)
        if sess is None:
            raise ConsulError(404, f"Session id '{session_id}' not found")
        if sess.ttl:
            sess.expires_at = self.clock() + sess.ttl * self.session_ttl_multiplier
        return sess

    def destroy_session(self, session_id: str) -> None:
        self._invalidate_sessions(lambda s: s.id == session_id)

    def _invalidate_sessions(self, match: Callable[[Session], bool]) -> None:
        doomed = [s for s in self.sessions.values() if match(s)]
        if not doomed:
            return
        idx = self._bump()
        self.sessions_index = idx
        now = self.clock()
        for sess in doomed:
            del self.sessions[sess.id]
            for key, entry in list(self.kv.items()):
                if entry.session != sess.id:
                    continue
                if sess.lock_delay:
                    self.lock_delays[key] = now + sess.lock_delay
                if sess.behavior == "delete":
                    del self.kv[key]
                else:
                    entry.session = ""
                    entry.modify_index = idx
                self.kv_index[key] = idx

    # ----- timers -----

    def tick(self) -> None:
        now = self.clock()
        for chk in list(self.checks.values()):
            if chk.ttl and chk.expires_at is not None and now >= chk.expires_at and chk.status != CRITICAL:
                chk.expires_at = None
                self.set_check_status(
                    chk.node,
                    chk.id,
                    CRITICAL,
                    f"TTL expired (last output before timeout follows): {chk.output}",
                )
                chk.expires_at = None
        for chk in list(self.checks.values()):
            if (
                chk.deregister_after
                and chk.service_id
                and chk.status == CRITICAL
                and chk.critical_since is not None
                and now - chk.critical_since >= chk.deregister_after
                and (chk.node, chk.id) in self.checks
            ):
                self.remove_service(chk.node, chk.service_id)
        self._invalidate_sessions(lambda s: s.expires_at is not None and now >= s.expires_at)
        self.lock_delays = {k: t for k, t in self.lock_delays.items() if t > now}

    # ----- persistence -----

    def snapshot(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "nodes": [vars(n) for n in self.nodes.values()],
            "services": [vars(s) for s in self.services.values()],
            "checks": [
                {k: v for k, v in vars(c).items() if k not in ("expires_at", "critical_since")}
                for c in self.checks.values()
            ],
            "kv": [
                {**vars(e), "value": None if e.value is None else base64.b64encode(e.value).decode("ascii")}
                for e in self.kv.values()
            ],
            "sessions": [{k: v for k, v in vars(s).items() if k != "expires_at"} for s in self.sessions.values()],
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        now = self.clock()
        self.index = max(int(data.get("index", 1)), self.index)
        local = self.nodes[self.node_name]
        self.nodes = {n["name"]: Node(**n) for n in data.get("nodes", [])}
        self.nodes[self.node_name] = local
        self.services = {(s["node"], s["id"]): Service(**s) for s in data.get("services", [])}
        serf = self.checks[(self.node_name, SERF_CHECK_ID)]
        self.checks = {}
        for raw in data.get("checks", []):
            chk = Check(**raw)
            # like Consul after a restart: TTL timers start over from now
            if chk.ttl and chk.status != CRITICAL:
                chk.expires_at = now + chk.ttl
            if chk.status == CRITICAL:
                chk.critical_since = now
            self.checks[(chk.node, chk.id)] = chk
        self.checks[(self.node_name, SERF_CHECK_ID)] = serf
        self.kv = {}
        for raw in data.get("kv", []):
            value = raw.get("value")
            self.kv[raw["key"]] = KVEntry(**{**raw, "value": None if value is None else base64.b64decode(value)})
        self.sessions = {}
        for raw in data.get("sessions", []):
            sess = Session(**raw)
            if sess.ttl:
                sess.expires_at = now + sess.ttl * self.session_ttl_multiplier
            self.sessions[sess.id] = sess
        for svc in self.services.values():
            self.service_index[svc.name] = self.index
        for key in self.kv:
            self.kv_index[key] = self.index
        self.nodes_index = self.sessions_index = self.index
        self.dirty = False

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.snapshot(), fh)
        os.replace(tmp, path)
        self.dirty = False

    def load(self, path: str) -> None:
        with open(path, encoding="utf-8") as fh:
            self.restore(json.load(fh))


def _same_service(a: Service, b: Service) -> bool:
    return (a.name, a.tags, a.address, a.port, a.meta, a.weights, a.enable_tag_override) == (
        b.name,
        b.tags,
        b.address,
        b.port,
        b.meta,
        b.weights,
        b.enable_tag_override,
    )


def _same_check(a: Check, b: Check) -> bool:
    return (a.name, a.status, a.notes, a.output, a.service_id, a.type) == (
        b.name,
        b.status,
        b.notes,
        b.output,
        b.service_id,
        b.type,
    )


def service_from_body(node: str, body: Mapping[str, Any], id_key: str = "ID", name_key: str = "Name") -> Service:
    name = field_of(body, name_key) or field_of(body, "Service")
    if not isinstance(name, str) or not name:
        raise ConsulError(400, "Missing service name")
    sid = field_of(body, id_key) or name
    port = field_of(body, "Port", 0) or 0
    if not isinstance(port, int) or isinstance(port, bool):
        raise ConsulError(400, "Request decode failed: Port must be a number")
    weights = field_of(body, "Weights")
    return Service(
        node=node,
        id=str(sid),
        name=name,
        tags=_str_list(field_of(body, "Tags")),
        address=str(field_of(body, "Address") or ""),
        port=port,
        meta=str_map(field_of(body, "Meta")),
        weights={
            "Passing": int(field_of(weights, "Passing", 1)),
            "Warning": int(field_of(weights, "Warning", 1)),
        }
        if isinstance(weights, dict)
        else {"Passing": 1, "Warning": 1},
        enable_tag_override=bool(field_of(body, "EnableTagOverride", False)),
    )


def check_from_body(
    node: str, body: Mapping[str, Any], default_id: str, default_name: str, service_id: str = ""
) -> Check:
    status = field_of(body, "Status") or CRITICAL
    if status not in CHECK_STATUSES:
        raise ConsulError(400, f"Invalid check status: {status!r}")
    ttl = parse_duration(field_of(body, "TTL"))
    for kind in ("HTTP", "TCP", "Args", "Script", "GRPC", "DockerContainerID", "H2PING", "UDP"):
        if field_of(body, kind):
            raise ConsulError(400, f"pgbosh's local Consul supports TTL checks only, not {kind}")
    return Check(
        node=node,
        id=str(field_of(body, "CheckID") or field_of(body, "ID") or default_id),
        name=str(field_of(body, "Name") or default_name),
        status=status,
        notes=str(field_of(body, "Notes") or ""),
        output=str(field_of(body, "Output") or ""),
        service_id=str(field_of(body, "ServiceID") or service_id),
        type="ttl" if ttl else "",
        ttl=ttl,
        deregister_after=parse_duration(field_of(body, "DeregisterCriticalServiceAfter")),
    )
