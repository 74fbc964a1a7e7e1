"""`pgbosh dev`: the whole stack on one machine.

It starts, on loopback: the local Kubernetes API (kmock's emulator, extended), the
local Consul (HTTP and DNS), the local BOSH director (VMs are real PostgreSQL and
repmgr processes), the Open Service Broker, and the operator. It writes a
kubeconfig and `dev.json` (every endpoint, and where the credentials are) into
the home folder, optionally applies manifests, and stops everything on Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from controller.api import models
from controller.bosh.config import BoshConfig
from controller.kube.client import Conflict, KubeClient, resource_path
from controller.local.kube import serve as serve_kube
from controller.local.kube import write_kubeconfig

log = logging.getLogger("pgbosh.dev")

SYSTEM_NAMESPACE = "pgbosh-system"
DIRECTOR_SECRET = "pgbosh-director"
BROKER_SECRET = "pgbosh-broker"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"pgbosh dev: {text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


async def apply_manifest(kube: KubeClient, path: Path) -> list[str]:
    """Create (or merge-patch) every PostgresCluster in a YAML file; returns their names."""
    names = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        if doc.get("kind") != models.KIND:
            raise SystemExit(f"pgbosh dev: {path} holds a {doc.get('kind')}, only {models.KIND} can be applied")
        meta = doc.setdefault("metadata", {})
        namespace = meta.setdefault("namespace", "default")
        collection = resource_path(models.GROUP, models.VERSION, models.PLURAL, namespace)
        try:
            await kube.create(collection, doc)
        except Conflict:
            await kube.merge_patch(f"{collection}/{meta['name']}", {"spec": doc.get("spec", {})})
        names.append(f"{namespace}/{meta['name']}")
    return names


@contextlib.asynccontextmanager
async def _started(obj: Any, **stop_kwargs: Any) -> AsyncIterator[Any]:
    await obj.start()
    try:
        yield obj
    finally:
        await obj.stop(**stop_kwargs)


async def run_dev(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from controller.broker.config import BrokerConfig
    from controller.broker.roles import PsycopgRoleManager
    from controller.broker.server import BasicCredentials, BrokerServer
    from controller.broker.service import Broker
    from controller.local.consul.server import ConsulServer
    from controller.local.director.server import LocalDirector
    from controller.operator.main import KubeConnection
    from controller.operator.main import run as run_operator

    home = Path(args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    kube_host, kube_port = _listen(args.kube)
    director_host, director_port = _listen(args.director)
    consul_host, consul_port = _listen(args.consul_http)
    dns_host, dns_port = _listen(args.consul_dns)
    broker_host, broker_port = _listen(args.broker)

    async with contextlib.AsyncExitStack() as stack:
        kube_api, kube_url = await stack.enter_async_context(
            serve_kube(kube_host, kube_port, forget_served_requests=True)
        )
        kube_api.add_namespace(SYSTEM_NAMESPACE)
        broker_config = BrokerConfig.load(None)
        kube_api.add_namespace(broker_config.namespace)
        kubeconfig = home / "kubeconfig"
        write_kubeconfig(str(kubeconfig), kube_url)
        kube = await stack.enter_async_context(KubeClient(kube_url))

        consul = await stack.enter_async_context(
            _started(
                ConsulServer(
                    http_host=consul_host,
                    http_port=consul_port,
                    dns_host=dns_host,
                    dns_port=dns_port,
                    state_file=str(home / "consul.json"),
                )
            )
        )
        director = await stack.enter_async_context(
            _started(
                LocalDirector(
                    home / "director",
                    host=director_host,
                    port=director_port,
                    resurrection_delay=args.resurrection_delay,
                ),
                stop_vms=True,
            )
        )
        await kube.apply_secret(
            SYSTEM_NAMESPACE,
            DIRECTOR_SECRET,
            {"url": director.url, "client_id": director.client_id, "client_secret": director.client_secret},
        )
        broker_credentials = {"username": "broker", "password": secrets.token_urlsafe(18)}
        await kube.apply_secret(SYSTEM_NAMESPACE, BROKER_SECRET, broker_credentials)
        broker_file = home / "broker-credentials.yaml"
        _write_private(broker_file, yaml.safe_dump(broker_credentials))
        broker = await stack.enter_async_context(
            _started(
                BrokerServer(
                    Broker(broker_config, kube, PsycopgRoleManager()),
                    await BasicCredentials.from_secret(kube, SYSTEM_NAMESPACE, BROKER_SECRET),
                    host=broker_host,
                    port=broker_port,
                )
            )
        )

        bosh = BoshConfig.from_env().with_changes(consul_http_addr=consul.http_addr)
        operator_stop = asyncio.Event()
        operator_ready = asyncio.Event()
        operator = asyncio.create_task(
            run_operator(
                KubeConnection(server=kube_url),
                bosh,
                director_secret=(SYSTEM_NAMESPACE, DIRECTOR_SECRET),
                resync_seconds=args.resync,
                stop_flag=operator_stop,
                ready_flag=operator_ready,
            )
        )

        async def stop_operator() -> None:
            operator_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(operator, timeout=30)

        stack.push_async_callback(stop_operator)
        await asyncio.wait(
            [operator, asyncio.ensure_future(operator_ready.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if operator.done():
            operator.result()

        info = {
            "home": str(home),
            "kubernetes": {"url": kube_url, "kubeconfig": str(kubeconfig)},
            "director": {"url": director.url, "config": str(director.info_path)},
            "consul": {"http": consul.http_addr, "dns": f"{dns_host}:{consul.dns_port}"},
            "broker": {"url": broker.url, "credentials": str(broker_file)},
            "operator": {"pid": os.getpid(), "director_secret": f"{SYSTEM_NAMESPACE}/{DIRECTOR_SECRET}"},
        }
        _write_private(home / "dev.json", json.dumps(info, indent=2) + "\n")
        print(f"pgbosh dev is up; endpoints in {home / 'dev.json'}", flush=True)
        print(f"  export KUBECONFIG={kubeconfig}", flush=True)
        for manifest in args.apply or ():
            names = await apply_manifest(kube, Path(manifest))
            print(f"  applied {', '.join(names)} from {manifest}; watch with: kubectl get pgc -w", flush=True)

        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopper, operator], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        print("pgbosh dev: stopping", flush=True)
        if operator.done() and operator.exception() is not None:
            raise operator.exception()  # type: ignore[misc]
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_dev(args, stop)

    try:
        return asyncio.run(main())
    except OSError as exc:
        print(f"pgbosh dev: {exc}", file=sys.stderr)
        return 1


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=".pgbosh", help="folder for the kubeconfig, dev.json and state")
    parser.add_argument("--kube", default="127.0.0.1:6443", help="HOST:PORT of the local Kubernetes API")
    parser.add_argument("--director", default="127.0.0.1:25555", help="HOST:PORT of the local BOSH director")
    parser.add_argument("--consul-http", default="127.0.0.1:8500", help="HOST:PORT of the local Consul HTTP API")
    parser.add_argument("--consul-dns", default="127.0.0.1:8600", help="HOST:PORT of the local Consul DNS")
    parser.add_argument("--broker", default="127.0.0.1:8080", help="HOST:PORT of the service broker")
    parser.add_argument("--apply", action="append", metavar="FILE", help="apply these PostgresCluster manifests")
    parser.add_argument("--resync", type=float, default=30.0, help="seconds between observations of a settled cluster")
    parser.add_argument("--resurrection-delay", type=float, default=2.0, help="seconds before a lost VM is recreated")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(func=run)
