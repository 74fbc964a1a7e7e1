"""repmgr's hooks and how they reach the agent.

repmgrd runs `promote_command`, `follow_command` and `event_notification_command` as
the database user. That user cannot run the agent's Python (the interpreter may live
under /root) and must never hold the Consul token, so the hooks are tiny shell
scripts in `<vm_dir>/hooks/` (root-owned, 0755: the database user may run them but
not change them). Each one does repmgr's own work and then appends one line to
`<vm_dir>/run/hook-events` (the run directory belongs to the database user). The
agent, as root, tails that file every `EVENT_POLL` seconds and acts: on a successful
promotion of this node it moves Consul's master record here at once
(`publish_primary_sync`); the operator converges the replica records afterwards.

Event line format (space separated): `<unix time> <kind> <exit/success> <node id> <event>`
- `promote <rc> <node>`: the promote hook ran `repmgr standby promote` (rc 0 = promoted)
- `follow <rc> <upstream>`: the follow hook ran `repmgr standby follow`
- `event <success 1|0> <node> <event name>`: repmgr's event notification
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from controller.consul.publisher import ConsulPublishError, publish_primary_sync
from controller.node.config import AgentConfig, PostgresJobProperties
from controller.node.layout import NodeLayout

log = logging.getLogger(__name__)

# How often the agent looks at the events file: adds at most this much to the time
# between `repmgr standby promote` returning and Consul naming the new primary.
EVENT_POLL = 0.05
# Consul may be briefly unreachable; the operator would converge it anyway (~1 s).
PUBLISH_RETRY_FOR = 30.0
PUBLISH_RETRY_EVERY = 0.5

HOOK_NAMES = ("promote", "follow", "event")


def hooks_dir(layout: NodeLayout) -> Path:
    return layout.vm_dir / "hooks"


def events_file(layout: NodeLayout) -> Path:
    return layout.socket_dir / "hook-events"


def hook_path(layout: NodeLayout, name: str) -> Path:
    return hooks_dir(layout) / name


def _sh_quote(value: str | Path) -> str:
    return "'" + str(value).replace("'", "'\"'\"'") + "'"


def render_hooks(layout: NodeLayout) -> dict[str, str]:
    """The three scripts. No secret appears: libpq reads PGPASSFILE from the environment
    repmgrd inherited from the agent."""
    repmgr = _sh_quote(layout.binary("repmgr"))
    conf = _sh_quote(layout.repmgr_conf)
    events = _sh_quote(events_file(layout))
    header = "#!/bin/sh\n# Written by the pgbosh node agent; run by repmgr as the database user.\n"
    note = 'printf "%s %s\\n" "$(date +%s.%N)" "$*" >> ' + events + " 2>/dev/null || true\n"
    promote = (
        header
        + f"{repmgr} standby promote -f {conf} --log-to-file\n"
        + "rc=$?\n"
        + "note() { "
        + note.strip()
        + "; }\n"
        + 'note promote "$rc" "$1"\n'
        + 'exit "$rc"\n'
    )
    follow = (
        header
        + f'{repmgr} standby follow -f {conf} --log-to-file --upstream-node-id="$1"\n'
        + "rc=$?\n"
        + "note() { "
        + note.strip()
        + "; }\n"
        + 'note follow "$rc" "$1"\n'
        + 'exit "$rc"\n'
    )
    # %n %e %s: node id, event name, success (1/0); details are not needed here.
    event = header + "note() { " + note.strip() + "; }\n" + 'note event "$3" "$1" "$2"\n' + "exit 0\n"
    return {"promote": promote, "follow": follow, "event": event}


def repmgr_hook_settings(config: AgentConfig, layout: NodeLayout) -> list[tuple[str, str]]:
    """repmgr.conf lines naming the hooks (full paths, as repmgr runs them via the shell)."""
    return [
        ("promote_command", f"{hook_path(layout, 'promote')} {config.index + 1}"),
        ("follow_command", f"{hook_path(layout, 'follow')} %n"),
        ("event_notification_command", f"{hook_path(layout, 'event')} %n %e %s"),
    ]


def install_hooks(layout: NodeLayout, run_uid: int, run_gid: int) -> None:
    """Root owns the scripts; the events file belongs to the database user."""
    directory = hooks_dir(layout)
    directory.mkdir(parents=True, exist_ok=True)
    os.chown(directory, 0, 0)
    os.chmod(directory, 0o755)
    for name, text in render_hooks(layout).items():
        path = hook_path(layout, name)
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.chown(tmp, 0, 0)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    events = events_file(layout)
    if not events.exists():
        fd = os.open(events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.close(fd)
    os.chown(events, run_uid, run_gid)
    os.chmod(events, 0o640)


@dataclass(frozen=True)
class HookEvent:
    at: float
    kind: str  # promote | follow | event
    ok: bool
    node: int | None
    name: str  # the repmgr event name for kind "event", else the kind

    @property
    def promoted(self) -> bool:
        if not self.ok:
            return False
        return self.kind == "promote" or (self.kind == "event" and self.name == "standby_promote")


def parse_event(line: str) -> HookEvent | None:
    parts = line.split()
    if len(parts) < 3:
        return None
    try:
        at = float(parts[0])
    except ValueError:
        at = time.time()
    kind = parts[1]
    status = parts[2]
    node: int | None = None
    if len(parts) > 3:
        with contextlib.suppress(ValueError):
            node = int(parts[3])
    if kind == "event":
        return HookEvent(at, kind, status == "1", node, parts[4] if len(parts) > 4 else "")
    if kind in ("promote", "follow"):
        return HookEvent(at, kind, status == "0", node, kind)
    return None


class HookEvents:
    """Tails the events file; calls `on_promoted` once per successful promotion here."""

    def __init__(self, layout: NodeLayout, node: int, on_promoted: Callable[[HookEvent], Awaitable[None]]) -> None:
        self.path = events_file(layout)
        self.node = node
        self.on_promoted = on_promoted
        self._offset: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_promotion = 0.0

    def start(self) -> None:
        if self._task is None or self._task.done():
            # Events written before the agent (re)started are history, not news.
            with contextlib.suppress(OSError):
                self._offset = self.path.stat().st_size
            self._task = asyncio.create_task(self._loop(), name="hook-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def read_new(self) -> list[HookEvent]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if self._offset is None or size < self._offset:
            self._offset = 0
        if size == self._offset:
            return []
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        # Only whole lines; a half-written one is read next time.
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        events = []
        for raw in data[: end + 1].decode(errors="replace").splitlines():
            event = parse_event(raw)
            if event is not None:
                events.append(event)
        return events

    async def _loop(self) -> None:
        while True:
            for event in self.read_new():
                log.info("repmgr hook: %s %s ok=%s node=%s", event.kind, event.name, event.ok, event.node)
                # The promote hook and the standby_promote notification report the
                # same promotion: act on the first, ignore the echo.
                if event.promoted and event.node in (None, self.node) and event.at - self._last_promotion > 5:
                    self._last_promotion = event.at
                    try:
                        await self.on_promoted(event)
                    except Exception as error:  # never let the watcher die
                        log.error("handling the promotion failed: %s", error)
            await asyncio.sleep(EVENT_POLL)


async def publish_promotion(config: AgentConfig, props: PostgresJobProperties) -> bool:
    """Point `master.<service>` at this node now. False when Consul is not configured or
    stayed unreachable (the operator converges it later)."""
    consul = props.consul
    if not consul.http_addr or not consul.service:
        return False
    token = consul.token.get_secret_value() if consul.token is not None else None
    deadline = time.monotonic() + PUBLISH_RETRY_FOR
    while True:
        started = time.monotonic()
        try:
            await asyncio.to_thread(
                publish_primary_sync, consul.http_addr, consul.service, config.address, props.postgres.port, token
            )
        except ConsulPublishError as error:
            if time.monotonic() > deadline:
                log.error("could not publish the promotion in Consul: %s", error)
                return False
            log.warning("publishing the promotion in Consul failed, retrying: %s", error)
            await asyncio.sleep(PUBLISH_RETRY_EVERY)
            continue
        log.info(
            "Consul: master.%s is now %s:%d (%.0f ms)",
            consul.service,
            config.address,
            props.postgres.port,
            1000 * (time.monotonic() - started),
        )
        return True
