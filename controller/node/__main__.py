"""`python -m controller.node agent --config <vm_dir>/agent.json` (what the director runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.node", description="pgbosh node agent")
    commands = parser.add_subparsers(dest="command", required=True)
    agent = commands.add_parser("agent", help="run the agent of one VM")
    agent.add_argument("--config", required=True, type=Path, help="path of agent.json")
    args = parser.parse_args(argv)
    if args.command == "agent":
        from controller.node.agent import main_agent

        return main_agent(args.config)
    return 2


if __name__ == "__main__":
    sys.exit(main())
