"""The `pgbosh` command line.

Every part registers its own sub-commands (``register(subparsers)``) so that the
CLI stays a thin index; importing a part happens only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# command name -> (module, help). The module exposes ``register(parser)`` that adds
# arguments (and nested sub-commands) and sets ``func`` to a callable taking the
# parsed namespace and returning an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "crd": ("controller.api.cli", "print the PostgresCluster CustomResourceDefinition"),
    "operator": ("controller.operator.cli", "run the operator against a Kubernetes API"),
    "dev": (
        "controller.local.dev",
        "run the whole stack on this machine (emulator, director, Consul, operator, broker)",
    ),
    "director": ("controller.local.director.cli", "the local BOSH-Director-compatible server"),
    "consul": ("controller.local.consul.cli", "the local Consul-compatible agent (HTTP and DNS)"),
    "broker": ("controller.broker.cli", "the Open Service Broker API server"),
    "manifest": ("controller.bosh.cli", "print the BOSH manifest a PostgresCluster would get"),
    "switchover": ("controller.operator.switchover", "switch the primary of a cluster over to a replica"),
}


def build_parser(available: dict[str, tuple[str, str]] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgbosh", description="Highly available PostgreSQL on BOSH, driven from Kubernetes."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in (available or COMMANDS).items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that part is not part of this build
            raise
        register: Callable[[argparse.ArgumentParser], None] = module.register
        register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Import only the part the command needs (each part pulls in its own libraries).
    chosen = {args_list[0]: COMMANDS[args_list[0]]} if args_list and args_list[0] in COMMANDS else None
    parser = build_parser(chosen)
    argv = args_list
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
