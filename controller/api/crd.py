"""The CustomResourceDefinition, generated from the pydantic models.

Pydantic writes JSON Schema; Kubernetes wants a *structural* openAPIV3Schema:
no $ref, no anyOf/null branches, no propertyNames, no additionalProperties:false.
This module turns the one into the other and adds what Kubernetes has on top
(CEL rules, list types, subresources, printer columns).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import yaml
from pydantic import BaseModel

from controller.api import models

# Keys of JSON Schema Kubernetes accepts in a structural schema.
_ALLOWED_KEYS = {
    "type",
    "format",
    "description",
    "default",
    "enum",
    "maximum",
    "minimum",
    "exclusiveMaximum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "properties",
    "additionalProperties",
    "nullable",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
}

NAME_RULE = models.Rule(
    rule="size(self.metadata.name) <= 40",
    message="metadata.name may have at most 40 characters: it becomes part of the BOSH deployment and Consul DNS names",
)


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve(merged, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    # Optional[X] is anyOf [X, null]: Kubernetes omits the field instead of sending null.
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {branches}")
        outer = {k: v for k, v in node.items() if k != "default" or v is not None}
        node = {**branches[0], **outer}
    if node.get("default", "missing") is None:
        node.pop("default")
    rules = list(node.get("x-kubernetes-validations", []))
    # A map with a key pattern: Kubernetes has no patternProperties, so the values'
    # schema goes to additionalProperties and the key pattern becomes a CEL rule.
    patterns = node.pop("patternProperties", None)
    if patterns:
        if len(patterns) != 1:
            raise ValueError(f"one key pattern per map, got {list(patterns)}")
        ((pattern, value_schema),) = patterns.items()
        node["additionalProperties"] = value_schema
        rules.append({"rule": f"self.all(k, k.matches('{pattern}'))", "message": f"keys must match {pattern}"})
    if rules:
        node["x-kubernetes-validations"] = rules
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _ALLOWED_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value)
        else:
            out[key] = value
    return out


def _add_factory_defaults(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """Pydantic leaves out defaults made by a factory; Kubernetes should apply them."""
    for name, field in model.model_fields.items():
        key = field.alias or name
        prop = schema.get("properties", {}).get(key)
        if prop is None:
            continue
        if field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
            prop["default"] = value
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _add_factory_defaults(annotation, prop)


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    resolved = _resolve(raw, defs)
    structural = _structural(resolved)
    _add_factory_defaults(model, structural)
    return structural


def open_api_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema (a fresh copy: callers may change it)."""
    return copy.deepcopy(cached_open_api_schema())


@functools.cache
def cached_open_api_schema() -> dict[str, Any]:
    """Built once per process; shared, so never modify what this returns."""
    spec = model_schema(models.PostgresClusterSpec)
    spec["default"] = {}
    status = model_schema(models.PostgresClusterStatus)
    return {
        "type": "object",
        "description": "A highly available PostgreSQL cluster on BOSH VMs.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {"rule": NAME_RULE.rule, "message": NAME_RULE.message, "fieldPath": ".metadata.name"}
        ],
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Instances", "type": "integer", "jsonPath": ".spec.instances", "description": "Instances asked for"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyInstances", "description": "Instances running"},
    {"name": "Primary", "type": "string", "jsonPath": ".status.currentPrimary", "description": "Current primary"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{models.PLURAL}.{models.GROUP}"},
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": list(models.SHORT_NAMES),
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.instances",
                            "statusReplicasPath": ".status.instanceCount",
                        },
                    },
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `pgbosh crd` from controller/api/models.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
