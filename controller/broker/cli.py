"""``pgbosh broker serve``: run the Open Service Broker API server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from controller.broker.config import DEFAULT_CONFIG, BrokerConfig
from controller.broker.roles import PsycopgRoleManager
from controller.broker.server import BasicCredentials, BrokerServer
from controller.broker.service import Broker
from controller.kube import KubeClient


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="broker_command", metavar="SUBCOMMAND")
    serve = sub.add_parser("serve", help="serve the OSB API (v2.17)", description="Serve the OSB API (v2.17).")
    serve.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT to listen on (default %(default)s)")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--kubeconfig", help="kubeconfig whose current context names the Kubernetes API")
    where.add_argument("--server", help="Kubernetes API URL, without credentials (for a local emulator)")
    serve.add_argument("--config", default=str(DEFAULT_CONFIG), help="catalog and namespace YAML (default: shipped)")
    serve.add_argument("--namespace", help="namespace for PostgresClusters and Secrets (overrides --config)")
    auth = serve.add_mutually_exclusive_group(required=True)
    auth.add_argument("--credentials-file", help="basic-auth credentials: YAML {username, password} or user:password")
    auth.add_argument("--credentials-secret", metavar="NAMESPACE/NAME", help="a Secret with username and password")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=run)
    parser.set_defaults(func=_help(parser))


def _help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


# A platform sends bursts of requests (benchmarks/broker: 50 at once); each holds one
# connection to the Kubernetes API for one call, so the pool matches the burst and
# aiohttp's pool hands connections over in constant time.
KUBE_CONNECTIONS = 64


def _kube(args: argparse.Namespace) -> KubeClient:
    options: dict[str, Any] = {"max_connections": KUBE_CONNECTIONS, "backend": "aiohttp"}
    if args.server:
        return KubeClient(args.server, **options)
    if args.kubeconfig:
        return KubeClient.from_kubeconfig(args.kubeconfig, **options)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return KubeClient.in_cluster(**options)
    default = os.path.expanduser(os.environ.get("KUBECONFIG", "~/.kube/config"))
    return KubeClient.from_kubeconfig(default, **options)


async def serve(args: argparse.Namespace) -> int:
    config = BrokerConfig.load(args.config)
    if args.namespace:
        config = config.model_copy(update={"namespace": args.namespace})
    host, port = _listen(args.listen)
    async with _kube(args) as kube:
        if args.credentials_file:
            credentials = BasicCredentials.from_file(args.credentials_file)
        else:
            namespace, _, name = str(args.credentials_secret).partition("/")
            if not name:
                raise ValueError("--credentials-secret wants NAMESPACE/NAME")
            credentials = await BasicCredentials.from_secret(kube, namespace, name)
        broker = Broker(config, kube, PsycopgRoleManager())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with BrokerServer(broker, credentials, host=host, port=port) as server:
            print(f"pgbosh broker listening on {server.url} (namespace {config.namespace})", flush=True)
            await stop.wait()
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every Kubernetes call at INFO; the broker's one line per request says enough.
    logging.getLogger("httpx").setLevel(logging.NOTSET if level == "DEBUG" else logging.WARNING)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        return asyncio.run(serve(args))
    except (ValueError, OSError) as exc:
        print(f"pgbosh broker: {exc}", file=sys.stderr)
        return 1
