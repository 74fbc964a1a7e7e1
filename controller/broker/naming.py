"""Kubernetes names and labels derived from OSB ids.

OSB ids are opaque strings (usually GUIDs) chosen by the platform; Kubernetes
names and label values have strict grammars. Every derivation is deterministic
(the broker keeps no memory: a restart must find the same objects) and adds a
hash whenever it has to alter the id, so two different ids never share a name.
"""

from __future__ import annotations

import hashlib
import re

GROUP = "pgbosh.dev"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "pgbosh-broker"
LABEL_SERVICE = f"{GROUP}/service-id"
LABEL_PLAN = f"{GROUP}/plan-id"
LABEL_ORG = f"{GROUP}/organization-guid"
LABEL_SPACE = f"{GROUP}/space-guid"
LABEL_INSTANCE = f"{GROUP}/instance-id"
LABEL_BINDING = f"{GROUP}/binding-id"
# The exact ids, because labels may hold only a sanitized form.
ANNOTATION_INSTANCE = f"{GROUP}/osb-instance-id"
ANNOTATION_BINDING = f"{GROUP}/osb-binding-id"
ANNOTATION_PROVISION = f"{GROUP}/osb-provision"
ANNOTATION_OPERATION = f"{GROUP}/osb-operation"
ANNOTATION_BINDING_REQUEST = f"{GROUP}/osb-binding-request"

CLUSTER_NAME_MAX = 40
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _dns_label(prefix: str, ident: str, limit: int) -> str:
    candidate = prefix + ident
    if len(candidate) <= limit and _DNS_LABEL.match(candidate):
        return candidate
    cleaned = re.sub(r"[^a-z0-9-]+", "-", ident.lower()).strip("-")
    suffix = _digest(ident, 10)
    room = limit - len(prefix) - len(suffix) - 1
    head = cleaned[:room].strip("-")
    return f"{prefix}{head}-{suffix}" if head else f"{prefix}{suffix}"


def cluster_name(instance_id: str) -> str:
    """PostgresCluster name: a DNS label of at most 40 characters (it also names the BOSH deployment)."""
    return _dns_label("pg-", instance_id, CLUSTER_NAME_MAX)


def binding_secret_name(binding_id: str) -> str:
    return _dns_label("pgbosh-binding-", binding_id, 63)


def binding_role_name(binding_id: str) -> str:
    """A PostgreSQL role name that needs no quoting surprises: lowercase, <= 63 bytes."""
    cleaned = re.sub(r"[^a-z0-9]+", "_", binding_id.lower()).strip("_")[:32]
    return f"b_{cleaned}_{_digest(binding_id, 8)}" if cleaned else f"b_{_digest(binding_id, 16)}"


def label_value(value: str) -> str:
    """A valid label value (<= 63 chars) for any id; unchanged when already valid."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)
    suffix = _digest(value, 10)
    head = cleaned[: 63 - len(suffix) - 1].strip("-_.")
    return f"{head}-{suffix}" if head else suffix
