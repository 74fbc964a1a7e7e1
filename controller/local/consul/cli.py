"""`pgbosh consul serve`: the local Consul-compatible agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from controller.local.consul.server import ConsulServer


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="consul_command", metavar="COMMAND", required=True)
    serve = sub.add_parser("serve", help="serve Consul's HTTP API and DNS interface")
    serve.add_argument("--http", type=_host_port, default=("127.0.0.1", 8500), metavar="HOST:PORT")
    serve.add_argument("--dns", type=_host_port, default=("127.0.0.1", 8600), metavar="HOST:PORT")
    serve.add_argument(
        "--token",
        default=os.environ.get("PGBOSH_CONSUL_TOKEN"),
        help="ACL token required on HTTP calls (default: $PGBOSH_CONSUL_TOKEN)",
    )
    serve.add_argument("--state-file", default=None, help="keep registrations, KV and sessions across restarts")
    serve.add_argument(
        "--dns-only-passing",
        action="store_true",
        help="leave warning instances out of DNS too (Consul's dns_config.only_passing)",
    )
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    (http_host, http_port), (dns_host, dns_port) = args.http, args.dns
    server = ConsulServer(
        http_host=http_host,
        http_port=http_port,
        dns_host=dns_host,
        dns_port=dns_port,
        token=args.token,
        state_file=args.state_file,
        dns_only_passing=args.dns_only_passing,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    logging.getLogger("pgbosh.consul").info(
        "consul: http %s, dns %s:%d (udp+tcp), acl %s",
        server.http_addr,
        dns_host,
        server.dns_port,
        "on" if args.token else "off",
    )
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0
