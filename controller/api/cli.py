"""`pgbosh crd`: print the CustomResourceDefinition."""

from __future__ import annotations

import argparse
import sys

from controller.api.crd import crd_yaml


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml())
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=run)
