"""The local BOSH-Director-compatible server (see docs/local-world.md).

`LocalDirector` is imported on first use so that `pgbosh`'s command index, which
imports `controller.local.director.cli`, does not load the server's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import LocalDirector

__all__ = ["LocalDirector"]


def __getattr__(name: str) -> Any:
    if name == "LocalDirector":
        from .server import LocalDirector

        return LocalDirector
    raise AttributeError(name)
