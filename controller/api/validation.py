"""Admission as the Kubernetes API server does it for our CRD: defaults, schema, CEL.

Used by the local Kubernetes API (so `pgbosh dev` and kubectl users see the same
refusals a real cluster gives) and by the tests of the bad-input corpus. The
schema is the generated openAPIV3Schema, checked with a JSON-schema validator;
the CEL rules are evaluated with the Rust CEL implementation's Python binding
(common-expression-language, ~20 us a rule where cel-python took ~1 ms), with the
Kubernetes quantity functions the rules use added.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from typing import Any

import cel
import fastjsonschema
import jsonschema

from controller.api import crd, models


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class Invalid(Exception):
    """What a Kubernetes API server answers with 422: every field error, in one message."""

    def __init__(self, kind: str, name: str, errors: list[FieldError]) -> None:
        self.kind = kind
        self.name = name
        self.errors = errors
        details = "; ".join(str(e) for e in errors)
        super().__init__(f'{kind}.{models.GROUP} "{name}" is invalid: {details}')


def _cel_quantity(value: Any) -> int:
    """Kubernetes' quantity(): the rules compare sizes, so a quantity is its value in bytes."""
    return models.quantity_bytes(str(value))


def _cel_compare_to(left: Any, right: Any) -> int:
    a, b = int(left), int(right)
    return (a > b) - (a < b)


_CEL_FUNCTIONS: dict[str, Any] = {"quantity": _cel_quantity, "compareTo": _cel_compare_to}
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = cel.compile(rule)
    return _PROGRAMS[rule]


def _context(activation: dict[str, Any]) -> Any:
    """The variables (converted to CEL once) and functions the rules of one node share."""
    context = cel.Context()
    for name, value in activation.items():
        context.add_variable(name, value)
    for name, function in _CEL_FUNCTIONS.items():
        context.add_function(name, function)
    return context


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: fill missing properties that have a default, recursively."""
    if not isinstance(value, dict) or schema.get("type") != "object":
        if isinstance(value, list) and "items" in schema:
            return [apply_defaults(schema["items"], v) for v in value]
        return value
    out = dict(value)
    for name, sub in schema.get("properties", {}).items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = apply_defaults(sub, out[name])
    if isinstance(schema.get("additionalProperties"), dict):
        for key in list(out):
            out[key] = apply_defaults(schema["additionalProperties"], out[key])
    return out


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd.cached_open_api_schema())


@functools.cache
def _fast_check() -> Any:
    """The CRD schema compiled to Python code (fastjsonschema): ~10 us an object where
    jsonschema takes ~300 us. It only says valid or not; a refusal is explained by jsonschema,
    which lists every error (tests/api checks the two agree on the bad-input corpus)."""
    return fastjsonschema.compile(crd.cached_open_api_schema())


def _schema_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[FieldError]:
    if schema is crd.cached_open_api_schema():
        try:
            _fast_check()(obj)
            return []
        except fastjsonschema.JsonSchemaException:
            validator = _validator()
    else:
        validator = jsonschema.Draft7Validator(schema)
    errors = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = _path(err.absolute_path)
        if err.validator == "enum":
            allowed = ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in err.validator_value)
            message = f"Unsupported value: {err.instance!r}: supported values: {allowed}"
        elif err.validator in ("maximum", "minimum"):
            word = "less than or equal to" if err.validator == "maximum" else "greater than or equal to"
            message = f"Invalid value: {err.instance!r}: {path} in body should be {word} {err.validator_value}"
        elif err.validator == "pattern":
            message = f"Invalid value: {err.instance!r}: {path} in body should match '{err.validator_value}'"
        elif err.validator == "type":
            message = (
                f"Invalid value: {type(err.instance).__name__} {err.instance!r}: "
                f"{path} in body must be of type {err.validator_value}"
            )
        elif err.validator in ("minItems", "maxItems"):
            word = "at least" if err.validator == "minItems" else "at most"
            message = (
                f"Invalid value: {len(err.instance)}: {path} in body should have {word} {err.validator_value} items"
            )
        elif err.validator == "required":
            message = f"Required value: {err.message}"
        else:
            message = f"Invalid value: {err.message}"
        errors.append(FieldError(path, message))
    return errors


def _unknown_fields(schema: dict[str, Any], value: Any, path: str) -> list[FieldError]:
    """Strict field validation (kubectl's default): unknown fields are errors, not silently pruned."""
    errors: list[FieldError] = []
    if schema.get("type") == "object" and isinstance(value, dict):
        props = schema.get("properties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for key, sub_value in value.items():
                sub_path = f"{path}.{key}" if path else key
                if key not in props:
                    if path != "metadata":
                        errors.append(FieldError("", f'unknown field "{sub_path}"'))
                else:
                    errors.extend(_unknown_fields(props[key], sub_value, sub_path))
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, sub_value in value.items():
                errors.extend(_unknown_fields(schema["additionalProperties"], sub_value, f"{path}[{key}]"))
    elif schema.get("type") == "array" and isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors.extend(_unknown_fields(schema["items"], item, f"{path}[{i}]"))
    return errors


def _set_duplicates(schema: dict[str, Any], value: Any, path: str) -> list[FieldError]:
    """x-kubernetes-list-type: set means no duplicates (the API server says "Duplicate value")."""
    errors: list[FieldError] = []
    if schema.get("type") == "array" and isinstance(value, list):
        if schema.get("x-kubernetes-list-type") == "set":
            seen: list[Any] = []
            for i, item in enumerate(value):
                if item in seen:
                    errors.append(FieldError(f"{path}[{i}]", f"Duplicate value: {json.dumps(item)}"))
                seen.append(item)
        for i, item in enumerate(value):
            errors.extend(_set_duplicates(schema.get("items", {}), item, f"{path}[{i}]"))
    elif schema.get("type") == "object" and isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors.extend(_set_duplicates(sub, value[name], f"{path}.{name}" if path else name))
    return errors


def _cel_root(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    """What root-level rules see: of the metadata, only name and generateName, as in
    Kubernetes (labels, annotations and the rest are not exposed to CEL)."""
    if obj is None:
        return None
    meta = obj.get("metadata") or {}
    return {**obj, "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}


def _cel_errors(schema: dict[str, Any], value: Any, old: Any, path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    if value is None:
        return errors
    contexts: dict[bool, Any] = {}  # with and without oldSelf
    for rule in schema.get("x-kubernetes-validations", []):
        text = rule["rule"]
        if "oldSelf" in text and old is None:
            continue  # transition rules apply to updates only
        if "oldSelf" not in text and old is not None and value == old:
            # Validation ratcheting (KEP-4008, on by default since Kubernetes 1.30, GA in 1.33):
            # on an update, errors of a rule without oldSelf on an unchanged value are
            # ignored, so the rule need not run.
            continue
        transition = "oldSelf" in text
        if transition not in contexts:
            contexts[transition] = _context({"self": value, "oldSelf": old} if transition else {"self": value})
        try:
            result = _program(text).execute(contexts[transition])
        except Exception as exc:  # a rule that cannot be evaluated refuses, as the API server does
            errors.append(FieldError(path, f"Invalid value: rule {text!r} could not be evaluated: {exc}"))
            continue
        if not bool(result):
            where = path + rule.get("fieldPath", "") if rule.get("fieldPath") else path
            errors.append(FieldError(where.lstrip("."), f"Invalid value: {rule['message']}"))
    if schema.get("type") == "object" and isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                old_sub = old.get(name) if isinstance(old, dict) else None
                errors.extend(_cel_errors(sub, value[name], old_sub, f"{path}.{name}" if path else name))
    return errors


@functools.cache
def _status_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd.cached_open_api_schema()["properties"]["status"])


def admit_status(obj: dict[str, Any]) -> None:
    """A write to the status subresource: only the status is checked (against its schema)."""
    status = obj.get("status")
    if status is None:
        return
    errors = [
        FieldError(_path(["status", *err.absolute_path]), f"Invalid value: {err.message}")
        for err in _status_validator().iter_errors(status)
    ]
    if errors:
        raise Invalid(models.KIND, str((obj.get("metadata") or {}).get("name", "")), errors)


def admit(obj: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    """Default and validate a PostgresCluster as the API server would; raise Invalid.

    Returns the defaulted object. Status is not validated against transition rules
    (it is written by pgbosh through the status subresource).
    """
    schema = crd.cached_open_api_schema()
    name = str((obj.get("metadata") or {}).get("name", ""))
    defaulted = apply_defaults(schema, obj)
    errors = _unknown_fields(schema, defaulted, "")
    errors += _schema_errors(schema, defaulted)
    errors += _set_duplicates(schema, defaulted, "")
    if not errors:
        old_defaulted = apply_defaults(schema, old) if old is not None else None
        errors += _cel_errors(schema, _cel_root(defaulted), _cel_root(old_defaulted), "")
    if errors:
        raise Invalid(models.KIND, name, errors)
    result: dict[str, Any] = defaulted
    return result
