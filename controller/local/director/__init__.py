"""The local BOSH-Director-compatible server (see docs/local-world.md)."""

from .server import LocalDirector

__all__ = ["LocalDirector"]
