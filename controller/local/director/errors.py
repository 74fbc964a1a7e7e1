"""Director errors with the codes and HTTP statuses of the real Director.

Codes and statuses follow cloudfoundry/bosh `src/bosh-director/lib/bosh/director/errors.rb`
(`err(code, status)`, default status 400); the JSON body `{"code", "description"}` is
what `api/controllers/base_controller.rb` renders for a `DirectorError`.
"""

from __future__ import annotations


class DirectorError(Exception):
    code = 100
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, object]:
        return {"code": self.code, "description": self.message}


class TaskNotFound(DirectorError):
    code, status = 10000, 404


class ValidationInvalidType(DirectorError):
    code, status = 40000, 400


class ValidationMissingField(DirectorError):
    code, status = 40001, 400


class ValidationInvalidValue(DirectorError):
    code, status = 40005, 400


class DeploymentNotFound(DirectorError):
    code, status = 70000, 404


class InstanceNotFound(DirectorError):
    code, status = 70001, 404


class InstanceInvalidIndex(DirectorError):
    code, status = 70002, 400


class InstanceTargetStateUndefined(DirectorError):
    code, status = 70007, 400


class InstanceGroupUnknownRelease(DirectorError):
    code, status = 140002, 400


class InstanceGroupUnknownVmType(DirectorError):
    code, status = 140004, 400


class InstanceGroupUnknownStemcell(DirectorError):
    code, status = 140005, 400


class InstanceGroupUnknownDiskType(DirectorError):
    code, status = 140012, 400


class InstanceGroupInvalidPersistentDisk(DirectorError):
    code, status = 140013, 400


class JobMissingAvailabilityZones(DirectorError):
    code, status = 140017, 400


class JobUnknownAvailabilityZone(DirectorError):
    code, status = 140018, 400


class JobUnknownNetwork(DirectorError):
    code, status = 150001, 400


class UpdateConfigInvalidWatchTime(DirectorError):
    code, status = 180001, 400


class DeploymentUnknownTemplate(DirectorError):
    """An unknown job in an instance group."""

    code, status = 190011, 400


class CloudNotEnoughDiskSpace(DirectorError):
    code, status = 390003, 400


class AgentJobNotRunning(DirectorError):
    code, status = 400007, 400


class RpcTimeout(DirectorError):
    code, status = 450002, 400


class BadManifest(DirectorError):
    code, status = 440001, 400


class BadConfigRequest(DirectorError):
    # Not in the errors.rb revision we read; configs_controller.rb raises it for a bad
    # POST /configs body. 400 like every `err(code)` without a status.
    code, status = 440010, 400


class SystemError_(DirectorError):
    code, status = 500000, 500


class ConfigServerFetchError(DirectorError):
    code, status = 540001, 400


class VariablesInvalidFormat(DirectorError):
    code, status = 560000, 400


class UnauthorizedToAccessDeployment(DirectorError):
    code, status = 600000, 401


class ResourceNotFound(DirectorError):
    code, status = 100002, 404
