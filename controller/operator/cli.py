"""`pgbosh operator`: run the operator against a Kubernetes API and a BOSH Director."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

import yaml

from controller.bosh.config import BoshConfig
from controller.operator.main import KubeConnection, run

IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


def connection_from_kubeconfig(path: str) -> KubeConnection:
    with open(path) as fh:
        config = yaml.safe_load(fh)
    current = config.get("current-context")
    context = next(c["context"] for c in config["contexts"] if c["name"] == current)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user: dict[str, Any] = next((u["user"] for u in config.get("users", []) if u["name"] == context.get("user")), {})
    return KubeConnection(
        server=cluster["server"],
        token=user.get("token"),
        ca_file=cluster.get("certificate-authority"),
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
    )


def in_cluster_connection() -> KubeConnection:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    with open(IN_CLUSTER_TOKEN) as fh:
        token = fh.read().strip()
    return KubeConnection(server=f"https://{host}:{port}", token=token, ca_file=IN_CLUSTER_CA)


def run_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.kubeconfig:
        connection = connection_from_kubeconfig(args.kubeconfig)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        connection = in_cluster_connection()
    else:
        raise SystemExit("pgbosh operator: give --kubeconfig, or run inside a Kubernetes pod")
    bosh = BoshConfig.from_env()
    if args.director_url:
        bosh = bosh.with_changes(director_url=args.director_url)
    secret = None
    if args.director_secret:
        namespace, _, name = args.director_secret.partition("/")
        if not name:
            raise SystemExit("pgbosh operator: --director-secret takes NAMESPACE/NAME")
        secret = (namespace, name)
    asyncio.run(run(connection, bosh, director_secret=secret, resync_seconds=args.resync))
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG"), help="kubeconfig file (default: in-cluster)"
    )
    parser.add_argument("--director-url", help="BOSH Director URL (overrides PGBOSH_BOSH_DIRECTOR_URL)")
    parser.add_argument(
        "--director-secret",
        default=os.environ.get("PGBOSH_DIRECTOR_SECRET"),
        help="NAMESPACE/NAME of the Secret with the Director's url, client_id, client_secret and ca_cert",
    )
    parser.add_argument("--resync", type=float, default=60.0, help="seconds between observations of a settled cluster")
    parser.add_argument("--log-level", default="info")
    parser.set_defaults(func=run_cli)
