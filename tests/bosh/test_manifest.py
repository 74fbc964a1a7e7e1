"""The manifest builder: pure, deterministic, in the shape of docs/local-world.md."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from controller.api.models import PostgresClusterSpec
from controller.bosh.config import BoshConfig, RepmgrTimings
from controller.bosh.manifest import (
    DNS_LABEL_MAX,
    check_against_cloud_config,
    consul_service_name,
    deployment_name,
    interpolate,
    manifests_equal,
    render_manifest,
)
from controller.bosh.types import CloudConfig


def spec(**fields: Any) -> PostgresClusterSpec:
    return PostgresClusterSpec.model_validate(fields)


def rendered(
    s: PostgresClusterSpec, config: BoshConfig | None = None, ns: str = "default", name: str = "demo"
) -> dict[str, Any]:
    doc = yaml.safe_load(render_manifest(ns, name, s, config or BoshConfig()))
    assert isinstance(doc, dict)
    return doc


def group(doc: dict[str, Any]) -> dict[str, Any]:
    groups = doc["instance_groups"]
    assert len(groups) == 1
    g: dict[str, Any] = groups[0]
    return g


def props(doc: dict[str, Any]) -> dict[str, Any]:
    jobs = group(doc)["jobs"]
    assert [j["name"] for j in jobs] == ["postgres"]
    p: dict[str, Any] = jobs[0]["properties"]
    return p


def test_defaults_give_the_local_world_manifest() -> None:
    doc = rendered(spec())
    assert doc["name"] == "pgbosh-default-demo"
    assert doc["releases"] == [{"name": "pgbosh", "version": "0.1.0"}]
    assert doc["stemcells"] == [{"alias": "default", "os": "ubuntu-jammy", "version": "latest"}]
    assert doc["update"] == {
        "canaries": 1,
        "max_in_flight": 1,
        "canary_watch_time": "1000-120000",
        "update_watch_time": "1000-120000",
        "serial": True,
    }
    g = group(doc)
    assert g["name"] == "postgres"
    assert g["azs"] == ["z1", "z2", "z3"]
    assert g["instances"] == 3
    assert g["vm_type"] == "small"
    assert g["stemcell"] == "default"
    assert g["persistent_disk"] == 10240
    assert "persistent_disk_type" not in g
    assert g["networks"] == [{"name": "default"}]
    assert g["jobs"][0]["release"] == "pgbosh"
    p = props(doc)
    assert p["postgres"] == {
        "major_version": 15,
        "port": 5432,
        "parameters": {},
        "replication": {"mode": "async", "sync_standbys": 1},
        "admin_user": "pgbosh_admin",
        "admin_password": "((admin_password))",
        "replication_password": "((replication_password))",
        "databases": [{"name": "app"}],
    }
    assert p["repmgr"] == {
        "monitor_interval_secs": 1,
        "reconnect_attempts": 2,
        "reconnect_interval": 1,
        "failover": "automatic",
        "priority_by_index": True,
    }
    assert p["consul"] == {"service": "pg-default-demo", "http_addr": "http://127.0.0.1:8500"}
    assert doc["variables"] == [
        {"name": "admin_password", "type": "password"},
        {"name": "replication_password", "type": "password"},
    ]


def test_top_level_keys_come_in_manifest_order() -> None:
    text = render_manifest("default", "demo", spec(), BoshConfig())
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "-"))]
    assert keys == ["name", "releases", "stemcells", "update", "instance_groups", "variables"]


def test_same_spec_gives_byte_identical_yaml_whatever_the_parameter_order() -> None:
    a = spec(parameters={"work_mem": "4MB", "max_connections": "200", "log_min_duration_statement": "250"})
    b = spec(parameters={"log_min_duration_statement": "250", "max_connections": "200", "work_mem": "4MB"})
    first = render_manifest("ns", "c", a, BoshConfig())
    assert first == render_manifest("ns", "c", a, BoshConfig())
    assert first == render_manifest("ns", "c", b, BoshConfig())
    names = list(props(yaml.safe_load(first))["postgres"]["parameters"])
    assert names == sorted(names)


def test_parameters_stay_strings_in_yaml() -> None:
    doc = rendered(spec(parameters={"max_connections": "200", "jit": "off", "random_page_cost": "1.1"}))
    assert props(doc)["postgres"]["parameters"] == {
        "max_connections": "200",
        "jit": "off",
        "random_page_cost": "1.1",
    }


@pytest.mark.parametrize(
    ("size", "mb"),
    [("10Gi", 10240), ("512Mi", 512), ("1Ti", 1048576), ("10G", 9537), ("1.5Gi", 1536), ("1000Mi", 1000)],
)
def test_storage_size_becomes_persistent_disk_in_mb(size: str, mb: int) -> None:
    g = group(rendered(spec(storage={"size": size})))
    assert g["persistent_disk"] == mb
    assert "persistent_disk_type" not in g


def test_disk_type_becomes_persistent_disk_type() -> None:
    g = group(rendered(spec(storage={"diskType": "50GB"})))
    assert g["persistent_disk_type"] == "50GB"
    assert "persistent_disk" not in g


def test_sync_replication_is_passed_on() -> None:
    doc = rendered(spec(instances=5, replication={"mode": "sync", "syncStandbys": 2}))
    assert props(doc)["postgres"]["replication"] == {"mode": "sync", "sync_standbys": 2}
    assert group(doc)["instances"] == 5


def test_instances_vm_type_azs_and_version_come_from_the_spec() -> None:
    doc = rendered(spec(instances=2, vmType="large", azs=["z2", "z1"], postgresVersion=17))
    g = group(doc)
    assert (g["instances"], g["vm_type"], g["azs"]) == (2, "large", ["z2", "z1"])
    assert props(doc)["postgres"]["major_version"] == 17


def test_names_release_and_network_come_from_configuration() -> None:
    config = BoshConfig(
        release_name="postgres-ha",
        release_version="3.2.1",
        stemcell_os="ubuntu-noble",
        stemcell_version="1.50",
        network="db",
        instance_group="pg",
        job_name="pg-node",
        consul_http_addr="",
        repmgr=RepmgrTimings(monitor_interval_secs=2, reconnect_attempts=6, reconnect_interval=5),
    )
    doc = rendered(spec(), config)
    assert doc["releases"] == [{"name": "postgres-ha", "version": "3.2.1"}]
    assert doc["stemcells"] == [{"alias": "default", "os": "ubuntu-noble", "version": "1.50"}]
    g = group(doc)
    assert g["name"] == "pg"
    assert g["networks"] == [{"name": "db"}]
    assert g["jobs"][0]["name"] == "pg-node"
    assert g["jobs"][0]["release"] == "postgres-ha"
    p = g["jobs"][0]["properties"]
    assert p["consul"]["http_addr"] == ""
    assert p["repmgr"]["reconnect_attempts"] == 6


def test_consul_token_placeholder_only_when_configured() -> None:
    assert "token" not in props(rendered(spec()))["consul"]
    assert props(rendered(spec(), BoshConfig(consul_token=True)))["consul"]["token"] == "((consul_token))"


def test_tls_adds_a_ca_and_a_server_certificate_signed_by_it() -> None:
    doc = rendered(spec(), BoshConfig(tls=True), ns="prod", name="orders")
    by_name = {v["name"]: v for v in doc["variables"]}
    ca = by_name["postgres_tls_ca"]
    server = by_name["postgres_tls"]
    assert ca["type"] == "certificate" and ca["options"]["is_ca"] is True
    assert server["type"] == "certificate"
    assert server["options"]["ca"] == "postgres_tls_ca"
    assert "master.pg-prod-orders.service.consul" in server["options"]["alternative_names"]
    assert props(doc)["postgres"]["tls"] == {
        "ca": "((postgres_tls.ca))",
        "certificate": "((postgres_tls.certificate))",
        "private_key": "((postgres_tls.private_key))",
    }
    assert "tls" not in props(rendered(spec()))["postgres"]


def test_deployment_name() -> None:
    assert deployment_name("team-a", "orders") == "pgbosh-team-a-orders"
    assert rendered(spec(), ns="team-a", name="orders")["name"] == "pgbosh-team-a-orders"


def test_service_name_is_the_plain_label_when_it_fits() -> None:
    assert consul_service_name("default", "demo") == "pg-default-demo"


def test_long_service_name_is_cut_to_a_dns_label_with_a_hash() -> None:
    ns, name = "n" * 63, "c" * 120
    label = consul_service_name(ns, name)
    assert len(label) == DNS_LABEL_MAX
    assert label.startswith("pg-nnnn")
    assert label[-9] == "-" and all(ch in "0123456789abcdef" for ch in label[-8:])
    # Two clusters that share the first 54 characters still get different services.
    assert consul_service_name(ns, name + "x") != label
    assert consul_service_name(ns, name) == label  # and it is stable


def test_service_name_at_exactly_63_characters_has_no_hash() -> None:
    name = "c" * (63 - len("pg-ns-"))
    assert consul_service_name("ns", name) == f"pg-ns-{name}"
    assert len(consul_service_name("ns", name + "c")) == 63
    assert consul_service_name("ns", name + "c") != f"pg-ns-{name}c"[:63]


def test_names_that_are_not_dns_labels_are_made_safe_and_kept_apart() -> None:
    dotted = consul_service_name("default", "db.v2")
    dashed = consul_service_name("default", "db-v2")
    assert dashed == "pg-default-db-v2"
    assert dotted != dashed
    assert all(ch.isalnum() or ch == "-" for ch in dotted) and dotted == dotted.lower()
    assert not dotted.startswith("-") and not dotted.endswith("-")


def test_interpolate_fills_named_placeholders_only() -> None:
    text = render_manifest("default", "demo", spec(), BoshConfig())
    password = "p: 'x' #\"y\" ((not-a-var))"
    out = interpolate(text, {"admin_password": password})
    postgres = props(yaml.safe_load(out))["postgres"]
    assert postgres["admin_password"] == password
    assert postgres["replication_password"] == "((replication_password))"
    assert "((admin_password))" not in out
    assert "((admin_password))" in text  # the rendered manifest keeps the placeholder


def test_interpolate_leaves_the_rest_byte_identical() -> None:
    text = render_manifest("default", "demo", spec(parameters={"work_mem": "4MB"}), BoshConfig())
    assert interpolate(text, {}) == text


def test_manifests_equal_compares_meaning_not_bytes() -> None:
    text = render_manifest("default", "demo", spec(), BoshConfig())
    reordered = yaml.safe_dump(yaml.safe_load(text), sort_keys=True, default_flow_style=True)
    assert reordered != text
    assert manifests_equal(text, reordered)
    assert not manifests_equal(text, render_manifest("default", "demo", spec(instances=5), BoshConfig()))
    assert not manifests_equal(
        text, render_manifest("default", "demo", spec(storage={"size": "20Gi"}), BoshConfig())
    )


CLOUD = CloudConfig(
    azs=("z1", "z2", "z3"),
    vm_types=("small", "medium"),
    disk_types={"10GB": 10240, "50GB": 51200},
    networks=("default",),
)


def test_a_spec_that_fits_the_cloud_config_has_no_problems() -> None:
    assert check_against_cloud_config(spec(storage={"diskType": "10GB"}), CLOUD, BoshConfig()) == []


def test_unknown_vm_type_disk_type_and_azs_are_named_with_what_exists() -> None:
    problems = check_against_cloud_config(
        spec(vmType="huge", storage={"diskType": "1TB"}, azs=["z1", "z4", "z9"]), CLOUD
    )
    assert problems == [
        "vmType 'huge' is not a vm_type of the BOSH cloud config (it has: medium, small)",
        "storage.diskType '1TB' is not a disk_type of the BOSH cloud config (it has: 10GB, 50GB)",
        "azs: z4, z9 are not AZs of the BOSH cloud config (it has: z1, z2, z3)",
    ]


def test_one_unknown_az_and_an_empty_cloud_config() -> None:
    problems = check_against_cloud_config(spec(azs=["z1"]), CloudConfig())
    assert problems == [
        "vmType 'small' is not a vm_type of the BOSH cloud config (it has: none)",
        "azs: z1 is not an AZ of the BOSH cloud config (it has: none)",
    ]


def test_the_configured_network_is_checked_when_config_is_given() -> None:
    problems = check_against_cloud_config(spec(), CLOUD, BoshConfig(network="db"))
    assert problems == [
        "network 'db' (operator configuration) is not a network of the BOSH cloud config (it has: default)"
    ]
