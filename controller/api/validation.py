"""Admission as the Kubernetes API server does it for our CRD: defaults, schema, CEL.

Used by the local Kubernetes API (so `pgbosh dev` and kubectl users see the same
refusals a real cluster gives) and by the tests of the bad-input corpus. The
schema is the generated openAPIV3Schema, checked with a JSON-schema validator;
the CEL rules are evaluated with the Rust CEL implementation's Python binding
(common-expression-language, ~20 us a rule where cel-python took ~1 ms), with the
Kubernetes quantity functions the rules use added.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import cel
import fastjsonschema
import jsonschema
import orjson

from controller import jsonbytes
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


T = TypeVar("T")
_CEL_FUNCTIONS: dict[str, Any] = {"quantity": _cel_quantity, "compareTo": _cel_compare_to}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = cel.compile(rule)
    return _PROGRAMS[rule]


def _fields_read(rule: str, variable: str) -> frozenset[str] | None:
    """The top-level fields of `variable` a rule reads, when it reads it only as
    `variable.field` (None: it uses the whole value, e.g. `self == ...` or `self.all(...)`).

    Converting a value to CEL costs ~1.5 us a string (the binding's conversion), so the rules
    get only the fields they read: for field selection and has(), a map cut down to those
    keys gives the same result as the whole one."""
    fields = set()
    for match in re.finditer(rf"(?<![A-Za-z0-9_.]){variable}\b", rule):
        rest = rule[match.end() :]
        field = _IDENTIFIER.match(rest[1:]) if rest.startswith(".") else None
        if field is None or rest[1 + field.end() :].lstrip().startswith("("):
            return None  # the whole value, or a macro or method called on it
        fields.add(field.group())
    return frozenset(fields)


@dataclass(frozen=True)
class _Rule:
    text: str
    message: str
    field_path: str
    program: Any
    transition: bool  # reads oldSelf: runs on updates only


@dataclass(frozen=True)
class _Node:
    """The CEL rules of one schema node, ready to run, and which of its properties lead to more."""

    rules: tuple[_Rule, ...]
    reads: dict[bool, dict[str, frozenset[str] | None]]  # per transition flag: variable -> fields
    functions: dict[bool, dict[str, Any]]  # per transition flag: the custom functions its rules call
    children: tuple[tuple[str, _Node], ...]


_PER_NODE: dict[tuple[str, int], tuple[dict[str, Any], Any]] = {}  # the schema node kept alive


def _per_node(build: Callable[[dict[str, Any]], T]) -> Callable[[dict[str, Any]], T]:
    """What `build` derives from a schema node, derived once per node (schemas are not hashable:
    they are kept by identity, and alive, with the result)."""

    @functools.wraps(build)
    def cached(schema: dict[str, Any]) -> T:
        key = (build.__name__, id(schema))
        hit = _PER_NODE.get(key)
        if hit is None or hit[0] is not schema:
            hit = _PER_NODE[key] = (schema, build(schema))
        result: T = hit[1]
        return result

    return cached


@_per_node
def _node(schema: dict[str, Any]) -> _Node | None:
    """The rules of this node and of the nodes below it (None: no rule anywhere below)."""
    rules = tuple(
        _Rule(
            text=rule["rule"],
            message=rule.get("message", ""),
            field_path=rule.get("fieldPath", ""),
            program=_program(rule["rule"]),
            transition="oldSelf" in rule["rule"],
        )
        for rule in schema.get("x-kubernetes-validations", [])
    )
    children: list[tuple[str, _Node]] = []
    if schema.get("type") == "object":
        for name, sub_schema in schema.get("properties", {}).items():
            sub = _node(sub_schema)
            if sub is not None:
                children.append((name, sub))
    reads: dict[bool, dict[str, frozenset[str] | None]] = {}
    functions: dict[bool, dict[str, Any]] = {}
    for transition in (False, True):
        # A context with oldSelf serves the transition rules; the others get one without.
        group = [r for r in rules if r.transition == transition]
        variables = ("self", "oldSelf") if transition else ("self",)
        reads[transition] = {}
        for variable in variables:
            read: frozenset[str] | None = frozenset()
            for rule in group:
                fields = _fields_read(rule.text, variable)
                read = None if read is None or fields is None else read | fields
            reads[transition][variable] = read
        functions[transition] = {
            name: fn for name, fn in _CEL_FUNCTIONS.items() if any(f"{name}(" in r.text for r in group)
        }
    return _Node(rules, reads, functions, tuple(children)) if rules or children else None


_OUTCOMES: dict[tuple[int, bool, bytes], dict[str, bool | str]] = {}  # memo of _outcomes, by node and variables
_OUTCOMES_MAX = 4096
_JSON_KEY = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_ORJSON_KEY = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _key(value: Any) -> bytes:
    """The memo key of rule variables: their JSON, keys sorted (1, 1.0 and true differ; the
    json module's spelling of NaN, not orjson's null). Not JSON (a YAML date, say): TypeError."""
    return jsonbytes.dumps(value, _JSON_KEY, option=_ORJSON_KEY, nan_as_fallback=True)


def _outcomes(node: _Node, transition: bool, activation: dict[str, Any]) -> dict[str, bool | str]:
    """Each rule of one group (with or without oldSelf) of a node: passed, failed, or the
    text of the error that stopped its evaluation.

    The variables are cut to the fields the rules read and converted to CEL once for the
    group. Rules are pure functions of their variables, so outcomes are remembered by the
    variables' JSON: most clusters share a few plan-shaped specs."""
    pruned = {}
    for name, value in activation.items():
        fields = node.reads[transition][name]
        pruned[name] = (
            {k: value[k] for k in fields if k in value} if fields is not None and isinstance(value, dict) else value
        )
    try:
        key: tuple[int, bool, bytes] | None = (id(node), transition, _key(pruned))
    except (TypeError, ValueError):  # not JSON (a YAML date, say): evaluate without the memo
        key = None
    if key is not None and key in _OUTCOMES:
        return _OUTCOMES[key]
    context = cel.Context()
    for name, value in pruned.items():
        context.add_variable(name, value)
    for name, function in node.functions[transition].items():
        context.add_function(name, function)
    outcomes: dict[str, bool | str] = {}
    for rule in node.rules:
        if rule.transition == transition:
            try:
                outcomes[rule.text] = bool(rule.program.execute(context))
            except Exception as exc:  # reported as a refusal by the caller, as the API server does
                outcomes[rule.text] = str(exc)
    if key is not None:
        if len(_OUTCOMES) >= _OUTCOMES_MAX:
            _OUTCOMES.clear()
        _OUTCOMES[key] = outcomes
    return outcomes


@_per_node
def _has_defaults(schema: dict[str, Any]) -> bool:
    """Whether defaulting can change a value of this schema node (a default at or below it)."""
    below = [*schema.get("properties", {}).values()]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            below.append(schema[key])
    return any("default" in sub or _has_defaults(sub) for sub in below)


def _json_copy(value: Any) -> Any:
    """A copy of a JSON value (a schema's default): ~5 times as fast as copy.deepcopy."""
    if isinstance(value, dict):
        return {key: _json_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_copy(item) for item in value]
    return value


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: fill missing properties that have a default, recursively.

    The input is not changed: what gets a default is copied; subtrees that no default can
    reach are shared with it."""
    if not _has_defaults(schema):
        return value
    if not isinstance(value, dict) or schema.get("type") != "object":
        if isinstance(value, list) and "items" in schema:
            return [apply_defaults(schema["items"], v) for v in value]
        return value
    out = dict(value)
    for name, sub in schema.get("properties", {}).items():
        if name not in out and "default" in sub:
            out[name] = _json_copy(sub["default"])
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


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as the API server applies it with strict field validation: objects with
    declared properties refuse others (unless they preserve unknown fields), and
    `x-kubernetes-list-type: set` lists refuse duplicates."""
    out = dict(schema)
    if out.get("type") == "object" and "properties" in out:
        out["properties"] = {name: _closed(sub) for name, sub in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _closed(out["additionalProperties"])
    if out.get("type") == "array" and isinstance(out.get("items"), dict):
        out["items"] = _closed(out["items"])
        if out.get("x-kubernetes-list-type") == "set":
            out["uniqueItems"] = True
    return out


@functools.cache
def _fast_check() -> Any:
    """Schema, unknown fields and set duplicates checked at once by the CRD's closed schema
    compiled to Python code (fastjsonschema): ~10 us an object where the explaining walk and
    jsonschema take ~30-300 us. It only says valid or not; a refusal is explained by those,
    which list every error (tests/api checks the two agree on the bad-input corpus)."""
    return fastjsonschema.compile(_closed(crd.cached_open_api_schema()))


def _structural_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[FieldError]:
    """Unknown fields, schema violations and duplicates in sets, in the API server's words."""
    if schema is crd.cached_open_api_schema():
        try:
            _fast_check()(obj)
            return []
        except fastjsonschema.JsonSchemaException:
            pass
    errors = _unknown_fields(schema, obj, "")
    errors += _schema_errors(schema, obj)
    errors += _set_duplicates(schema, obj, "")
    return errors


def _schema_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[FieldError]:
    validator = _validator() if schema is crd.cached_open_api_schema() else jsonschema.Draft7Validator(schema)
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
    node = _node(schema)
    return [] if node is None else _node_errors(node, value, old, path)


def _node_errors(node: _Node, value: Any, old: Any, path: str) -> list[FieldError]:
    errors = _own_errors(node, value, old, path)
    if isinstance(value, dict):
        for name, child in node.children:
            if name in value:
                old_sub = old.get(name) if isinstance(old, dict) else None
                errors.extend(_node_errors(child, value[name], old_sub, f"{path}.{name}" if path else name))
    return errors


def _own_errors(node: _Node, value: Any, old: Any, path: str) -> list[FieldError]:
    """The refusals of one node's own rules (not those of the nodes below it)."""
    errors: list[FieldError] = []
    if value is None:
        return errors
    groups: dict[bool, dict[str, bool | str]] = {}  # outcomes with and without oldSelf
    for rule in node.rules:
        if rule.transition and old is None:
            continue  # transition rules apply to updates only
        if not rule.transition and old is not None and value == old:
            # Validation ratcheting (KEP-4008, on by default since Kubernetes 1.30, GA in 1.33):
            # on an update, errors of a rule without oldSelf on an unchanged value are
            # ignored, so the rule need not run.
            continue
        if rule.transition not in groups:
            activation = {"self": value, "oldSelf": old} if rule.transition else {"self": value}
            groups[rule.transition] = _outcomes(node, rule.transition, activation)
        outcome = groups[rule.transition][rule.text]
        if isinstance(outcome, str):  # a rule that cannot be evaluated refuses, as the API server does
            errors.append(FieldError(path, f"Invalid value: rule {rule.text!r} could not be evaluated: {outcome}"))
        elif not outcome:
            where = path + rule.field_path if rule.field_path else path
            errors.append(FieldError(where.lstrip("."), f"Invalid value: {rule.message}"))
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


# Objects admitted, by everything but their metadata (and the old object's, for an update):
# their defaulted form without metadata. Clusters share a few plan-shaped specs (a broker
# creates many alike), and of the metadata the schema reads only that it is an object and the
# root rules read only the name; so a body admitted once needs only the root rules again.
_ADMITTED: dict[tuple[bytes, bytes | None], bytes] = {}  # as orjson, which copies it back ~10x as fast
_ADMITTED_MAX = 1024


def _without_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "metadata"}


def _admitted_key(
    schema: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None
) -> tuple[bytes, bytes | None] | None:
    """The memo key of an admission (None: not to be remembered: no metadata object, a schema
    that says more of metadata than that it is an object, or a value that is not JSON)."""
    if not isinstance(obj.get("metadata"), dict) or schema["properties"].get("metadata") != {"type": "object"}:
        return None
    try:
        return _key(_without_metadata(obj)), None if old is None else _key(_without_metadata(old))
    except (TypeError, ValueError):
        return None


def admit(obj: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    """Default and validate a PostgresCluster as the API server would; raise Invalid.

    Returns the defaulted object. Status is not validated against transition rules
    (it is written by pgbosh through the status subresource).
    """
    schema = crd.cached_open_api_schema()
    meta = obj.get("metadata")
    name = str(meta.get("name", "")) if isinstance(meta, dict) else ""
    key = _admitted_key(schema, obj, old)
    body = _ADMITTED.get(key) if key is not None else None
    if body is not None:
        # The same body passed schema and every rule below the root: run the root's own
        # rules, which may read the name. A fresh copy: the caller owns what it gets.
        defaulted = {**orjson.loads(body), "metadata": obj["metadata"]}
        root = _node(schema)
        if root is not None:
            old_root = _cel_root(apply_defaults(schema, old)) if old is not None else None
            errors = _own_errors(root, _cel_root(defaulted), old_root, "")
            if errors:
                raise Invalid(models.KIND, name, errors)
        return defaulted
    defaulted = apply_defaults(schema, obj)
    errors = _structural_errors(schema, defaulted)
    if not errors:
        old_defaulted = apply_defaults(schema, old) if old is not None else None
        errors += _cel_errors(schema, _cel_root(defaulted), _cel_root(old_defaulted), "")
    if errors:
        raise Invalid(models.KIND, name, errors)
    if key is not None:
        if len(_ADMITTED) >= _ADMITTED_MAX:
            _ADMITTED.clear()
        body_only = _without_metadata(defaulted)
        try:
            remembered = orjson.dumps(body_only)
        except TypeError:  # an integer beyond 64 bits, say: not remembered
            remembered = None
        if remembered is not None and orjson.loads(remembered) == body_only:
            _ADMITTED[key] = remembered  # only what reads back as it was (NaN would not)
    result: dict[str, Any] = defaulted
    return result
