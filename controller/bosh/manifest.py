"""From a PostgresCluster spec to a BOSH manifest v2, in the shape of docs/local-world.md.

Rendering is a pure function: the same (namespace, name, spec, config) always gives the
same bytes, so the operator can compare what it would deploy with what is deployed and
never redeploy an unchanged manifest. Key order is fixed by construction and every
mapping that comes from the user (parameters) is sorted.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml

from controller.api.models import PostgresClusterSpec, ReplicationMode, quantity_mb
from controller.bosh.config import BoshConfig
from controller.bosh.types import CloudConfig

DNS_LABEL_MAX = 63
_HASH_LENGTH = 8
_PLACEHOLDER = re.compile(r"\(\(([A-Za-z0-9_.\-/]+)\)\)")

ADMIN_PASSWORD = "admin_password"
REPLICATION_PASSWORD = "replication_password"
CONSUL_TOKEN = "consul_token"
TLS_CA = "postgres_tls_ca"
TLS_SERVER = "postgres_tls"


def deployment_name(namespace: str, name: str, config: BoshConfig | None = None) -> str:
    prefix = (config or BoshConfig()).deployment_prefix
    return f"{prefix}-{namespace}-{name}"


def primary_dns_name(service: str) -> str:
    """The Consul DNS name that follows the cluster's primary (its `master` record)."""
    return f"master.{service}.service.consul"


def consul_service_name(namespace: str, name: str, config: BoshConfig | None = None) -> str:
    """A DNS label (RFC 1123, at most 63 characters) naming the cluster's Consul service.

    `pg-<namespace>-<name>` when that already is a valid label. When it is too long, or
    had to be changed to become one (dots, upper case), it is shortened and gets a hash of
    the original namespace and name, so two clusters never share a service name.
    """
    prefix = (config or BoshConfig()).consul_service_prefix
    wanted = f"{prefix}-{namespace}-{name}"
    label = re.sub(r"[^a-z0-9-]+", "-", wanted.lower())
    label = re.sub(r"-{2,}", "-", label).strip("-")
    if label == wanted and len(label) <= DNS_LABEL_MAX:
        return label
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:_HASH_LENGTH]
    head = label[: DNS_LABEL_MAX - _HASH_LENGTH - 1].rstrip("-")
    return f"{head}-{digest}"


def _postgres_properties(spec: PostgresClusterSpec, config: BoshConfig) -> dict[str, Any]:
    replication = spec.replication
    props: dict[str, Any] = {
        "major_version": spec.postgres_version,
        "port": config.postgres_port,
        "parameters": {key: str(spec.parameters[key]) for key in sorted(spec.parameters)},
        "replication": {
            "mode": str(ReplicationMode(replication.mode).value),
            "sync_standbys": replication.sync_standbys,
        },
        "admin_user": config.admin_user,
        "admin_password": f"(({ADMIN_PASSWORD}))",
        "replication_password": f"(({REPLICATION_PASSWORD}))",
        "databases": [{"name": db} for db in config.initial_databases],
    }
    if config.tls:
        props["tls"] = {
            "ca": f"(({TLS_SERVER}.ca))",
            "certificate": f"(({TLS_SERVER}.certificate))",
            "private_key": f"(({TLS_SERVER}.private_key))",
        }
    return props


def _variables(namespace: str, name: str, config: BoshConfig) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = [
        {"name": ADMIN_PASSWORD, "type": "password"},
        {"name": REPLICATION_PASSWORD, "type": "password"},
    ]
    if config.tls:
        service = consul_service_name(namespace, name, config)
        variables += [
            {
                "name": TLS_CA,
                "type": "certificate",
                "options": {"is_ca": True, "common_name": f"{service} CA"},
            },
            {
                "name": TLS_SERVER,
                "type": "certificate",
                "options": {
                    "ca": TLS_CA,
                    "common_name": primary_dns_name(service),
                    "alternative_names": [
                        primary_dns_name(service),
                        f"replica.{service}.service.consul",
                        f"{service}.service.consul",
                    ],
                    "extended_key_usage": ["server_auth"],
                },
            },
        ]
    return variables


def manifest_dict(namespace: str, name: str, spec: PostgresClusterSpec, config: BoshConfig) -> dict[str, Any]:
    """The manifest as data, key order as it will be written."""
    group: dict[str, Any] = {
        "name": config.instance_group,
        "azs": list(spec.azs),
        "instances": spec.instances,
        "vm_type": spec.vm_type,
        "stemcell": config.stemcell_alias,
    }
    if spec.storage.disk_type is not None:
        group["persistent_disk_type"] = spec.storage.disk_type
    else:
        assert spec.storage.size is not None  # the spec guarantees exactly one of the two
        group["persistent_disk"] = quantity_mb(spec.storage.size)
    consul: dict[str, Any] = {
        "service": consul_service_name(namespace, name, config),
        "http_addr": config.consul_http_addr,
    }
    if config.consul_token:
        consul["token"] = f"(({CONSUL_TOKEN}))"
    repmgr = config.repmgr
    group["networks"] = [{"name": config.network}]
    group["jobs"] = [
        {
            "name": config.job_name,
            "release": config.release_name,
            "properties": {
                "postgres": _postgres_properties(spec, config),
                "repmgr": {
                    "monitor_interval_secs": repmgr.monitor_interval_secs,
                    "reconnect_attempts": repmgr.reconnect_attempts,
                    "reconnect_interval": repmgr.reconnect_interval,
                    "failover": repmgr.failover,
                    "priority_by_index": repmgr.priority_by_index,
                },
                "consul": consul,
            },
        }
    ]
    return {
        "name": deployment_name(namespace, name, config),
        "releases": [{"name": config.release_name, "version": config.release_version}],
        "stemcells": [
            {"alias": config.stemcell_alias, "os": config.stemcell_os, "version": config.stemcell_version}
        ],
        "update": {
            "canaries": 1,
            "max_in_flight": 1,
            "canary_watch_time": config.canary_watch_time,
            "update_watch_time": config.update_watch_time,
            "serial": True,
        },
        "instance_groups": [group],
        "variables": _variables(namespace, name, config),
    }


# libyaml's emitter when PyYAML has it (5x faster: the operator renders a manifest per cluster).
# Sequences sit at their key's indentation, as in the BOSH documentation's manifests.
_Dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_manifest(doc: dict[str, Any]) -> str:
    return yaml.dump(
        doc,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=10_000,  # never fold long strings: a fold would change the bytes, not the meaning
    )


_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(text: str) -> Any:
    # libyaml's parser when PyYAML has it: the operator parses manifests on every full check.
    return yaml.load(text, Loader=_Loader)


def render_manifest(
    namespace: str, name: str, spec: PostgresClusterSpec, config: BoshConfig | None = None
) -> str:
    """The manifest text for a cluster. `((admin_password))` and the other variables stay
    placeholders: the Director generates them, or the operator fills them with :func:`interpolate`."""
    return dump_manifest(manifest_dict(namespace, name, spec, config or BoshConfig()))


def _interpolate_value(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate_value(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_value(v, values) for v in value]
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), value)
    return value


def interpolate(manifest_text: str, values: dict[str, str]) -> str:
    """Replace `((name))` placeholders named in `values`, like `bosh deploy -v name=value`.

    Works on the parsed document, so a value with YAML syntax in it (quotes, colons, `#`)
    stays a plain string. Placeholders not in `values` are left for the Director.
    """
    doc = _load(manifest_text)
    return dump_manifest(_interpolate_value(doc, values))


def interpolate_doc(doc: dict[str, Any], values: dict[str, str]) -> str:
    """:func:`interpolate` for a manifest still held as data (no YAML parsing)."""
    return dump_manifest(_interpolate_value(doc, values))


def manifests_equal(a: str, b: str) -> bool:
    """Whether two manifest texts mean the same document (formatting and key order aside)."""
    return bool(_load(a) == _load(b))


def _have(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(sorted(names)) if names else "none"


def check_against_cloud_config(
    spec: PostgresClusterSpec, cloud: CloudConfig, config: BoshConfig | None = None
) -> list[str]:
    """What in the spec the cloud config does not have, one message each (empty: all fine).

    Messages name the field, the missing value and what the cloud config offers, so a
    user can fix the resource from the condition alone.
    """
    problems: list[str] = []
    if spec.vm_type not in cloud.vm_types:
        problems.append(
            f"vmType '{spec.vm_type}' is not a vm_type of the BOSH cloud config "
            f"(it has: {_have(cloud.vm_types)})"
        )
    disk_type = spec.storage.disk_type
    if disk_type is not None and disk_type not in cloud.disk_types:
        problems.append(
            f"storage.diskType '{disk_type}' is not a disk_type of the BOSH cloud config "
            f"(it has: {_have(list(cloud.disk_types))})"
        )
    missing_azs = [az for az in spec.azs if az not in cloud.azs]
    if missing_azs:
        noun = "an AZ" if len(missing_azs) == 1 else "AZs"
        problems.append(
            f"azs: {', '.join(missing_azs)} {'is not' if len(missing_azs) == 1 else 'are not'} {noun} "
            f"of the BOSH cloud config (it has: {_have(cloud.azs)})"
        )
    if config is not None and config.network not in cloud.networks:
        problems.append(
            f"network '{config.network}' (operator configuration) is not a network of the BOSH cloud "
            f"config (it has: {_have(cloud.networks)})"
        )
    return problems
