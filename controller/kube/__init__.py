"""A thin async Kubernetes API client (httpx), shared by the broker and the operator."""

from controller.kube.client import (
    Conflict,
    Invalid,
    KubeClient,
    KubeError,
    NotFound,
    core_path,
    resource_path,
)

__all__ = ["Conflict", "Invalid", "KubeClient", "KubeError", "NotFound", "core_path", "resource_path"]
