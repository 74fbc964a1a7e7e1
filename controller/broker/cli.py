"""``pgbosh broker serve``: run the Open Service Broker API server."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from controller.broker import workers
from controller.broker.config import DEFAULT_CONFIG, BrokerConfig
from controller.broker.roles import PsycopgRoleManager
from controller.broker.server import BasicCredentials, BrokerServer
from controller.broker.service import Broker
from controller.kube import KubeClient, KubeError


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="broker_command", metavar="SUBCOMMAND")
    serve = sub.add_parser("serve", help="serve the OSB API (v2.17)", description="Serve the OSB API (v2.17).")
    serve.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT to listen on (default %(default)s)")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--kubeconfig", help="kubeconfig whose current context names the Kubernetes API")
    where.add_argument("--server", help="Kubernetes API URL, without credentials (for a local emulator)")
    serve.add_argument("--config", default=str(DEFAULT_CONFIG), help="catalog and namespace YAML (default: shipped)")
    serve.add_argument("--namespace", help="namespace for PostgresClusters and Secrets (overrides --config)")
    auth = serve.add_mutually_exclusive_group(required=True)
    auth.add_argument("--credentials-file", help="basic-auth credentials: YAML {username, password} or user:password")
    auth.add_argument("--credentials-secret", metavar="NAMESPACE/NAME", help="a Secret with username and password")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="processes serving --listen together (SO_REUSEPORT, Linux); above 1, this process"
        " supervises them: restarts one that dies, stops all on SIGTERM/SIGINT (default %(default)s)",
    )
    serve.set_defaults(func=run)
    parser.set_defaults(func=_help(parser))


def _help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show


def _workers(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes (1 or more)")
    return int(text)


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


# A platform sends bursts of requests (benchmarks/broker: 50 at once); each holds one
# connection to the Kubernetes API for one call, so the pool matches the burst. The
# streams backend (HTTP/1.1 on asyncio streams) hands connections over in constant time
# and costs the least CPU a call (a fifth of aiohttp's client).
KUBE_CONNECTIONS = 64
# Young-generation GC threshold of a serving broker process (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def _kube(args: argparse.Namespace) -> KubeClient:
    options: dict[str, Any] = {"max_connections": KUBE_CONNECTIONS, "backend": "streams"}
    if args.server:
        return KubeClient(args.server, **options)
    if args.kubeconfig:
        return KubeClient.from_kubeconfig(args.kubeconfig, **options)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return KubeClient.in_cluster(**options)
    default = os.path.expanduser(os.environ.get("KUBECONFIG", "~/.kube/config"))
    return KubeClient.from_kubeconfig(default, **options)


def _config(args: argparse.Namespace) -> BrokerConfig:
    config = BrokerConfig.load(args.config)
    if args.namespace:
        config = config.model_copy(update={"namespace": args.namespace})
    return config


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _announce(url: str, config: BrokerConfig, processes: int) -> None:
    # The one line on stdout: tools (benchmarks/broker, tests) wait for it and read the URL.
    more = f", {processes} workers" if processes > 1 else ""
    print(f"pgbosh broker listening on {url} (namespace {config.namespace}{more})", flush=True)


async def serve(
    args: argparse.Namespace,
    config: BrokerConfig,
    credentials: BasicCredentials | None,
    host: str,
    port: int,
    *,
    ready: Callable[[BrokerServer], None],
    reuse_port: bool = False,
    lifeline: int | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT (or, in a worker, until the supervisor is gone)."""
    async with _kube(args) as kube:
        if credentials is None:
            namespace, _, name = str(args.credentials_secret).partition("/")
            if not name:
                raise ValueError("--credentials-secret wants NAMESPACE/NAME")
            credentials = await BasicCredentials.from_secret(kube, namespace, name)
        broker = Broker(config, kube, PsycopgRoleManager())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # A worker leaves SIGINT to its supervisor, which passes it on as SIGTERM.
        for sig in (signal.SIGTERM,) if lifeline is not None else (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if lifeline is not None:
            # Readable (closed) once the supervisor is gone, however it ended.
            def orphaned(fd: int = lifeline) -> None:
                loop.remove_reader(fd)
                stop.set()

            loop.add_reader(lifeline, orphaned)
        async with BrokerServer(broker, credentials, host=host, port=port, reuse_port=reuse_port) as server:
            # What start-up made (modules, models, schemas: ~50,000 objects) lives as long as the
            # process: out of the collector's sight, a full collection takes ~1 ms, not ~30-50 ms
            # in the middle of a burst of requests.
            gc.collect()
            gc.freeze()
            # A provision allocates a few hundred objects that die by reference counting; the
            # default threshold (700) still ran a young collection every ~16 provisions, ~3% of
            # the CPU and pauses up to 2.6 ms in a burst. Cyclic garbage is rare here.
            gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
            ready(server)
            await stop.wait()
    return 0


def _serve_workers(
    args: argparse.Namespace, config: BrokerConfig, credentials: BasicCredentials | None, host: str, port: int
) -> int:
    if not workers.supported():
        raise ValueError("--workers above 1 needs Linux (SO_REUSEPORT spreads connections only there)")
    sockets = workers.reserve(host, port)
    try:
        port = int(sockets[0].getsockname()[1])

        def worker(slot: int, ready: Callable[[], None], lifeline: int) -> int:
            try:
                return asyncio.run(
                    serve(
                        args, config, credentials, host, port,
                        ready=lambda _: ready(), reuse_port=True, lifeline=lifeline,
                    )
                )  # fmt: skip
            except (ValueError, OSError, KubeError) as exc:
                print(f"pgbosh broker: worker {slot}: {exc}", file=sys.stderr, flush=True)
                return 1

        supervisor = workers.Supervisor(args.workers, worker, keep=sockets)
        return supervisor.run(on_ready=lambda: _announce(_url(host, port), config, args.workers))
    finally:
        for sock in sockets:
            sock.close()


class _SecondsFormatter(logging.Formatter):
    """logging's default line, with the date and time text made once a second, not per line."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
        msec_format = self.default_msec_format
        return msec_format % (self._text, record.msecs) if msec_format else self._text


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines written once per turn of the event loop: a burst of 50 requests logs with one
    write, not 50 (a write and flush per line cost ~30 us of a provision's ~0.5 ms). WARNING
    and above, lines from outside the loop's thread or with no loop running, are written at
    once; logging's shutdown at exit flushes the rest. Only a hard kill can lose lines, of the
    last turn (milliseconds)."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
            return
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                try:
                    self.stream.write(text)
                except Exception:
                    return
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
        finally:
            self.release()


def configure_logging(level: str, *, processes: int = 1) -> None:
    # Workers share stderr: each line says which process wrote it.
    process = " [%(process)d]" if processes > 1 else ""
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(_SecondsFormatter(f"%(asctime)s %(levelname)s{process} %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # httpx logs every Kubernetes call at INFO; the broker's one line per request says enough.
    logging.getLogger("httpx").setLevel(logging.NOTSET if level == "DEBUG" else logging.WARNING)


def run(args: argparse.Namespace) -> int:
    # In the broker's own process: what a log record would otherwise collect and no line
    # prints (the logging HOWTO's "Optimization": the caller's frame, thread and
    # multiprocessing names), ~5 us of the ~20 us a request's log line costs.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    configure_logging(args.log_level, processes=args.workers)
    try:
        config = _config(args)
        host, port = _listen(args.listen)
        credentials = BasicCredentials.from_file(args.credentials_file) if args.credentials_file else None
        if args.workers > 1:
            return _serve_workers(args, config, credentials, host, port)
        return asyncio.run(
            serve(args, config, credentials, host, port, ready=lambda s: _announce(s.url, config, 1))
        )
    except (ValueError, OSError, KubeError) as exc:
        print(f"pgbosh broker: {exc}", file=sys.stderr)
        return 1
