"""The engine of the local director: deployments, VMs, tasks, supervision and the resurrector.

All state changes happen on one event loop; `state.json` is rewritten after each of
them. HTTP lives in `api.py`; this module knows nothing about requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import json
import logging
import os
import pwd
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import errors
from . import manifest as mf
from .defaults import (
    DEFAULT_AGENT_TIMEOUT,
    DEFAULT_MAX_THREADS,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_RESURRECTION_DELAY,
    DEFAULT_RUN_AS,
)
from .state import ConfigRecord, DeploymentRecord, DirectorState, InstanceRecord, StateStore
from .tasks import ACTIVE_STATES, VERBOSE_1_TYPES, TaskOutput, TaskRecord
from .vms import (
    AgentClient,
    AgentError,
    agent_alive,
    default_agent_command,
    kill_vm,
    remove_tree,
    spawn_agent,
    write_private,
)

log = logging.getLogger("pgbosh.director")

RESURRECTION_BACKOFF_MAX = 60.0  # seconds between attempts for a VM that keeps failing to come back
AGENT_BOOT_TIMEOUT = 60.0  # a new agent must answer GET /status within this
AGENT_SHUTDOWN_TIMEOUT = 60.0  # POST /shutdown (drain) may take this long
# Unix socket paths are limited to 107 bytes; the longest one under a VM is
# <vm_root>/vms/vm-<uuid>/run/.s.PGSQL.<port>, so <vm_root> must stay short.
MAX_VM_ROOT_LEN = 107 - len("/vms/vm-00000000-0000-0000-0000-000000000000/run/.s.PGSQL.65535")
_ADDRESS_FIRST_HOST = 10
_ADDRESS_HOSTS = 240


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _spec_digest(jobs: list[dict[str, Any]], vm_type: str, az: str, disk_mb: int) -> str:
    """What a VM was created from: a different digest means the VM must be recreated."""
    return _digest({"jobs": jobs, "vm_type": vm_type, "az": az, "disk_mb": disk_mb})


_T = TypeVar("_T")


def slot_prefix(slot: int) -> str:
    return f"127.{1 + slot // 256}.{slot % 256}"


def listening_addresses() -> set[str]:
    """Local IPv4 addresses with a listening TCP socket (so two worlds never share addresses)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":
                hexip = parts[1].split(":")[0]
                octets = [str(int(hexip[i:i + 2], 16)) for i in (6, 4, 2, 0)]
                found.add(".".join(octets))
    return found


def _traversable(path: Path, user: pwd.struct_passwd) -> bool:
    groups = {user.pw_gid} | {g.gr_gid for g in __import__("grp").getgrall() if user.pw_name in g.gr_mem}
    for part in [path, *path.parents]:
        try:
            st = part.stat()
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            return False
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return False
    return True


def choose_vm_root(state_dir: Path, run_as: str) -> Path:
    """`<state>/vms-and-disks` when the database user can reach it, else /var/lib/pgbosh/<name>."""
    candidate = state_dir.resolve() / "vms-and-disks"
    tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    fallback = Path("/var/lib/pgbosh") / f"{state_dir.resolve().name[:16]}-{tag}"
    if len(str(candidate)) > MAX_VM_ROOT_LEN:
        return fallback
    if os.geteuid() != 0:
        return candidate
    try:
        user = pwd.getpwnam(run_as)
    except KeyError:
        return candidate
    return candidate if _traversable(candidate.parent, user) else fallback


@dataclass
class VmRuntime:
    """What the supervision loop knows about one VM (not persisted)."""

    popen: Any = None
    status: dict[str, Any] | None = None
    last_ok: float = 0.0
    down_since: float | None = None
    busy: int = 0  # >0 while a task creates, deletes or changes this VM
    failed_fixes: int = 0  # resurrections in a row that did not bring the VM back
    not_before: float = 0.0  # no new resurrection before this (backoff after failures)


@dataclass
class Plan:
    delete: list[InstanceRecord] = field(default_factory=list)
    create: list[InstanceRecord] = field(default_factory=list)
    recreate: list[InstanceRecord] = field(default_factory=list)
    start: list[InstanceRecord] = field(default_factory=list)


GroupPlan = tuple[mf.InstanceGroup, Plan, list[dict[str, Any]]]  # a group, its plan, its resolved jobs


def _serial_batches(plans: list[GroupPlan]) -> list[list[GroupPlan]]:
    """Runs of consecutive groups with the same `update.serial` (multi_instance_group_updater.rb)."""
    batches: list[list[GroupPlan]] = []
    for item in plans:
        if batches and batches[-1][0][0].update.serial == item[0].update.serial:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


class TaskFailed(Exception):
    pass


class Engine:
    def __init__(self, state_dir: Path, *, resurrection_delay: float = DEFAULT_RESURRECTION_DELAY,
                 agent_timeout: float = DEFAULT_AGENT_TIMEOUT, vm_root: Path | None = None,
                 run_as: str | None = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 agent_command: list[str] | None = None, max_threads: int = DEFAULT_MAX_THREADS) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be 1 or more, not {max_threads}")
        self.state_dir = state_dir
        self.max_threads = max_threads
        self.store = StateStore(state_dir)
        self.state: DirectorState = DirectorState()
        self.variables: dict[str, dict[str, str]] = {}
        self.resurrection_delay = resurrection_delay
        self.agent_timeout = agent_timeout
        self.poll_interval = poll_interval
        self.agent_command = agent_command or default_agent_command()
        if os.geteuid() == 0:
            self.run_as = run_as or DEFAULT_RUN_AS
        else:
            self.run_as = pwd.getpwuid(os.geteuid()).pw_name
        self._vm_root_arg = vm_root
        self.vm_root = Path()
        self.runtime: dict[str, VmRuntime] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.lock_holders: dict[str, int] = {}
        self.running: dict[int, asyncio.Task[None]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = self.store.load()
        self.variables = self.store.load_variables()
        if self.state.vm_root:
            self.vm_root = Path(self.state.vm_root)
        else:
            self.vm_root = (self._vm_root_arg or choose_vm_root(self.state_dir, self.run_as)).resolve()
            self.state.vm_root = str(self.vm_root)
        if len(str(self.vm_root)) > MAX_VM_ROOT_LEN:
            raise ValueError(f"vm root {self.vm_root} is longer than {MAX_VM_ROOT_LEN} characters: the unix "
                             "sockets of its VMs would not fit in 107 bytes; choose a shorter --vm-root")
        if self._vm_root_arg and self._vm_root_arg.resolve() != self.vm_root:
            log.warning("keeping vm root %s from the state dir (asked for %s)", self.vm_root, self._vm_root_arg)
        for sub in (self.vm_root, self.vm_root / "vms", self.vm_root / "disks"):
            sub.mkdir(parents=True, exist_ok=True)
            os.chmod(sub, 0o755)
        if not self.state.configs:
            self._add_config("cloud", "default", mf.DEFAULT_CLOUD_CONFIG)
        for dep in self.state.deployments.values():
            for inst in dep.instances:
                self._finish_disk_move(inst)
        for raw in self.state.tasks:
            if raw["state"] in ACTIVE_STATES:
                raw["state"] = "error"
                raw["result"] = "Task was interrupted: the director stopped while it ran"
        self.save()

    def _finish_disk_move(self, inst: InstanceRecord) -> None:
        """A director that died while moving a disk: the instance's data is wherever it is now."""
        if not inst.pending_disk_cid:
            return
        new = self.vm_root / "disks" / inst.pending_disk_cid
        if new.exists() and not self._disk_dir(inst).exists():
            log.info("%s: its data moved to disk %s before the director stopped", inst.label(), inst.pending_disk_cid)
            inst.disk_cid = inst.pending_disk_cid
        inst.pending_disk_cid = None

    async def start(self) -> None:
        """Adopt live agents; restart VMs whose agent is gone; start supervising.

        A VM that is gone (its agent died, or `stop(stop_vms=True)` stopped it) is recreated
        unless resurrection is paused, for the instance or globally (`PUT /resurrection`);
        a paused one stays down, is reported so, and comes back when the pause is lifted.
        """
        dead: dict[str, list[InstanceRecord]] = {}
        for dep in self.state.deployments.values():
            for inst in dep.instances:
                rt = self.runtime.setdefault(inst.id, VmRuntime())
                if self._vm_alive(inst):
                    rt.last_ok = time.monotonic()
                    log.info("adopted %s (pid %s)", inst.label(), inst.pid)
                    continue
                if not inst.vm_cid and inst.state == "detached":
                    continue
                if inst.resurrection_paused or self.state.resurrection_paused:
                    rt.down_since = time.monotonic()
                    log.info("%s: VM is gone and resurrection is paused; it stays down", inst.label())
                else:
                    dead.setdefault(dep.name, []).append(inst)
        for dep_name, insts in dead.items():
            self._submit_scan_and_fix(dep_name, [i.id for i in insts])
        self._supervisor = asyncio.create_task(self._supervise())

    async def stop(self, *, stop_vms: bool = False) -> None:
        self._stopping = True
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for task in list(self.running.values()):
            task.cancel()
        for task in list(self.running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if stop_vms:
            await asyncio.gather(*(self._delete_vm(inst) for dep in self.state.deployments.values()
                                   for inst in dep.instances if inst.vm_cid), return_exceptions=True)
        self.save()

    def save(self) -> None:
        self.store.save(self.state)

    # ---- configs ---------------------------------------------------------------------------
    def _add_config(self, type_: str, name: str, content: str) -> ConfigRecord:
        rec = ConfigRecord(str(self.state.next_config_id), type_, name, content, int(time.time()))
        self.state.next_config_id += 1
        self.state.configs.append(rec)
        return rec

    def latest_configs(self, type_: str | None, name: str | None) -> list[ConfigRecord]:
        latest: dict[tuple[str, str], ConfigRecord] = {}
        for rec in self.state.configs:
            if (type_ is None or rec.type == type_) and (name is None or rec.name == name):
                latest[(rec.type, rec.name)] = rec
        return sorted(latest.values(), key=lambda r: int(r.id), reverse=True)

    def all_configs(self, type_: str | None, name: str | None) -> list[ConfigRecord]:
        return [r for r in reversed(self.state.configs)
                if (type_ is None or r.type == type_) and (name is None or r.name == name)]

    def post_config(self, type_: str, name: str, content: str) -> ConfigRecord:
        try:
            doc = yaml.safe_load(content)
        except yaml.YAMLError as exc:
            raise errors.BadConfigRequest(f"Config must be valid YAML: {type(exc).__name__}") from None
        if not isinstance(doc, dict):
            raise errors.BadConfigRequest("YAML hash expected")
        if type_ == "cloud":
            mf.Cloud.parse(content)
        current = self.latest_configs(type_, name)
        if current and current[0].content == content:
            return current[0]
        rec = self._add_config(type_, name, content)
        self.save()
        return rec

    def cloud(self) -> tuple[mf.Cloud, str | None]:
        latest = self.latest_configs("cloud", None)
        if not latest:
            return mf.Cloud((), (), {}, ()), None
        merged = "\n".join(r.content for r in latest) if len(latest) > 1 else latest[0].content
        if len(latest) > 1:
            azs: list[str] = []
            vms: list[str] = []
            disks: dict[str, int] = {}
            nets: list[str] = []
            for rec in latest:
                c = mf.Cloud.parse(rec.content)
                azs += c.azs
                vms += c.vm_types
                disks.update(c.disk_types)
                nets += c.networks
            return mf.Cloud(tuple(azs), tuple(vms), disks, tuple(nets)), latest[0].id
        return mf.Cloud.parse(merged), latest[0].id

    # ---- tasks -----------------------------------------------------------------------------
    def task_record(self, task_id: int) -> TaskRecord:
        for raw in self.state.tasks:
            if raw["id"] == task_id:
                return TaskRecord.from_json(raw)
        raise errors.TaskNotFound(f"Task {task_id} not found")

    def _update_task(self, rec: TaskRecord) -> None:
        for i, raw in enumerate(self.state.tasks):
            if raw["id"] == rec.id:
                self.state.tasks[i] = rec.to_json()
                break
        self.save()

    def task_output(self, task_id: int) -> TaskOutput:
        return TaskOutput(self.state_dir / "tasks" / str(task_id))

    def list_tasks(self, *, deployment: str | None, states: list[str], context_id: str | None,
                   limit: int | None, verbose: str) -> list[dict[str, Any]]:
        found = []
        for raw in reversed(self.state.tasks):
            if states and raw["state"] not in states:
                continue
            if verbose == "1" and raw["type"] not in VERBOSE_1_TYPES:
                continue
            if context_id is not None and raw.get("context_id", "") != context_id:
                continue
            if deployment is not None and raw.get("deployment") != deployment:
                continue
            found.append(TaskRecord.from_json(raw).to_api())
            if limit is not None and len(found) >= limit:
                break
        return found

    def submit(self, type_: str, description: str, deployment: str | None, context_id: str,
               work: Callable[[TaskRecord, TaskOutput], Awaitable[str | None]], *, lock: bool = True) -> TaskRecord:
        rec = TaskRecord(id=self.state.next_task_id, type=type_, state="queued", description=description,
                         timestamp=int(time.time()), deployment=deployment, context_id=context_id)
        self.state.next_task_id += 1
        self.state.tasks.append(rec.to_json())
        self.save()
        out = self.task_output(rec.id)
        self.running[rec.id] = asyncio.create_task(self._run_task(rec, out, work, lock and deployment is not None))
        return rec

    async def _run_task(self, rec: TaskRecord, out: TaskOutput,
                        work: Callable[[TaskRecord, TaskOutput], Awaitable[str | None]], lock: bool) -> None:
        dep_lock = self.locks.setdefault(rec.deployment or "", asyncio.Lock()) if lock else None
        try:
            if dep_lock:
                try:
                    await dep_lock.acquire()
                except asyncio.CancelledError:
                    rec.state, rec.result = "cancelled", "Task was cancelled while queued"
                    if self._stopping:
                        raise
                    return
                assert rec.deployment is not None
                self.lock_holders[rec.deployment] = rec.id
            try:
                rec.state, rec.started_at = "processing", int(time.time())
                self._update_task(rec)
                out.debug(f"Starting task {rec.id}: {rec.description}")
                result = await work(rec, out)
                rec.state, rec.result = "done", result or ""
                out.debug(f"Task {rec.id} done")
            except errors.DirectorError as exc:
                out.error(exc.code, exc.message)
                out.debug(f"Task {rec.id} error: {exc.message}")
                rec.state, rec.result = "error", exc.message
            except TaskFailed as exc:
                out.error(100, str(exc))
                rec.state, rec.result = "error", str(exc)
            except asyncio.CancelledError:
                rec.state = "cancelled"
                rec.result = "Task was cancelled" + (": the director is stopping" if self._stopping else "")
                out.debug(f"Task {rec.id} cancelled")
                if self._stopping:
                    raise
            except Exception as exc:
                log.exception("task %s failed", rec.id)
                out.error(100, f"{type(exc).__name__}: {exc}")
                rec.state, rec.result = "error", f"{type(exc).__name__}: {exc}"
            finally:
                if dep_lock:
                    assert rec.deployment is not None
                    self.lock_holders.pop(rec.deployment, None)
                    dep_lock.release()
        finally:
            self._update_task(rec)
            self.running.pop(rec.id, None)

    def cancel_task(self, task_id: int) -> bool:
        """task_controller.rb: only a queued or processing task can be cancelled."""
        rec = self.task_record(task_id)
        runner = self.running.get(task_id)
        if rec.state not in ("queued", "processing") or runner is None:
            return False
        rec.state = "cancelling"
        self._update_task(rec)
        runner.cancel()
        return True

    def locks_view(self) -> list[dict[str, Any]]:
        timeout = f"{time.time() + 60:.6f}"
        return [{"type": "deployment", "resource": [name], "timeout": timeout, "task_id": str(task_id)}
                for name, task_id in sorted(self.lock_holders.items())]

    def active_task_for(self, deployment: str) -> bool:
        return any(raw.get("deployment") == deployment and raw["state"] in ACTIVE_STATES
                   and raw["type"] != "vms" for raw in self.state.tasks[-200:])

    # ---- lookups ---------------------------------------------------------------------------
    def deployment(self, name: str) -> DeploymentRecord:
        dep = self.state.deployments.get(name)
        if dep is None:
            raise errors.DeploymentNotFound(f"Deployment '{name}' doesn't exist")
        return dep

    def find_instance(self, dep: DeploymentRecord, group: str, index_or_id: str) -> InstanceRecord:
        for inst in dep.instances:
            if inst.group == group and (inst.id == index_or_id or str(inst.index) == index_or_id):
                return inst
        raise errors.InstanceNotFound(f"'{dep.name}/{group}/{index_or_id}' doesn't exist")

    def _vm_dir(self, inst: InstanceRecord) -> Path:
        return self.vm_root / "vms" / (inst.vm_cid or "none")

    def _disk_dir(self, inst: InstanceRecord) -> Path:
        return self.vm_root / "disks" / inst.disk_cid

    def _agent(self, inst: InstanceRecord) -> AgentClient:
        return AgentClient(self._vm_dir(inst) / "agent.sock")

    # ---- manifests -------------------------------------------------------------------------
    def _cloud_of(self, dep: DeploymentRecord) -> mf.Cloud:
        """The cloud config a deployment was deployed with (the Director keeps that one too)."""
        for rec in self.state.configs:
            if rec.id == dep.cloud_config_id:
                return mf.Cloud.parse(rec.content)
        return self.cloud()[0]

    def _resolve(self, name: str, text: str, stored: dict[str, str],
                 cloud: mf.Cloud | None = None) -> tuple[mf.Deployment, dict[str, Any], dict[str, str]]:
        doc = mf.load_yaml(text)
        parsed = mf.parse(doc, cloud or self.cloud()[0])
        if parsed.name != name:
            raise errors.ValidationInvalidValue(f"Deployment name '{parsed.name}' does not match '{name}'")
        values = mf.resolve_variables(parsed, doc, stored)
        resolved = mf.interpolate(doc, values)
        return parsed, resolved, values

    @staticmethod
    def _group_jobs(resolved: dict[str, Any], group: str) -> list[dict[str, Any]]:
        for raw in resolved.get("instance_groups") or ():
            if raw.get("name") == group:
                return [{"name": j["name"], "release": j.get("release"), "properties": j.get("properties") or {}}
                        for j in raw.get("jobs") or ()]
        return []

    def _agent_config(self, dep: DeploymentRecord, inst: InstanceRecord, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        peers = [{"index": p.index, "id": p.id, "az": p.az, "address": p.address, "bootstrap": p.bootstrap}
                 for p in dep.group(inst.group)]
        return {
            "deployment": dep.name, "instance_group": inst.group, "index": inst.index, "id": inst.id,
            "az": inst.az, "address": inst.address, "bootstrap": inst.bootstrap, "agent_id": inst.agent_id,
            "vm_dir": str(self._vm_dir(inst)), "persistent_disk": str(self._disk_dir(inst)),
            "run_as": self.run_as, "peers": peers,
            "jobs": [{"name": j["name"], "properties": j["properties"]} for j in jobs],
        }

    def _stored_jobs(self, dep: DeploymentRecord, group: str) -> list[dict[str, Any]]:
        _, resolved, _ = self._resolve(dep.name, dep.config_manifest, self.variables.get(dep.name, {}),
                                       self._cloud_of(dep))
        return self._group_jobs(resolved, group)

    def diff(self, name: str, text: str) -> dict[str, Any]:
        doc = mf.load_yaml(text)
        old = self.state.deployments.get(name)
        before = yaml.safe_dump(mf.load_yaml(old.manifest), sort_keys=False).splitlines() if old and old.manifest \
            else []
        after = yaml.safe_dump(doc, sort_keys=False).splitlines()
        lines: list[list[Any]] = []
        for line in difflib.ndiff(before, after):
            tag, body = line[:2], line[2:]
            if tag == "? ":
                continue
            redacted = body
            if tag != "  " and ":" in body and "((" not in body and any(
                    k in body.split(":", 1)[0].lower() for k in ("password", "secret", "token")):
                redacted = body.split(":", 1)[0] + ": \"<redacted>\""
            lines.append([redacted, {"+ ": "added", "- ": "removed"}.get(tag)])
        _, cloud_id = self.cloud()
        return {"context": {"cloud_config_ids": [int(cloud_id)] if cloud_id else [], "runtime_config_ids": []},
                "diff": lines}

    # ---- addresses -------------------------------------------------------------------------
    def _free_slot(self) -> int:
        used = {d.slot for d in self.state.deployments.values()}
        busy_prefixes = {a.rsplit(".", 1)[0] for a in listening_addresses()}
        slot = 0
        while slot in used or slot_prefix(slot) in busy_prefixes:
            slot += 1
        return slot

    @staticmethod
    def _free_address(dep: DeploymentRecord) -> str:
        taken = {i.address for i in dep.instances}
        for host in range(_ADDRESS_FIRST_HOST, _ADDRESS_FIRST_HOST + _ADDRESS_HOSTS):
            address = f"{slot_prefix(dep.slot)}.{host}"
            if address not in taken:
                return address
        raise errors.SystemError_(f"No free address left for deployment '{dep.name}'")

    # ---- VMs -------------------------------------------------------------------------------
    async def _create_vm(self, dep: DeploymentRecord, inst: InstanceRecord, jobs: list[dict[str, Any]],
                         out: TaskOutput) -> None:
        rt = self.runtime.setdefault(inst.id, VmRuntime())
        inst.vm_cid = f"vm-{uuid.uuid4()}"
        inst.agent_id = str(uuid.uuid4())
        vm_dir = self._vm_dir(inst)
        vm_dir.mkdir(parents=True)
        os.chmod(vm_dir, 0o755)
        disk = self._disk_dir(inst)
        disk.mkdir(parents=True, exist_ok=True)
        os.chmod(disk, 0o755)
        write_private(vm_dir / "agent.json", json.dumps(self._agent_config(dep, inst, jobs), indent=1))
        rt.popen = spawn_agent(self.agent_command, vm_dir)
        inst.pid = rt.popen.pid
        inst.vm_created_at = _now_iso()
        inst.spec_digest = _spec_digest(jobs, inst.vm_type, inst.az, inst.disk_mb)
        rt.status, rt.down_since, rt.last_ok = None, None, time.monotonic()
        self.save()
        out.debug(f"Created VM {inst.vm_cid} for {inst.label()} at {inst.address}, agent pid {inst.pid}")
        deadline = time.monotonic() + AGENT_BOOT_TIMEOUT
        while True:
            if rt.popen.poll() is not None:
                raise TaskFailed(f"Agent of VM '{inst.vm_cid}' ({inst.label()}) exited with code "
                                 f"{rt.popen.returncode}; see {vm_dir}/agent.log")
            try:
                rt.status = await self._agent(inst).status(limit=2.0)
                rt.last_ok = time.monotonic()
                out.debug(f"Agent of {inst.label()} answers")
                return
            except AgentError:
                pass
            if time.monotonic() > deadline:
                raise errors.RpcTimeout(f"Timed out pinging VM '{inst.vm_cid}' ({inst.label()}) after "
                                        f"{AGENT_BOOT_TIMEOUT:.0f} seconds")
            await asyncio.sleep(0.05)

    async def _delete_vm(self, inst: InstanceRecord, *, drain: bool = True) -> None:
        if not inst.vm_cid:
            return
        rt = self.runtime.setdefault(inst.id, VmRuntime())
        vm_dir = self._vm_dir(inst)
        config = vm_dir / "agent.json"
        alive = (rt.popen.poll() is None) if rt.popen is not None else agent_alive(inst.pid, config)
        log.info("deleting VM %s of %s (agent %s)", inst.vm_cid, inst.label(), "alive" if alive else "gone")
        if alive and drain:
            try:
                await self._agent(inst).shutdown(limit=AGENT_SHUTDOWN_TIMEOUT)
                log.info("agent of %s shut down its jobs", inst.label())
                deadline = time.monotonic() + 15
                while agent_alive(inst.pid, config) and time.monotonic() < deadline:
                    if rt.popen is not None:
                        rt.popen.poll()
                    await asyncio.sleep(0.05)
            except AgentError as exc:
                log.info("shutdown of %s failed (%s); killing it", inst.label(), exc)
        await kill_vm(inst.pid, vm_dir, self._disk_dir(inst))
        log.info("VM %s of %s: no process left", inst.vm_cid, inst.label())
        if rt.popen is not None:
            with contextlib.suppress(Exception):
                rt.popen.wait(limit=1)
        remove_tree(vm_dir)
        inst.vm_cid, inst.agent_id, inst.pid, inst.vm_created_at = None, None, None, None
        rt.popen, rt.status, rt.down_since = None, None, None
        self.save()

    async def _start_jobs(self, inst: InstanceRecord, watch: mf.WatchTime, out: TaskOutput) -> None:
        agent = self._agent(inst)
        await agent.start_jobs(limit=max(watch.max_ms / 1000, 10))
        await asyncio.sleep(min(watch.min_ms, 1000) / 1000 / 10)
        deadline = time.monotonic() + watch.max_ms / 1000
        last: dict[str, Any] = {}
        while True:
            try:
                last = await agent.status(limit=5)
                rt = self.runtime.setdefault(inst.id, VmRuntime())
                rt.status, rt.last_ok = last, time.monotonic()
                procs = last.get("processes") or []
                if last.get("job_state") == "running" and all(p.get("state") == "running" for p in procs):
                    out.debug(f"{inst.label()} is running")
                    return
            except AgentError as exc:
                last = {"job_state": f"unresponsive agent ({exc})"}
            if time.monotonic() > deadline:
                failing = [p.get("name", "?") for p in last.get("processes") or [] if p.get("state") != "running"]
                raise errors.AgentJobNotRunning(
                    f"'{inst.label()}' is not running after update. Review logs for failed jobs: "
                    f"{', '.join(failing) or 'postgres'}")
            await asyncio.sleep(0.2)

    async def _stop_jobs(self, inst: InstanceRecord) -> None:
        with contextlib.suppress(AgentError):
            await self._agent(inst).stop_jobs(limit=AGENT_SHUTDOWN_TIMEOUT)

    def _rewrite_agent_config(self, dep: DeploymentRecord, inst: InstanceRecord, jobs: list[dict[str, Any]]) -> None:
        if inst.vm_cid and self._vm_dir(inst).is_dir():
            write_private(self._vm_dir(inst) / "agent.json", json.dumps(self._agent_config(dep, inst, jobs), indent=1))

    # ---- deploy ----------------------------------------------------------------------------
    def start_deploy(self, text: str, name: str, context_id: str, *, recreate: bool = False,
                     dry_run: bool = False) -> TaskRecord:
        desc = "create deployment" + (" (dry run)" if dry_run else "")
        return self.submit("update_deployment", desc, name, context_id,
                           lambda t, out: self._deploy(out, name, text, recreate=recreate, dry_run=dry_run))

    async def _deploy(self, out: TaskOutput, name: str, text: str, *, recreate: bool, dry_run: bool) -> str:
        prep = out.stage("Preparing deployment", 1).track("Preparing deployment")
        prep.started()
        try:
            parsed, resolved, values = self._resolve(name, text, self.variables.get(name, {}))
        except errors.DirectorError as exc:
            prep.failed(exc.message)
            raise
        prep.finished()
        if dry_run:
            return f"/deployments/{name}"
        _, cloud_id = self.cloud()
        dep = self.state.deployments.get(name)
        if dep is None:
            dep = DeploymentRecord(name=name, manifest="", slot=self._free_slot(), cloud_config_id=cloud_id)
            self.state.deployments[name] = dep
        dep.applied_manifest, dep.cloud_config_id = text, cloud_id
        dep.releases = [{"name": n, "version": v} for n, v in parsed.releases]
        dep.stemcells = [{"name": n, "version": v} for n, v in parsed.stemcells]
        self.variables[name] = values
        self.store.save_variables(self.variables)
        self.save()

        group_names = {g.name for g in parsed.groups}
        obsolete = [i for i in dep.instances if i.group not in group_names]
        plans: list[GroupPlan] = []
        for group in parsed.groups:
            jobs = self._group_jobs(resolved, group.name)
            plans.append((group, self._plan(dep, group, jobs, recreate), jobs))
        to_delete = obsolete + [i for _, plan, _ in plans for i in plan.delete]
        if to_delete:
            stage = out.stage("Deleting unneeded instances", len(to_delete),
                              sorted({i.group for i in to_delete}))
            await self._each(stage, to_delete, self._delete_instance, dep)
        to_create = [i for _, plan, _ in plans for i in plan.create]
        jobs_of = {g.name: jobs for g, _, jobs in plans}
        if to_create:
            stage = out.stage("Creating missing vms", len(to_create))

            async def create(inst: InstanceRecord) -> None:
                rt = self.runtime.setdefault(inst.id, VmRuntime())
                rt.busy += 1
                try:
                    await self._create_vm(dep, inst, jobs_of[inst.group], out)
                finally:
                    rt.busy -= 1

            await self._pooled(stage, to_create, create)

        async def update_group(item: GroupPlan) -> None:
            group, plan, jobs = item
            for inst in dep.group(group.name):
                if inst not in plan.recreate and inst not in plan.create:
                    self._rewrite_agent_config(dep, inst, jobs)
            await self._update_group(dep, group, plan, jobs, out)

        # multi_instance_group_updater.rb (BatchMultiInstanceGroupUpdater): consecutive groups
        # with the same `update.serial` form a batch; a serial batch updates its groups one
        # after another, a `serial: false` batch all at once. `serial` says nothing about the
        # instances of a group: they always follow canaries and max_in_flight (docs-bosh
        # manifest-v2 `update.serial`), so "instances one at a time" is `max_in_flight: 1`.
        for batch in _serial_batches(plans):
            await self._pool(batch, 1 if batch[0][0].update.serial else len(batch), update_group)
        dep.manifest = text
        self.save()
        return f"/deployments/{name}"

    def _plan(self, dep: DeploymentRecord, group: mf.InstanceGroup, jobs: list[dict[str, Any]],
              recreate: bool) -> Plan:
        plan = Plan()
        current = dep.group(group.name)
        kept = [i for i in current if i.az in group.azs]
        plan.delete += [i for i in current if i.az not in group.azs]
        if len(kept) > group.instances:
            plan.delete += kept[group.instances:]
            kept = kept[: group.instances]
        for inst in plan.delete:
            dep.instances.remove(inst)
        used_indexes = {i.index for i in kept}
        while len(kept) < group.instances:
            index = min(set(range(len(kept) + len(used_indexes) + 1)) - used_indexes)
            used_indexes.add(index)
            inst = InstanceRecord(id=str(uuid.uuid4()), group=group.name, index=index,
                                  az=mf.pick_az(group.azs, [i.az for i in kept]), address="",
                                  disk_cid=f"disk-{uuid.uuid4()}", disk_mb=group.disk_mb, vm_type=group.vm_type)
            inst.address = self._free_address(dep)
            dep.instances.append(inst)
            kept.append(inst)
            plan.create.append(inst)
        kept.sort(key=lambda i: i.index)
        bootstrap = next((i for i in kept if i.bootstrap), kept[0] if kept else None)
        for inst in kept:
            inst.bootstrap = inst is bootstrap
        for inst in kept:
            if inst in plan.create:
                plan.start.append(inst)
                continue
            if inst.state == "detached":
                inst.vm_type = group.vm_type
                continue  # no VM until someone asks for 'started'; it then gets the new spec
            # The new vm_type and disk size are the instance's only once it is updated
            # (`update` in _update_group): until then the state names its VM and disk as they are.
            changed = _spec_digest(jobs, group.vm_type, inst.az, group.disk_mb) != inst.spec_digest
            if recreate or changed or (inst.state != "detached" and not self._vm_alive(inst)):
                plan.recreate.append(inst)
                plan.start.append(inst)
            elif inst.state == "started" and not self._running(inst):
                plan.start.append(inst)
        return plan

    def _migrate_disk(self, inst: InstanceRecord, size_mb: int) -> None:
        """Disk growth of one instance whose VM is gone: its data moves to a new disk of the new size.

        BOSH creates the new disk, copies the data across and orphans the old one, one
        instance at a time as each is updated; a rename is our copy. The state names the new
        disk only once the data is in it; `pending_disk_cid`, saved before the rename, lets
        `load` find the data if the director dies in between.
        """
        new_cid = f"disk-{uuid.uuid4()}"
        old, new = self._disk_dir(inst), self.vm_root / "disks" / new_cid
        inst.pending_disk_cid = new_cid
        self.save()
        if old.exists():
            os.replace(old, new)
        inst.disk_cid, inst.disk_mb, inst.pending_disk_cid = new_cid, size_mb, None
        self.save()

    def _vm_alive(self, inst: InstanceRecord) -> bool:
        """The instance has a VM whose agent process is alive (a dead one is recreated by a deploy)."""
        if not inst.vm_cid:
            return False
        rt = self.runtime.get(inst.id)
        if rt is not None and rt.popen is not None:
            return bool(rt.popen.poll() is None)
        return agent_alive(inst.pid, self._vm_dir(inst) / "agent.json")

    def _running(self, inst: InstanceRecord) -> bool:
        rt = self.runtime.get(inst.id)
        if not rt or not rt.status or rt.down_since is not None:
            return False
        procs = rt.status.get("processes") or []
        return rt.status.get("job_state") == "running" and all(p.get("state") == "running" for p in procs)

    async def _update_group(self, dep: DeploymentRecord, group: mf.InstanceGroup, plan: Plan,
                            jobs: list[dict[str, Any]], out: TaskOutput) -> None:
        """instance_group_updater.rb `update`: AZ by AZ, canaries first, at most max_in_flight at once.

        The instances to update are ordered like instance_plan_sorter.rb (bootstrap first,
        then the rest of its AZ, then the other AZs by name; within an AZ BOSH orders by
        uuid, we by index) and taken AZ by AZ in that order. Each AZ gets a pool of
        `max_in_flight` computed for the number of instances updated in that AZ (a
        percentage is of that number, rounded down, at least 1). Only the first AZ has
        canaries (`canaries` of its size, at most all of them); they run through the same
        pool, so max_in_flight limits them too, and the rest of the AZ starts when all
        canaries are done. A failure stops the group: no further instance starts, those in
        flight finish, and the task fails with the first error (Bosh::ThreadPool).
        """
        todo = list(plan.start)
        if not todo:
            return
        bootstrap = next((i for i in dep.group(group.name) if i.bootstrap), None)
        first_az = bootstrap.az if bootstrap else None  # its AZ comes first even when it is not updated
        todo.sort(key=lambda i: (i is not bootstrap, i.az != first_az, i.az, i.index))
        by_az: dict[str, list[InstanceRecord]] = {}
        for inst in todo:
            by_az.setdefault(inst.az, []).append(inst)
        stage = out.stage("Updating instance", len(todo), [group.name])

        async def update(inst: InstanceRecord, canary: bool) -> None:
            step = stage.track(inst.label() + (" (canary)" if canary else ""))
            watch = group.update.canary_watch_time if canary else group.update.update_watch_time
            await self._tracked(step, self._update_instance(dep, group, plan, inst, jobs, watch, out))

        canaries_done = False
        for insts in by_az.values():
            in_flight = group.update.max_in_flight_for(len(insts))
            if not canaries_done:
                count = group.update.canaries_for(len(insts))
                canaries, insts = insts[:count], insts[count:]
                await self._pool(canaries, in_flight, lambda i: update(i, True))
                canaries_done = True
            await self._pool(insts, in_flight, lambda i: update(i, False))

    async def _update_instance(self, dep: DeploymentRecord, group: mf.InstanceGroup, plan: Plan,
                               inst: InstanceRecord, jobs: list[dict[str, Any]], watch: mf.WatchTime,
                               out: TaskOutput) -> None:
        rt = self.runtime.setdefault(inst.id, VmRuntime())
        rt.busy += 1
        try:
            if inst in plan.recreate:
                await self._delete_vm(inst)
                inst.vm_type = group.vm_type
                if inst.disk_mb != group.disk_mb:
                    self._migrate_disk(inst, group.disk_mb)
                await self._create_vm(dep, inst, jobs, out)
            if inst.state == "started":
                await self._start_jobs(inst, watch, out)
            else:
                await self._stop_jobs(inst)  # a new VM of a stopped instance stays stopped
        finally:
            rt.busy -= 1

    @staticmethod
    async def _pool(items: list[_T], size: int, work: Callable[[_T], Awaitable[None]]) -> None:
        """Bosh::ThreadPool: `work` on each item, at most `size` at once, in order.

        After a failure no further item starts; the running ones finish, then the first
        error is raised (a cancelled pool cancels its running items).
        """
        pending = list(items)
        running: set[asyncio.Task[None]] = set()
        failure: BaseException | None = None
        try:
            while running or (pending and failure is None):
                while pending and failure is None and len(running) < max(1, size):
                    running.add(asyncio.ensure_future(work(pending.pop(0))))
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception() if not task.cancelled() else asyncio.CancelledError()
                    if error is not None and failure is None:
                        failure = error
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        if failure is not None:
            raise failure

    @staticmethod
    async def _tracked(step: Any, work: Awaitable[None]) -> None:
        step.started()
        try:
            await work
        except errors.DirectorError as exc:
            step.failed(exc.message)
            raise
        except Exception as exc:
            step.failed(str(exc))
            raise
        step.finished()

    async def _each(self, stage: Any, insts: list[InstanceRecord],
                    fn: Callable[[DeploymentRecord, InstanceRecord], Awaitable[None]], dep: DeploymentRecord) -> None:
        await self._pooled(stage, insts, lambda inst: fn(dep, inst))

    async def _pooled(self, stage: Any, insts: list[InstanceRecord],
                      fn: Callable[[InstanceRecord], Awaitable[None]]) -> None:
        """`fn` for each instance, tracked in `stage`, at most `max_threads` at a time, as the
        Director's thread pools create VMs and delete instances: after a failure nothing new
        starts, those running finish, and then the first failure is raised."""
        slots = asyncio.Semaphore(self.max_threads)
        failed: list[Exception] = []

        async def one(inst: InstanceRecord) -> None:
            async with slots:
                if failed:
                    return  # a pool takes no more work after an error
                try:
                    await self._tracked(stage.track(inst.label()), fn(inst))
                except Exception as exc:  # a cancelled task is not a failure to report
                    failed.append(exc)

        await asyncio.gather(*(one(inst) for inst in insts))
        if failed:
            raise failed[0]

    async def _delete_instance(self, dep: DeploymentRecord, inst: InstanceRecord, *, drain: bool = True) -> None:
        rt = self.runtime.setdefault(inst.id, VmRuntime())
        rt.busy += 1
        try:
            await self._delete_vm(inst, drain=drain)
            remove_tree(self._disk_dir(inst))
            if inst.pending_disk_cid:
                remove_tree(self.vm_root / "disks" / inst.pending_disk_cid)
        finally:
            rt.busy -= 1
            self.runtime.pop(inst.id, None)
        if inst in dep.instances:
            dep.instances.remove(inst)
        self.save()

    # ---- delete ----------------------------------------------------------------------------
    def start_delete(self, name: str, context_id: str, *, force: bool = False) -> TaskRecord:
        self.deployment(name)
        return self.submit("delete_deployment", f"delete deployment {name}", name, context_id,
                           lambda t, out: self._delete_deployment(out, name, force=force))

    async def _delete_deployment(self, out: TaskOutput, name: str, *, force: bool = False) -> str:
        dep = self.deployment(name)
        insts = list(dep.instances)
        if insts:
            stage = out.stage("Deleting instances", len(insts), sorted({i.group for i in insts}))

            async def delete(d: DeploymentRecord, inst: InstanceRecord) -> None:
                await self._delete_instance(d, inst, drain=not force)  # force: no drain, like --force

            await self._each(stage, insts, delete, dep)
        step = out.stage("Removing deployment artifacts", 3).track("Detaching stemcells")
        step.started()
        step.finished()
        self.variables.pop(name, None)
        self.store.save_variables(self.variables)
        destroy = out.stage("Destroying deployment", 1).track("Destroying deployment")
        destroy.started()
        self.state.deployments.pop(name, None)
        self.save()
        destroy.finished()
        return f"/deployments/{name}"

    # ---- job state changes -----------------------------------------------------------------
    def start_job_state(self, name: str, group: str, index_or_id: str, state: str, context_id: str) -> TaskRecord:
        dep = self.deployment(name)
        inst = self.find_instance(dep, group, index_or_id)
        if state not in ("started", "stopped", "detached", "restart", "recreate"):
            raise errors.InstanceTargetStateUndefined(f"Unknown state '{state}' for instance '{inst.label()}'")
        return self.submit("update_deployment", "create deployment", name, context_id,
                           lambda t, out: self._change_state(out, dep.name, inst.id, state))

    async def _change_state(self, out: TaskOutput, name: str, inst_id: str, state: str) -> str:
        dep = self.deployment(name)
        inst = next((i for i in dep.instances if i.id == inst_id), None)
        if inst is None:
            raise errors.InstanceNotFound(f"Instance '{inst_id}' of '{name}' doesn't exist")
        parsed = mf.parse(mf.load_yaml(dep.config_manifest), self._cloud_of(dep))
        group = next((g for g in parsed.groups if g.name == inst.group), None)
        watch = group.update.update_watch_time if group else mf.WatchTime(1000, 120000)
        jobs = self._stored_jobs(dep, inst.group)
        step = out.stage("Updating instance", 1, [inst.group]).track(inst.label())
        rt = self.runtime.setdefault(inst.id, VmRuntime())

        async def work() -> None:
            rt.busy += 1
            try:
                if state in ("stopped", "detached", "restart") and inst.vm_cid:
                    await self._stop_jobs(inst)
                if state == "detached":
                    await self._delete_vm(inst)
                    inst.state = "detached"
                    return
                if state == "stopped":
                    inst.state = "stopped"
                    return
                if state == "recreate" and inst.vm_cid:
                    await self._delete_vm(inst)
                if not inst.vm_cid:
                    await self._create_vm(dep, inst, jobs, out)
                inst.state = "started"
                await self._start_jobs(inst, watch, out)
            finally:
                rt.busy -= 1
                self.save()

        await self._tracked(step, work())
        return f"/deployments/{name}"

    def set_instance_resurrection(self, name: str, group: str, index_or_id: str, paused: bool) -> None:
        inst = self.find_instance(self.deployment(name), group, index_or_id)
        inst.resurrection_paused = paused
        self.save()

    def set_global_resurrection(self, paused: bool) -> None:
        self.state.resurrection_paused = paused
        self.save()

    # ---- instance views --------------------------------------------------------------------
    def instances_view(self, name: str, *, vms_only: bool) -> list[dict[str, Any]]:
        dep = self.deployment(name)
        rows = []
        for inst in sorted(dep.instances, key=lambda i: (i.group, i.index)):
            if vms_only and not inst.vm_cid:
                continue
            row: dict[str, Any] = {"agent_id": inst.agent_id, "cid": inst.vm_cid, "job": inst.group,
                                   "index": inst.index, "id": inst.id, "az": inst.az, "ips": [inst.address],
                                   "vm_created_at": inst.vm_created_at}
            if not vms_only:
                row["expects_vm"] = inst.state != "detached"
            rows.append(row)
        return rows

    def start_vm_state(self, name: str, *, vms_only: bool, context_id: str) -> TaskRecord:
        self.deployment(name)
        return self.submit("vms", "retrieve vm-stats", name, context_id,
                           lambda t, out: self._vm_state(out, name, vms_only), lock=False)

    async def _vm_state(self, out: TaskOutput, name: str, vms_only: bool) -> str:
        dep = self.deployment(name)
        insts = [i for i in sorted(dep.instances, key=lambda i: (i.group, i.index)) if i.vm_cid or not vms_only]
        rows = await asyncio.gather(*(self._vm_details(i) for i in insts))
        for row in rows:
            out.result(row)
        return ""

    async def _vm_details(self, inst: InstanceRecord) -> dict[str, Any]:
        """One line of the vms/instances format=full result (jobs/vm_state.rb `process_instance`)."""
        job_state: str | None = None
        processes: list[dict[str, Any]] = []
        vitals: dict[str, Any] | None = None
        if inst.vm_cid:
            rt = self.runtime.setdefault(inst.id, VmRuntime())
            alive = (rt.popen.poll() is None) if rt.popen is not None else agent_alive(
                inst.pid, self._vm_dir(inst) / "agent.json")
            status: dict[str, Any] | None = None
            if alive:
                try:
                    status = await self._agent(inst).status(limit=max(self.agent_timeout, 5.0))
                    rt.status, rt.last_ok = status, time.monotonic()
                except AgentError:
                    status = None
            if status is None:
                job_state = "unresponsive agent"
            else:
                job_state = str(status.get("job_state") or "running")
                processes = list(status.get("processes") or [])
                vitals = self._vitals(inst, status.get("vitals"))
        return {
            "vm_cid": inst.vm_cid, "vm_created_at": inst.vm_created_at, "cloud_properties": {},
            "disk_cid": inst.disk_cid, "disk_cids": [inst.disk_cid], "ips": [inst.address], "dns": [],
            "agent_id": inst.agent_id, "job_name": inst.group, "index": inst.index, "job_state": job_state,
            "state": inst.state, "resource_pool": inst.vm_type, "vm_type": inst.vm_type, "vitals": vitals,
            "processes": processes, "resurrection_paused": inst.resurrection_paused, "az": inst.az, "id": inst.id,
            "bootstrap": inst.bootstrap, "ignore": inst.ignore, "active": inst.vm_cid is not None,
        }

    def _vitals(self, inst: InstanceRecord, agent_vitals: Any) -> dict[str, Any]:
        def disk(path: Path) -> dict[str, str]:
            try:
                st = os.statvfs(path)
            except OSError:
                return {"percent": "0", "inode_percent": "0"}
            used = 100 - (100 * st.f_bavail // max(st.f_blocks, 1))
            inodes = 100 - (100 * st.f_favail // max(st.f_files, 1))
            return {"percent": str(used), "inode_percent": str(inodes)}

        load = [f"{x:.2f}" for x in os.getloadavg()]
        vitals: dict[str, Any] = {
            "cpu": {"sys": "0.0", "user": "0.0", "wait": "0.0"}, "mem": {"kb": "0", "percent": "0"},
            "swap": {"kb": "0", "percent": "0"}, "load": load, "uptime": {"secs": 0},
            "disk": {"system": disk(Path("/")), "ephemeral": disk(self._vm_dir(inst)),
                     "persistent": disk(self._disk_dir(inst))},
        }
        if isinstance(agent_vitals, dict):
            vitals.update(agent_vitals)
        return vitals

    # ---- supervision and resurrection ------------------------------------------------------
    async def _supervise(self) -> None:
        while not self._stopping:
            try:
                await self._supervise_once()
            except Exception:
                log.exception("supervision round failed")
            await asyncio.sleep(self.poll_interval)

    async def _supervise_once(self) -> None:
        now = time.monotonic()
        checks = []
        for dep in list(self.state.deployments.values()):
            for inst in list(dep.instances):
                rt = self.runtime.setdefault(inst.id, VmRuntime())
                if not inst.vm_cid or rt.busy:
                    continue
                checks.append(self._check(inst, rt, now))
        await asyncio.gather(*checks)
        for dep in list(self.state.deployments.values()):
            if self.state.resurrection_paused or self.active_task_for(dep.name):
                continue
            down = [i for i in dep.instances if (i.vm_cid or i.state != "detached") and not i.resurrection_paused
                    and self._due(i)]
            if down:
                log.info("resurrecting %s", ", ".join(i.label() for i in down))
                self._submit_scan_and_fix(dep.name, [i.id for i in down])

    def _due(self, inst: InstanceRecord) -> bool:
        rt = self.runtime.get(inst.id)
        return (rt is not None and not rt.busy and rt.down_since is not None
                and time.monotonic() - rt.down_since >= self.resurrection_delay
                and time.monotonic() >= rt.not_before)

    def _submit_scan_and_fix(self, name: str, inst_ids: list[str]) -> None:
        async def work(_: TaskRecord, out: TaskOutput) -> str:
            return await self._scan_and_fix(out, name, inst_ids)

        self.submit("cck_scan_and_fix", "scan and fix", name, "", work)

    async def _check(self, inst: InstanceRecord, rt: VmRuntime, now: float) -> None:
        alive = (rt.popen.poll() is None) if rt.popen is not None else agent_alive(
            inst.pid, self._vm_dir(inst) / "agent.json")
        if alive:
            try:
                rt.status = await self._agent(inst).status(limit=max(self.agent_timeout, 0.5))
                rt.last_ok, rt.down_since = time.monotonic(), None
                return
            except AgentError:
                if time.monotonic() - rt.last_ok < self.agent_timeout:
                    return
        if rt.down_since is None:
            rt.down_since = now
            rt.status = None
            log.info("%s: unresponsive agent", inst.label())

    async def _scan_and_fix(self, out: TaskOutput, name: str, inst_ids: list[str]) -> str:
        dep = self.state.deployments.get(name)
        if dep is None:
            return ""
        insts = [i for i in dep.instances if i.id in inst_ids and (i.vm_cid or i.state != "detached")]
        stage = out.stage("Applying problem resolutions", len(insts))
        jobs_by_group = {g: self._stored_jobs(dep, g) for g in {i.group for i in insts}}
        parsed = mf.parse(mf.load_yaml(dep.config_manifest), self._cloud_of(dep))
        watch = {g.name: g.update.update_watch_time for g in parsed.groups}

        async def fix(inst: InstanceRecord) -> None:
            rt = self.runtime.setdefault(inst.id, VmRuntime())
            rt.busy += 1
            try:
                await self._delete_vm(inst, drain=False)
                await self._create_vm(dep, inst, jobs_by_group[inst.group], out)
                if inst.state == "started":
                    await self._start_jobs(inst, watch.get(inst.group, mf.WatchTime(1000, 120000)), out)
                else:
                    await self._stop_jobs(inst)  # an agent may start its jobs when it boots
                rt.failed_fixes = 0
            except BaseException:
                # Back off so a VM that cannot come up does not spin the resurrector.
                rt.failed_fixes += 1
                rt.not_before = time.monotonic() + min(RESURRECTION_BACKOFF_MAX,
                                                       self.resurrection_delay * 2 ** rt.failed_fixes)
                raise
            finally:
                rt.busy -= 1

        def problem(inst: InstanceRecord) -> str:
            if not inst.vm_cid:
                return f"VM for '{inst.label()}' missing. (missing_vm): Recreate VM and wait for processes to start"
            return (f"VM for '{inst.label()}' with cloud ID '{inst.vm_cid}' is not responding. "
                    "(unresponsive_agent): Recreate VM and wait for processes to start")

        await asyncio.gather(*(self._tracked(stage.track(problem(i)), fix(i)) for i in insts))
        return f"{len(insts)} resolved"
