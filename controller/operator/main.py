"""Running the operator: connect kopf to a Kubernetes API and the runtime to a Director.

`pgbosh operator` runs this in production (Helm) and `pgbosh dev` runs it against the
local world. The Director's UAA client secret comes from a Kubernetes Secret, never
from a flag, so it does not show in a process list.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kopf

from controller.bosh.client import DirectorClient
from controller.bosh.config import BoshConfig, Secret
from controller.bosh.types import Director
from controller.consul.publisher import ConsulPublisher
from controller.consul.types import PrimaryPublisher
from controller.kube.client import KubeClient, NotFound
from controller.operator import handlers
from controller.operator.reconcile import Runtime
from controller.pg.types import NodeProbe

log = logging.getLogger(__name__)

DIRECTOR_SECRET_KEYS = ("url", "client_id", "client_secret", "ca_cert")


@dataclass(frozen=True)
class KubeConnection:
    server: str
    token: str | None = None
    ca_file: str | None = None
    insecure: bool = False


_CONNECTION: KubeConnection | None = None


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    if _CONNECTION is None:
        raise kopf.LoginError("pgbosh: no Kubernetes connection configured")
    return kopf.ConnectionInfo(
        server=_CONNECTION.server,
        token=_CONNECTION.token,
        ca_path=_CONNECTION.ca_file,
        insecure=_CONNECTION.insecure,
        scheme="Bearer" if _CONNECTION.token else None,
    )


async def bosh_config_from_secret(kube: KubeClient, namespace: str, name: str, base: BoshConfig) -> BoshConfig:
    """Director URL, UAA client and CA from a Secret (keys: url, client_id, client_secret, ca_cert)."""
    try:
        data = await kube.get_secret(namespace, name)
    except NotFound:
        raise SystemExit(
            f"pgbosh: the Director Secret {namespace}/{name} does not exist; create it with keys "
            f"{', '.join(DIRECTOR_SECRET_KEYS)}"
        ) from None
    changes: dict[str, Any] = {}
    if data.get("url"):
        changes["director_url"] = data["url"]
    if data.get("client_id"):
        changes["client_id"] = data["client_id"]
    if data.get("client_secret"):
        changes["client_secret"] = Secret(data["client_secret"])
    if data.get("ca_cert"):
        ca_path = Path(f"/tmp/pgbosh-director-ca-{namespace}-{name}.pem")
        await asyncio.to_thread(ca_path.write_text, data["ca_cert"])
        changes["ca_cert"] = ca_path
    return replace(base, **changes)


async def run(
    connection: KubeConnection,
    bosh: BoshConfig,
    *,
    director_secret: tuple[str, str] | None = None,
    director: Director | None = None,
    resync_seconds: float = 60.0,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    publisher: PrimaryPublisher | None = None,
    consul_token: str | None = None,
    probe_nodes: bool = True,
    node_probe: Callable[[str, str], NodeProbe] | None = None,
) -> None:
    """Run kopf until `stop_flag` is set (or forever)."""
    global _CONNECTION
    _CONNECTION = connection
    kube = KubeClient(
        connection.server, token=connection.token, ca_file=connection.ca_file, verify=not connection.insecure
    )
    own_director: DirectorClient | None = None
    own_publisher: ConsulPublisher | None = None
    try:
        if director_secret is not None:
            bosh = await bosh_config_from_secret(kube, director_secret[0], director_secret[1], bosh)
        if director is None:
            own_director = DirectorClient(bosh)
            director = own_director
        if publisher is None and bosh.consul_http_addr:
            own_publisher = ConsulPublisher(bosh.consul_http_addr, token=consul_token)
            publisher = own_publisher
        handlers.RUNTIME = Runtime(
            kube=kube,
            director=director,
            bosh=bosh,
            post_event=handlers.post_event,
            resync_seconds=resync_seconds,
            publisher=publisher,
            probe_nodes=probe_nodes,
        )
        if node_probe is not None:
            handlers.RUNTIME.node_probe = node_probe
        await kopf.operator(
            standalone=True,
            clusterwide=True,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        handlers.RUNTIME = None
        if own_director is not None:
            await own_director.aclose()
        if own_publisher is not None:
            await own_publisher.close()
        await kube.aclose()
