"""The bad-input corpus: every manifest is refused with a message that says what to fix.

Each file in bad/ starts with `# expect: <text>`. It is checked twice: against the
CRD's generated schema and CEL rules directly, and through the real kubectl against
the local Kubernetes API, which must refuse it and store nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import kubectl

from controller.api.validation import Invalid, admit

BAD = sorted((Path(__file__).parent / "bad").glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: '"
    return first.removeprefix("# expect: ")


def test_the_corpus_is_large_enough() -> None:
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_schema_and_cel_refuse_it(path: Path) -> None:
    with pytest.raises(Invalid) as refused:
        admit(yaml.safe_load(path.read_text()))
    assert expectation(path) in str(refused.value)


async def test_kubectl_apply_refuses_every_bad_manifest_and_stores_nothing(kube_api) -> None:
    _, _, kubeconfig = kube_api
    for path in BAD:
        code, out, err = await kubectl(kubeconfig, "apply", "-f", str(path))
        assert code != 0, f"{path.name} was accepted: {out}"
        assert expectation(path) in err, f"{path.name}: kubectl said {err!r}"
    code, out, err = await kubectl(kubeconfig, "get", "pgc", "-o", "name")
    assert code == 0 and out.strip() == "", out


GOOD = {
    "apiVersion": "pgbosh.dev/v1alpha1",
    "kind": "PostgresCluster",
    "metadata": {"name": "grow", "namespace": "default"},
    "spec": {"postgresVersion": 16, "storage": {"size": "10Gi"}},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"storage": {"size": "5Gi"}}, "storage.size may not shrink (BOSH can only grow a persistent disk)"),
        ({"postgresVersion": 15}, "postgresVersion may not go down"),
    ],
)
async def test_updates_that_cannot_work_are_refused_and_the_old_spec_stays(kube_api, change, message) -> None:
    _, _, kubeconfig = kube_api
    code, _, err = await kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(GOOD))
    assert code == 0, err
    changed = {**GOOD, "spec": {**GOOD["spec"], **change}}
    code, _, err = await kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(changed))
    assert code != 0 and message in err, err
    code, out, _ = await kubectl(kubeconfig, "get", "pgc", "grow", "-o", "yaml")
    spec = yaml.safe_load(out)["spec"]
    assert spec["storage"] == {"size": "10Gi"} and spec["postgresVersion"] == 16
    # Growing the disk and going up a major version are fine.
    grown = {**GOOD, "spec": {"postgresVersion": 17, "storage": {"size": "20Gi"}}}
    code, _, err = await kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(grown))
    assert code == 0, err


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", BAD + EXAMPLES, ids=lambda p: p.name)
def test_the_fast_check_agrees_with_the_explaining_checks(path: Path) -> None:
    """Admission accepts on the word of fastjsonschema (the closed schema: types, bounds,
    unknown fields, set duplicates) and explains refusals with jsonschema and its own walks:
    the two must agree on every document of the corpus and the examples."""
    import fastjsonschema

    from controller.api import crd
    from controller.api.validation import _fast_check, _schema_errors, _set_duplicates, _unknown_fields, apply_defaults

    schema = crd.cached_open_api_schema()
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "PostgresCluster":
            continue
        doc = apply_defaults(schema, doc)
        slow = not (_unknown_fields(schema, doc, "") + _schema_errors(schema, doc) + _set_duplicates(schema, doc, ""))
        try:
            _fast_check()(doc)
            fast = True
        except fastjsonschema.JsonSchemaException:
            fast = False
        assert fast == slow, path.name
