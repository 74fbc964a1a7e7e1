"""Broker configuration: target namespace and the catalog, loaded from YAML.

Plans carry a ``cluster`` block of PostgresCluster spec fields; the catalog the
platform sees is rendered from the same models, so what a plan promises and
what provisioning writes cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema.protocols import Validator
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from controller.api.models import PostgresClusterSpec

DEFAULT_CONFIG = Path(__file__).with_name("catalog.yaml")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MaintenanceInfo(_Config):
    version: str
    description: str | None = None


class Plan(_Config):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str
    free: bool = True
    bindable: bool | None = None
    plan_updateable: bool | None = None
    maintenance_info: MaintenanceInfo | None = None
    maximum_polling_duration: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    # PostgresCluster spec fields (camelCase, as in the CRD) this plan fixes.
    cluster: dict[str, Any]
    # Overrides the service's parameters_schema for this plan.
    parameters_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _cluster_is_a_valid_spec(self) -> Plan:
        PostgresClusterSpec.model_validate(self.cluster)
        return self


class Service(_Config):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    description: str
    bindable: bool = True
    instances_retrievable: bool = True
    bindings_retrievable: bool = True
    plan_updateable: bool = True
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    parameters_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    plans: list[Plan] = Field(min_length=1)

    def plan(self, plan_id: str) -> Plan | None:
        return next((p for p in self.plans if p.id == plan_id), None)

    def plan_updateable_from(self, plan: Plan) -> bool:
        return self.plan_updateable if plan.plan_updateable is None else plan.plan_updateable


class Catalog(_Config):
    services: list[Service] = Field(min_length=1)


class BrokerConfig(_Config):
    namespace: str = Field(default="default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    retry_after: int = Field(default=5, ge=1)
    catalog: Catalog

    _validators: dict[str, Validator] = PrivateAttr(default_factory=dict)
    # Plans whose schema accepts no parameters at all: most requests send none.
    _empty_ok: set[str] = PrivateAttr(default_factory=set)

    @model_validator(mode="after")
    def _unique_ids_and_schemas(self) -> BrokerConfig:
        ids = [s.id for s in self.catalog.services] + [p.id for s in self.catalog.services for p in s.plans]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"catalog ids must be unique: {', '.join(duplicates)}")
        for service in self.catalog.services:
            for plan in service.plans:
                schema = self.parameters_schema(service, plan)
                cls = jsonschema.validators.validator_for(schema)
                cls.check_schema(schema)
                self._validators[plan.id] = cls(schema)
                if self._validators[plan.id].is_valid({}):
                    self._empty_ok.add(plan.id)
        return self

    @classmethod
    def load(cls, path: str | Path | None = None) -> BrokerConfig:
        source = Path(path) if path is not None else DEFAULT_CONFIG
        return cls.model_validate(yaml.safe_load(source.read_text()))

    def service(self, service_id: str) -> Service | None:
        return next((s for s in self.catalog.services if s.id == service_id), None)

    @staticmethod
    def parameters_schema(service: Service, plan: Plan) -> dict[str, Any]:
        return plan.parameters_schema if plan.parameters_schema is not None else service.parameters_schema

    def parameter_errors(self, plan: Plan, parameters: Any) -> list[str]:
        """Why ``parameters`` fail the plan's JSON Schema (empty when they pass)."""
        if parameters == {} and plan.id in self._empty_ok:
            return []
        validator = self._validators[plan.id]
        errors = sorted(validator.iter_errors(parameters), key=lambda e: list(e.absolute_path))
        return [f"{'/'.join(str(p) for p in e.absolute_path) or 'parameters'}: {e.message}" for e in errors]

    def catalog_document(self) -> dict[str, Any]:
        """The ``GET /v2/catalog`` body."""
        services = []
        for service in self.catalog.services:
            plans = []
            for plan in service.plans:
                schema = self.parameters_schema(service, plan)
                rendered: dict[str, Any] = {
                    "id": plan.id,
                    "name": plan.name,
                    "description": plan.description,
                    "free": plan.free,
                    "metadata": {**plan.metadata, "cluster": plan.cluster},
                    "schemas": {
                        "service_instance": {
                            "create": {"parameters": schema},
                            "update": {"parameters": schema},
                        },
                    },
                }
                for optional in ("bindable", "plan_updateable", "maximum_polling_duration"):
                    value = getattr(plan, optional)
                    if value is not None:
                        rendered[optional] = value
                if plan.maintenance_info is not None:
                    rendered["maintenance_info"] = plan.maintenance_info.model_dump(exclude_none=True)
                plans.append(rendered)
            services.append(
                {
                    "id": service.id,
                    "name": service.name,
                    "description": service.description,
                    "bindable": service.bindable,
                    "instances_retrievable": service.instances_retrievable,
                    "bindings_retrievable": service.bindings_retrievable,
                    "plan_updateable": service.plan_updateable,
                    "tags": service.tags,
                    "metadata": service.metadata,
                    "plans": plans,
                }
            )
        return {"services": services}
