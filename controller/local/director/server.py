"""`LocalDirector`: the local BOSH Director as one object you can start and stop in-process."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from .api import DirectorApi, Tokens
from .defaults import DEFAULT_AGENT_TIMEOUT, DEFAULT_MAX_THREADS, DEFAULT_POLL_INTERVAL, DEFAULT_RESURRECTION_DELAY
from .director import Engine
from .vms import write_private

CLIENT_ID = "pgbosh"


class LocalDirector:
    """A BOSH-Director-compatible server whose VMs are local processes.

    ``await LocalDirector(state_dir).start()`` binds (port 0 picks a free port), writes
    ``state_dir/director.json`` (``url``, ``uaa_url``, ``client_id``, ``client_secret``;
    mode 0600) and adopts or restarts the VMs of an earlier run. ``await stop()`` leaves
    the VMs running (like a Director restart); ``await stop(stop_vms=True)`` stops them
    too (their state stays, so the next start restarts them).
    """

    def __init__(self, state_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 resurrection_delay: float = DEFAULT_RESURRECTION_DELAY,
                 agent_timeout: float = DEFAULT_AGENT_TIMEOUT, vm_root: str | Path | None = None,
                 run_as: str | None = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 agent_command: list[str] | None = None, max_threads: int = DEFAULT_MAX_THREADS) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.host, self.port = host, port
        self.engine = Engine(self.state_dir, resurrection_delay=resurrection_delay, agent_timeout=agent_timeout,
                             vm_root=Path(vm_root) if vm_root else None, run_as=run_as,
                             poll_interval=poll_interval, agent_command=agent_command, max_threads=max_threads)
        self.info_path = self.state_dir / "director.json"
        self.client_id = CLIENT_ID
        self.client_secret = ""
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _credentials(self) -> tuple[str, str]:
        try:
            raw: dict[str, Any] = json.loads(self.info_path.read_text())
            if raw.get("client_secret") and raw.get("uuid"):
                return str(raw["client_secret"]), str(raw["uuid"])
        except (OSError, ValueError):
            pass
        return secrets.token_urlsafe(32), str(uuid.uuid4())

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.engine.load()
        self.client_secret, director_uuid = self._credentials()
        api = DirectorApi(self.engine, Tokens(self.client_id, self.client_secret))
        api.uuid = director_uuid
        self._runner = web.AppRunner(api.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.port
        self.url = f"http://{self.host}:{self.port}"
        api.base_url = self.url
        write_private(self.info_path, json.dumps({
            "url": self.url, "uaa_url": self.url, "client_id": self.client_id, "client_secret": self.client_secret,
            "uuid": director_uuid, "vm_root": str(self.engine.vm_root), "run_as": self.engine.run_as,
        }, indent=1))
        await self.engine.start()

    async def stop(self, *, stop_vms: bool = False) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.engine.stop(stop_vms=stop_vms)

    async def __aenter__(self) -> LocalDirector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
