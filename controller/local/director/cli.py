"""`pgbosh director serve`: run the local director until SIGINT/SIGTERM (VMs keep running)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .defaults import DEFAULT_AGENT_TIMEOUT, DEFAULT_MAX_THREADS, DEFAULT_RESURRECTION_DELAY, DEFAULT_RUN_AS


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="director_command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve the BOSH Director API", description="serve the BOSH Director API")
    serve.add_argument("--listen", default="127.0.0.1:25555", help="HOST:PORT (default 127.0.0.1:25555)")
    serve.add_argument("--state-dir", required=True, help="deployments, tasks, VMs and director.json live here")
    serve.add_argument("--resurrection-delay", type=float, default=DEFAULT_RESURRECTION_DELAY,
                       help=f"seconds an agent stays unresponsive before its VM is recreated "
                            f"(default {DEFAULT_RESURRECTION_DELAY:g})")
    serve.add_argument("--agent-timeout", type=float, default=DEFAULT_AGENT_TIMEOUT,
                       help=f"seconds without an answer before an agent is unresponsive "
                            f"(default {DEFAULT_AGENT_TIMEOUT:g})")
    serve.add_argument("--vm-root", default=None,
                       help="VM and disk directories (default: STATE_DIR/vms-and-disks when the database user "
                            "can reach it, else /var/lib/pgbosh/<name>)")
    serve.add_argument("--run-as", default=None,
                       help=f"OS user of the database processes when running as root (default {DEFAULT_RUN_AS})")
    serve.add_argument("--max-threads", type=_positive_int, default=DEFAULT_MAX_THREADS,
                       help="VMs a task creates, and instances it deletes, at once, as the Director's "
                            f"director.max_threads (default {DEFAULT_MAX_THREADS})")
    serve.set_defaults(func=run)

    def usage(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


async def _serve(args: argparse.Namespace) -> int:
    from .server import LocalDirector

    host, _, port = str(args.listen).rpartition(":")
    director = LocalDirector(args.state_dir, host=host or "127.0.0.1", port=int(port),
                             resurrection_delay=args.resurrection_delay, agent_timeout=args.agent_timeout,
                             vm_root=args.vm_root, run_as=args.run_as, max_threads=args.max_threads)
    await director.start()
    print(f"director listening on {director.url}; credentials in {director.info_path}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await director.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(_serve(args))
