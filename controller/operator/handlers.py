"""kopf handlers: thin. They wake the cluster's reconcile loop or run delete steps.

- create/update/resume: wake the cluster's loop so that the change is acted on at once
  (a spec that cannot work is reported by the loop as Ready=False, InvalidSpec, and the
  handler fails with kopf.PermanentError: retrying the same spec cannot help).
- a daemon per cluster: the level-triggered loop (reconcile, then sleep until
  the plan's requeue time, the resync period, or a wake-up).
- delete (with kopf's finalizer): delete steps until the deployment is gone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import kopf
from pydantic import ValidationError

from controller.api import models
from controller.api.models import PostgresClusterSpec
from controller.bosh.client import BoshError
from controller.kube.client import KubeError
from controller.operator.reconcile import Runtime, describe_spec_error, reconcile_once

log = logging.getLogger(__name__)

# Set by the operator's entry point before kopf starts (kopf handlers are module-level).
RUNTIME: Runtime | None = None
_WAKE: dict[str, asyncio.Event] = {}

RESOURCE = (models.GROUP, models.VERSION, models.PLURAL)
DELETE_POLL_SECONDS = 2.0
ERROR_RETRY_SECONDS = 5.0


def runtime() -> Runtime:
    if RUNTIME is None:
        raise kopf.PermanentError("the operator runtime is not configured")
    return RUNTIME


def _wake(uid: str) -> None:
    _WAKE.setdefault(uid, asyncio.Event()).set()


@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
@kopf.on.update(*RESOURCE, field=("metadata", "annotations", "pgbosh.dev/redeploy"))
@kopf.on.resume(*RESOURCE)
async def spec_changed(uid: str, spec: Any, **_: Any) -> None:
    _wake(uid)
    # A spec that cannot work (it got past admission, e.g. stored before the CRD changed) is
    # reported by the cluster's loop (Ready=False, InvalidSpec, a Warning Event), which then
    # waits for the next change. For kopf this change failed for good: no retry.
    try:
        PostgresClusterSpec.model_validate(dict(spec or {}))
    except ValidationError as exc:
        raise kopf.PermanentError(f"the spec cannot work: {describe_spec_error(exc)}") from None


@kopf.daemon(*RESOURCE, cancellation_timeout=10.0)
async def cluster_loop(name: str, namespace: str | None, uid: str, stopped: Any, **_: Any) -> None:
    rt = runtime()
    assert namespace is not None  # PostgresCluster is namespaced
    wake = _WAKE.setdefault(uid, asyncio.Event())
    try:
        while not stopped:
            wake.clear()
            delay: float = rt.resync_seconds
            try:
                async with rt.slots:
                    plan = await reconcile_once(rt, namespace, name)
                if plan is None:
                    return
                if plan.requeue_after is not None:
                    delay = plan.requeue_after
            except (KubeError, BoshError) as exc:
                log.warning(
                    "reconcile of %s/%s failed, retrying in %.0fs: %s", namespace, name, ERROR_RETRY_SECONDS, exc
                )
                delay = ERROR_RETRY_SECONDS
            await _sleep(wake, stopped, delay)
    finally:
        _WAKE.pop(uid, None)


async def _sleep(wake: asyncio.Event, stopped: Any, delay: float) -> None:
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(_stopped(stopped, delay))]
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _stopped(stopped: Any, delay: float) -> None:
    await stopped.wait(delay)


@kopf.on.delete(*RESOURCE)
async def deleted(name: str, namespace: str | None, uid: str, **_: Any) -> None:
    rt = runtime()
    assert namespace is not None  # PostgresCluster is namespaced
    while True:
        try:
            plan = await reconcile_once(rt, namespace, name, deleting=True)
        except (KubeError, BoshError) as exc:
            raise kopf.TemporaryError(
                f"deleting the BOSH deployment failed: {exc}", delay=ERROR_RETRY_SECONDS
            ) from None
        if plan is None or plan.deleted:
            rt.memory.pop(uid, None)
            return
        await asyncio.sleep(plan.requeue_after or DELETE_POLL_SECONDS)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress in annotations only: the CRD's status schema is ours, not kopf's.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pgbosh.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="pgbosh.dev")
    settings.persistence.finalizer = "pgbosh.dev/finalizer"
    # Events are posted explicitly for meaningful transitions; kopf's own INFO logs would be noise.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.execution.max_workers = 20


def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(cast(Any, body), type=type_, reason=reason, message=message)
