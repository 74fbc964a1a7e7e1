"""`pgbosh manifest -f cluster.yaml`: print the BOSH manifest a PostgresCluster would get.

Lets a user review in GitOps what the operator will deploy. Names (release, stemcell,
network, Consul address) come from the same operator configuration as the operator's
(`PGBOSH_BOSH_*` environment variables over the local-world defaults).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from controller.api.models import API_VERSION, KIND, PostgresClusterSpec
from controller.bosh.config import BoshConfig
from controller.bosh.manifest import render_manifest


class InputError(Exception):
    """The file is not a PostgresCluster pgbosh can render."""


def _read(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text()
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None


def _location(loc: tuple[str | int, ...]) -> str:
    return "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def load_cluster(text: str, source: str, namespace: str | None) -> tuple[str, str, PostgresClusterSpec]:
    """(namespace, name, spec) of the PostgresCluster document in `text`."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InputError(f"{source} is not valid YAML: {exc}") from None
    clusters = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not clusters:
        raise InputError(
            f"{source} holds no {KIND} (a document with kind: {KIND} and apiVersion: {API_VERSION})"
        )
    if len(clusters) > 1:
        raise InputError(f"{source} holds {len(clusters)} {KIND} documents; give one at a time")
    doc: dict[str, Any] = clusters[0]
    if doc.get("apiVersion") != API_VERSION:
        raise InputError(f"{source}: apiVersion is {doc.get('apiVersion')!r}, pgbosh serves {API_VERSION}")
    raw_metadata = doc.get("metadata")
    metadata: dict[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
    name = metadata.get("name")
    if not name or not isinstance(name, str):
        raise InputError(f"{source}: metadata.name is missing")
    ns = namespace or metadata.get("namespace") or "default"
    raw_spec = doc.get("spec") or {}
    if not isinstance(raw_spec, dict):
        raise InputError(f"{source}: spec must be a mapping")
    try:
        spec = PostgresClusterSpec.model_validate(raw_spec)
    except ValidationError as exc:
        lines = [
            f"  {_location(tuple(e['loc']))}: {e['msg']}" if e["loc"] else f"  spec: {e['msg']}"
            for e in exc.errors()
        ]
        raise InputError(
            f"{source}: the spec of {KIND} {ns}/{name} is not valid:\n" + "\n".join(lines)
        ) from None
    return str(ns), name, spec


def run(args: argparse.Namespace) -> int:
    try:
        namespace, name, spec = load_cluster(_read(args.file), args.file, args.namespace)
        config = BoshConfig.from_env()
    except (InputError, ValueError, OSError) as exc:
        print(f"pgbosh manifest: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render_manifest(namespace, name, spec, config))
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True, help="a PostgresCluster YAML file, or - for stdin")
    parser.add_argument(
        "--namespace",
        "-n",
        default=None,
        help="namespace of the cluster (default: metadata.namespace, else 'default')",
    )
    parser.set_defaults(func=run)
