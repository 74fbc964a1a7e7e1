"""Reading a deployment manifest the way the Director reads it (the subset pgbosh uses).

Everything here is pure: parse and validate against the cloud config, resolve
`((variables))`, and place instances in AZs. Nothing is changed until a manifest has
passed all of it, so a bad manifest fails its task and leaves the world as it was.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import errors

KNOWN_RELEASE = "pgbosh"
KNOWN_JOBS = frozenset({"postgres"})
PASSWORD_LENGTH = 30  # the config server's default password length
_PLACEHOLDER = re.compile(r"\(\(([-\w./:!]+)\)\)")

DEFAULT_CLOUD_CONFIG = """\
azs:
- name: z1
- name: z2
- name: z3
vm_types:
- name: small
  cloud_properties: {cpu: 1, ram: 1024}
- name: medium
  cloud_properties: {cpu: 2, ram: 4096}
- name: large
  cloud_properties: {cpu: 4, ram: 16384}
disk_types:
- name: 1GB
  disk_size: 1024
- name: 5GB
  disk_size: 5120
- name: 10GB
  disk_size: 10240
networks:
- name: default
  type: manual
  subnets:
  - range: 127.0.0.0/8
    gateway: 127.0.0.1
    azs: [z1, z2, z3]
compilation:
  workers: 1
  az: z1
  vm_type: small
  network: default
"""


@dataclass(frozen=True)
class Cloud:
    azs: tuple[str, ...]
    vm_types: tuple[str, ...]
    disk_types: Mapping[str, int]
    networks: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Cloud:
        doc = yaml.safe_load(text) or {}
        if not isinstance(doc, dict):
            raise errors.BadConfigRequest("YAML hash expected")

        def names(key: str) -> tuple[str, ...]:
            return tuple(str(item["name"]) for item in doc.get(key) or () if isinstance(item, dict))

        disks = {str(d["name"]): int(d.get("disk_size", 0)) for d in doc.get("disk_types") or ()
                 if isinstance(d, dict) and "name" in d}
        return cls(names("azs"), names("vm_types"), disks, names("networks"))


@dataclass(frozen=True)
class WatchTime:
    min_ms: int
    max_ms: int

    @classmethod
    def parse(cls, raw: Any, what: str) -> WatchTime:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return cls(raw, raw)
        if isinstance(raw, str):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", raw)
            if match:
                low = int(match.group(1))
                high = int(match.group(2) or low)
                if low <= high:
                    return cls(low, high)
        raise errors.UpdateConfigInvalidWatchTime(f"Watch time should be an integer or a range of two integers, "
                                                  f"'{what}' is '{raw}'")


@dataclass(frozen=True)
class Amount:
    """`canaries` / `max_in_flight` as written: a number, or a percentage of the instances it applies to."""

    value: int
    percent: bool = False

    def of(self, size: int) -> int:
        """update_config.rb `get_numerical_value`: a percentage is rounded down and capped at `size`."""
        if self.percent:
            return min(self.value * size // 100, size)
        return self.value

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)


@dataclass(frozen=True)
class UpdatePolicy:
    """An instance group's `update` block, read like update_config.rb.

    The Director keeps `canaries` and `max_in_flight` uncalculated and works them out for
    each AZ when it updates a group (instance_group_updater.rb), so percentages stay
    percentages here; `canaries_for` / `max_in_flight_for` do the calculation.
    """

    canaries: Amount
    max_in_flight: Amount
    canary_watch_time: WatchTime
    update_watch_time: WatchTime
    serial: bool

    def canaries_for(self, size: int) -> int:
        return min(self.canaries.of(size), size)

    def max_in_flight_for(self, size: int) -> int:
        return max(1, self.max_in_flight.of(size))


@dataclass(frozen=True)
class Job:
    name: str
    release: str
    properties: Mapping[str, Any]


@dataclass(frozen=True)
class InstanceGroup:
    name: str
    instances: int
    azs: tuple[str, ...]
    vm_type: str
    disk_mb: int
    networks: tuple[str, ...]
    jobs: tuple[Job, ...]
    update: UpdatePolicy


@dataclass(frozen=True)
class Deployment:
    name: str
    releases: tuple[tuple[str, str], ...]
    stemcells: tuple[tuple[str, str], ...]
    groups: tuple[InstanceGroup, ...]
    variables: Mapping[str, str] = field(default_factory=dict)  # name -> type


def load_yaml(text: str) -> dict[str, Any]:
    """What the API does before it makes a task (api_helper.rb `validate_manifest_yml`)."""
    if not text.strip():
        raise errors.BadManifest("Manifest should not be empty")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise errors.BadManifest(f"Incorrect YAML structure of the uploaded manifest: {problem}{where}") from None
    if not isinstance(doc, dict):
        raise errors.BadManifest("Incorrect YAML structure of the uploaded manifest: a hash is expected")
    return doc


def _require(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc or doc[key] is None:
        raise errors.ValidationMissingField(f"Required property '{key}' was not specified in object ({where})")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise errors.ValidationInvalidType(f"Property '{key}' value ({value!r}) did not match the required type "
                                           f"'{names}'")
    return value


def _amount(raw: Any, key: str) -> Amount:
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return Amount(raw)
    if isinstance(raw, str):
        match = re.fullmatch(r"\s*(\d+)\s*%\s*", raw)
        if match:
            return Amount(int(match.group(1)), percent=True)
        if raw.strip().isdigit():
            return Amount(int(raw))
    raise errors.ValidationInvalidValue(f"Property '{key}' value ({raw!r}) should be an integer or a percentage")


def _serial(raw: Mapping[str, Any], base: UpdatePolicy | None) -> bool:
    """update_config.rb: a boolean, by default the deployment's (whose own default is true)."""
    value = raw.get("serial")
    if value is None:
        return base.serial if base else True
    if not isinstance(value, bool):
        raise errors.ValidationInvalidType(f"Property 'serial' value ({value!r}) did not match the required type "
                                           "'Boolean'")
    return value


def _update_policy(raw: Any, fallback: UpdatePolicy | None, where: str) -> UpdatePolicy:
    if raw is None:
        if fallback is None:
            raise errors.ValidationMissingField(f"Required property 'update' was not specified in object ({where})")
        return fallback
    if not isinstance(raw, dict):
        raise errors.ValidationInvalidType(f"Property 'update' value ({raw!r}) did not match the required type 'Hash'")
    base = fallback

    def pick(key: str) -> Any:
        if key in raw:
            return raw[key]
        if base is None:
            raise errors.ValidationMissingField(f"Required property '{key}' was not specified in object ({raw!r})")
        return None

    canaries_raw = pick("canaries")
    flight_raw = pick("max_in_flight")
    canary_watch_raw = pick("canary_watch_time")
    update_watch_raw = pick("update_watch_time")
    return UpdatePolicy(
        canaries=_amount(canaries_raw, "canaries") if canaries_raw is not None
        else base.canaries if base else Amount(1),
        max_in_flight=_amount(flight_raw, "max_in_flight") if flight_raw is not None
        else base.max_in_flight if base else Amount(1),
        canary_watch_time=WatchTime.parse(canary_watch_raw, "canary_watch_time") if canary_watch_raw is not None
        else base.canary_watch_time if base else WatchTime(1000, 120000),
        update_watch_time=WatchTime.parse(update_watch_raw, "update_watch_time") if update_watch_raw is not None
        else base.update_watch_time if base else WatchTime(1000, 120000),
        serial=_serial(raw, base),
    )


def parse(doc: Mapping[str, Any], cloud: Cloud) -> Deployment:
    """Validate a loaded manifest against the cloud config (what the deploy task does first)."""
    name = doc.get("name")
    if not name or not isinstance(name, str):
        raise errors.ValidationMissingField("Deployment manifest must have a 'name' key")
    releases_raw = _require(doc, "releases", list, "deployment")
    releases: list[tuple[str, str]] = []
    for rel in releases_raw:
        if not isinstance(rel, dict):
            raise errors.ValidationInvalidType(f"Property 'releases' item ({rel!r}) did not match the required type "
                                               "'Hash'")
        rel_name = str(_require(rel, "name", str, "release"))
        if rel_name != KNOWN_RELEASE:
            raise errors.InstanceGroupUnknownRelease(f"Release '{rel_name}' doesn't exist")
        releases.append((rel_name, str(rel.get("version", "latest"))))
    stemcells: list[tuple[str, str]] = []
    aliases: set[str] = set()
    for stem in doc.get("stemcells") or ():
        if not isinstance(stem, dict):
            raise errors.ValidationInvalidType(f"Property 'stemcells' item ({stem!r}) did not match the required "
                                               "type 'Hash'")
        alias = str(_require(stem, "alias", str, "stemcell"))
        aliases.add(alias)
        os_name = str(stem.get("os") or stem.get("name") or "ubuntu-jammy")
        stemcells.append((os_name, str(stem.get("version", "latest"))))
    groups_raw = _require(doc, "instance_groups", list, "deployment")
    default_update = _update_policy(doc.get("update"), None, "deployment")
    release_names = {r for r, _ in releases}
    groups: list[InstanceGroup] = []
    seen: set[str] = set()
    for raw in groups_raw:
        if not isinstance(raw, dict):
            raise errors.ValidationInvalidType(f"Property 'instance_groups' item ({raw!r}) did not match the "
                                               "required type 'Hash'")
        group_name = str(_require(raw, "name", str, "instance group"))
        if group_name in seen:
            raise errors.ValidationInvalidValue(f"Duplicate instance group name '{group_name}'")
        seen.add(group_name)
        instances = int(_require(raw, "instances", int, f"instance group '{group_name}'"))
        if instances < 0:
            raise errors.ValidationInvalidValue(f"Instance group '{group_name}' has a negative number of instances")
        azs_raw = raw.get("azs")
        if not azs_raw or not isinstance(azs_raw, list):
            raise errors.JobMissingAvailabilityZones(f"Instance group '{group_name}' has empty availability zones")
        azs = tuple(str(a) for a in azs_raw)
        for az in azs:
            if az not in cloud.azs:
                raise errors.JobUnknownAvailabilityZone(
                    f"Instance group '{group_name}' references unknown availability zone '{az}'")
        vm_type = str(_require(raw, "vm_type", str, f"instance group '{group_name}'"))
        if vm_type not in cloud.vm_types:
            raise errors.InstanceGroupUnknownVmType(
                f"Instance group '{group_name}' references an unknown vm type '{vm_type}'")
        stemcell = raw.get("stemcell")
        if stemcell is not None and str(stemcell) not in aliases:
            raise errors.InstanceGroupUnknownStemcell(
                f"Instance group '{group_name}' references an unknown stemcell '{stemcell}'")
        disk_mb = 0
        if "persistent_disk_type" in raw and "persistent_disk" in raw:
            raise errors.InstanceGroupInvalidPersistentDisk(
                f"Instance group '{group_name}' specifies both 'persistent_disk' and 'persistent_disk_type'")
        if raw.get("persistent_disk_type") is not None:
            disk_type = str(raw["persistent_disk_type"])
            if disk_type not in cloud.disk_types:
                raise errors.InstanceGroupUnknownDiskType(
                    f"Instance group '{group_name}' references an unknown disk type '{disk_type}'")
            disk_mb = cloud.disk_types[disk_type]
        elif raw.get("persistent_disk") is not None:
            size = raw["persistent_disk"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise errors.InstanceGroupInvalidPersistentDisk(
                    f"Instance group '{group_name}' references an invalid persistent disk size '{size}'")
            disk_mb = size
        nets_raw = raw.get("networks")
        if not nets_raw or not isinstance(nets_raw, list):
            raise errors.ValidationMissingField(
                f"Required property 'networks' was not specified in object (instance group '{group_name}')")
        networks: list[str] = []
        for net in nets_raw:
            net_name = str(net.get("name")) if isinstance(net, dict) else str(net)
            if net_name not in cloud.networks:
                raise errors.JobUnknownNetwork(
                    f"Instance group '{group_name}' references an unknown network '{net_name}'")
            networks.append(net_name)
        jobs_raw = _require(raw, "jobs", list, f"instance group '{group_name}'")
        if not jobs_raw:
            raise errors.ValidationMissingField(f"Instance group '{group_name}' has no jobs")
        jobs: list[Job] = []
        for job in jobs_raw:
            if not isinstance(job, dict):
                raise errors.ValidationInvalidType(f"Property 'jobs' item ({job!r}) did not match the required type "
                                                   "'Hash'")
            job_name = str(_require(job, "name", str, f"instance group '{group_name}' job"))
            release = str(_require(job, "release", str, f"job '{job_name}'"))
            if release not in release_names:
                raise errors.InstanceGroupUnknownRelease(
                    f"Job '{job_name}' requires release '{release}' but it is not listed in releases")
            if job_name not in KNOWN_JOBS:
                raise errors.DeploymentUnknownTemplate(
                    f"Can't find job '{job_name}' in release '{release}' (unknown job: release pgbosh has only "
                    f"{', '.join(sorted(KNOWN_JOBS))})")
            props = job.get("properties") or {}
            if not isinstance(props, dict):
                raise errors.ValidationInvalidType(f"Property 'properties' of job '{job_name}' must be a hash")
            jobs.append(Job(job_name, release, props))
        update = _update_policy(raw.get("update"), default_update, f"instance group '{group_name}'")
        groups.append(InstanceGroup(group_name, instances, azs, vm_type, disk_mb, tuple(networks), tuple(jobs), update))
    variables: dict[str, str] = {}
    for var in doc.get("variables") or ():
        if not isinstance(var, dict) or "name" not in var or "type" not in var:
            raise errors.VariablesInvalidFormat("Variables must be a list of hashes with 'name' and 'type'")
        variables[str(var["name"])] = str(var["type"])
    return Deployment(name, tuple(releases), tuple(stemcells), tuple(groups), variables)


def placeholders(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, str):
        found.update(m.group(1) for m in _PLACEHOLDER.finditer(value))
    elif isinstance(value, dict):
        for key, item in value.items():
            found |= placeholders(key) | placeholders(item)
    elif isinstance(value, list):
        for item in value:
            found |= placeholders(item)
    return found


def _clean(name: str) -> str:
    return name.lstrip("!").rsplit("/", 1)[-1].split(".", 1)[0]


def resolve_variables(dep: Deployment, doc: Mapping[str, Any], stored: Mapping[str, str]) -> dict[str, str]:
    """Values for every placeholder of the manifest: the stored ones, plus generated passwords.

    Raises like the config server does for a placeholder nobody can resolve. Returns the
    complete mapping the deployment should keep (existing values are never regenerated).
    """
    values = dict(stored)
    for raw_name in sorted(placeholders(dict(doc))):
        name = _clean(raw_name)
        if name in values:
            continue
        kind = dep.variables.get(name)
        if kind == "password":
            alphabet = string.ascii_letters + string.digits
            values[name] = "".join(secrets.choice(alphabet) for _ in range(PASSWORD_LENGTH))
        elif kind is None:
            raise errors.ConfigServerFetchError(
                f"Failed to find variable '(({raw_name}))' from config server: HTTP Code '404', Error: 'Name "
                f"'/pgbosh-local/{dep.name}/{name}' not found' (interpolate it before deploying, like "
                "'bosh deploy -v')")
        else:
            raise errors.ConfigServerFetchError(
                f"Failed to generate variable '{name}' of type '{kind}': the local director generates only "
                "'password' variables")
    return values


def interpolate(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole:
            return values[_clean(whole.group(1))]
        return _PLACEHOLDER.sub(lambda m: values[_clean(m.group(1))], value)
    if isinstance(value, dict):
        return {key: interpolate(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, values) for item in value]
    return value


def pick_az(azs: Sequence[str], taken: Sequence[str]) -> str:
    """BOSH's balanced spread: the AZ with fewest instances, ties by the order in `azs`."""
    counts = {az: 0 for az in azs}
    for az in taken:
        if az in counts:
            counts[az] += 1
    return min(azs, key=lambda az: (counts[az], azs.index(az)))
