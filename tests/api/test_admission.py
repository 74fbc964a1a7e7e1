"""How admission runs the CEL rules: each rule sees only the fields it reads, outcomes are
remembered by those fields, and neither changes what is accepted or refused."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import pytest
import yaml

from controller.api import crd, validation
from controller.api.validation import Invalid, admit

BAD = sorted((Path(__file__).parent / "bad").glob("*.yaml"))
GOOD = {
    "apiVersion": "pgbosh.dev/v1alpha1",
    "kind": "PostgresCluster",
    "metadata": {"name": "orders", "namespace": "default", "labels": {"team": "a"}},
    "spec": {"instances": 3, "storage": {"size": "10Gi"}, "replication": {"mode": "sync", "syncStandbys": 1}},
}


@pytest.mark.parametrize(
    ("rule", "variable", "fields"),
    [
        ("self.replication.mode != 'sync' || self.instances >= 2", "self", {"replication", "instances"}),
        ("has(self.size) != has(self.diskType)", "self", {"size", "diskType"}),
        ("self.postgresVersion >= oldSelf.postgresVersion", "self", {"postgresVersion"}),
        ("self.postgresVersion >= oldSelf.postgresVersion", "oldSelf", {"postgresVersion"}),
        ("self.parameters.all(k, k != 'port')", "self", {"parameters"}),
        ("size(self.metadata.name) <= 40", "self", {"metadata"}),
        ("self.x.size() > 0", "self", {"x"}),
        # The whole value: a macro or method on it, or the value itself.
        ("self.all(k, k.matches('^[a-z]+$'))", "self", None),
        ("self.size() > 1", "self", None),
        ("self == oldSelf", "self", None),
        ("size(self) <= 3", "self", None),
        ("has(self.a) && self != {}", "self", None),
        # A variable the rule does not read at all.
        ("self.a > 1", "oldSelf", set()),
    ],
)
def test_a_rule_reads_the_fields_it_names(rule: str, variable: str, fields: set[str] | None) -> None:
    read = validation._fields_read(rule, variable)
    assert read == (None if fields is None else frozenset(fields))


def test_rules_refuse_the_same_with_the_outcomes_remembered() -> None:
    """Every bad manifest is refused with the same errors on a cold and a warm memo, and a
    good one is accepted between them (outcomes are kept per node and per field values)."""
    validation._OUTCOMES.clear()
    cold = {}
    for path in BAD:
        with pytest.raises(Invalid) as refused:
            admit(yaml.safe_load(path.read_text()))
        cold[path.name] = [str(e) for e in refused.value.errors]
    assert validation._OUTCOMES, "the outcomes were not remembered"
    admit(copy.deepcopy(GOOD))
    for path in BAD:
        with pytest.raises(Invalid) as refused:
            admit(yaml.safe_load(path.read_text()))
        assert [str(e) for e in refused.value.errors] == cold[path.name], path.name


def test_values_that_compare_equal_in_python_are_told_apart() -> None:
    """1, 1.0 and true are equal in Python but not in CEL or JSON: the memo must not mix them."""
    schema = {
        "type": "object",
        "properties": {"v": {}},
        "x-kubernetes-validations": [{"rule": "type(self.v) == int", "message": "v must be an int"}],
    }
    validation._OUTCOMES.clear()
    for value, refused in [(1, False), (True, True), (1.0, True), (1, False)]:
        errors = validation._cel_errors(schema, {"v": value}, None, "")
        assert [str(e) for e in errors] == (["Invalid value: v must be an int"] if refused else []), value


def test_memo_keys_tell_nan_null_and_dates_apart() -> None:
    """orjson writes NaN as null and dates as strings; the memo's key must not."""
    assert validation._key({"v": float("nan")}) != validation._key({"v": None})
    assert validation._key({"b": 1, "a": [None, 1.0]}) == b'{"a":[null,1.0],"b":1}'
    with pytest.raises(TypeError):
        validation._key({"v": datetime.date(2026, 11, 26)})
    with pytest.raises(TypeError):
        validation._key({"v": datetime.datetime(2026, 11, 26, tzinfo=datetime.UTC)})


def test_transition_rules_see_the_old_object() -> None:
    old = admit(copy.deepcopy(GOOD))
    admit({**GOOD, "spec": {**GOOD["spec"], "storage": {"size": "20Gi"}}}, old)
    for _ in range(2):  # cold, then remembered
        with pytest.raises(Invalid) as refused:
            admit({**GOOD, "spec": {**GOOD["spec"], "storage": {"size": "5Gi"}}}, old)
        assert "storage.size may not shrink" in str(refused.value)


def test_admission_does_not_change_its_input() -> None:
    given = copy.deepcopy(GOOD)
    admitted = admit(given)
    assert given == GOOD
    assert admitted["spec"]["postgresVersion"] and "postgresVersion" not in given["spec"]


def test_the_closed_schema_refuses_unknown_fields_and_set_duplicates() -> None:
    closed = validation._closed(crd.cached_open_api_schema())
    spec = closed["properties"]["spec"]
    assert spec["additionalProperties"] is False
    assert spec["properties"]["azs"]["uniqueItems"] is True
    assert "additionalProperties" not in closed["properties"]["metadata"]  # metadata stays open
    assert isinstance(spec["properties"]["parameters"]["additionalProperties"], dict)  # a map stays a map


def test_a_remembered_body_still_has_its_name_checked() -> None:
    """Bodies admitted once are remembered without their metadata: the root rules, which read
    the name, must still run for every object."""
    validation._ADMITTED.clear()
    admit(copy.deepcopy(GOOD))
    assert validation._ADMITTED, "the admitted body was not remembered"
    long_name = {**copy.deepcopy(GOOD), "metadata": {"name": "x" * 41, "namespace": "default"}}
    with pytest.raises(Invalid) as refused:
        admit(long_name)
    assert [str(e) for e in refused.value.errors] == [
        "metadata.name: Invalid value: metadata.name may have at most 40 characters: "
        "it becomes part of the BOSH deployment and Consul DNS names"
    ]
    validation._ADMITTED.clear()
    with pytest.raises(Invalid) as cold:
        admit(long_name)
    assert [str(e) for e in cold.value.errors] == [str(e) for e in refused.value.errors]


def test_remembered_admissions_are_fresh_objects_with_their_own_metadata() -> None:
    validation._ADMITTED.clear()
    first = admit(copy.deepcopy(GOOD))
    first["spec"]["storage"]["size"] = "1Ti"
    first["spec"]["azs"].append("z9")
    other = {**copy.deepcopy(GOOD), "metadata": {"name": "billing", "labels": {"team": "b"}}}
    second = admit(other)
    assert second["spec"]["storage"] == {"size": "10Gi"} and second["spec"]["azs"] == ["z1", "z2", "z3"]
    assert second["metadata"] is other["metadata"]
    assert second == {**admit(copy.deepcopy(other)), "metadata": other["metadata"]}
    assert "postgresVersion" not in other["spec"], "the input was changed"


def test_an_update_is_remembered_with_its_old_object() -> None:
    """The same new body is allowed after one old object and refused after another (a
    transition rule): the memo is keyed by both."""
    validation._ADMITTED.clear()
    small = admit(copy.deepcopy(GOOD))
    large = admit({**copy.deepcopy(GOOD), "spec": {**GOOD["spec"], "storage": {"size": "20Gi"}}})
    target = {**copy.deepcopy(GOOD), "spec": {**GOOD["spec"], "storage": {"size": "15Gi"}}}
    admit(copy.deepcopy(target), small)
    admit(copy.deepcopy(target), small)  # remembered
    with pytest.raises(Invalid) as refused:
        admit(copy.deepcopy(target), large)
    assert "storage.size may not shrink" in str(refused.value)


def test_metadata_that_is_not_an_object_is_refused_with_a_warm_memo() -> None:
    validation._ADMITTED.clear()
    admit(copy.deepcopy(GOOD))
    with pytest.raises(Invalid) as refused:
        admit({**copy.deepcopy(GOOD), "metadata": "orders"})
    assert "metadata" in str(refused.value)
