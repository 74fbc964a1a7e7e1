"""``pgbosh broker serve --workers N``: N processes serving one address, as gunicorn and
uvicorn run workers.

The first process, the supervisor, binds the address itself without ``SO_REUSEPORT``:
an address anyone listens on (another broker included) fails there, once, with a clear
error, and port 0 becomes one concrete port. It then sets ``SO_REUSEPORT`` on that socket,
which stays bound and never listens (so it is given no connections), and forks N workers;
each listens on the same address with ``SO_REUSEPORT`` and the kernel spreads incoming
connections over their sockets by address hash. The supervisor restarts a worker that
dies, stops them all on SIGTERM or SIGINT (SIGTERM to each, SIGKILL after a grace
period), and exits 1 when a worker cannot start.

A worker is a fork of the supervisor, which has loaded the configuration and has no
event loop and no thread when it forks. Each worker holds the read end of a pipe whose
only write end the supervisor keeps: the pipe reads as closed when the supervisor is gone,
however it died, and the worker then stops too (no orphan keeps the port).

Linux only: elsewhere ``SO_REUSEPORT`` does not spread connections (BSD and macOS give
them all to one socket).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# What a worker runs, in the forked child: (slot, ready, lifeline fd) -> exit code. It
# calls ready() once it listens, and stops when the lifeline fd becomes readable.
Target = Callable[[int, Callable[[], None], int], int]

WATCHED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
STOP = {signal.SIGTERM, signal.SIGINT}
# A worker that dies sooner than this after starting is restarted only after this long.
RESTART_DELAY = 1.0


class WorkerFailed(Exception):
    """A worker exited (or hung) before it listened."""


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived while workers were starting."""


def supported() -> bool:
    return sys.platform.startswith("linux")


def reserve(host: str, port: int) -> list[socket.socket]:
    """Bind ``host:port`` (every address it resolves to, one port) exclusively, then open it
    to this process's ``SO_REUSEPORT`` workers. OSError when the address is in use."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # As asyncio sets on a server socket: TIME_WAIT leftovers do not block a restart.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address[0], port, *address[2:]))
            except OSError as exc:
                raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            # Port 0: the first address picks the port, the others take the same.
            port = int(sock.getsockname()[1])
            # After the exclusive bind: only now may sockets with SO_REUSEPORT join.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass
class _Worker:
    slot: int
    pid: int
    started: float


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    def __init__(
        self,
        count: int,
        target: Target,
        *,
        keep: list[socket.socket],
        start_timeout: float = 60.0,
        grace: float = 30.0,
    ) -> None:
        self.count = count
        self.target = target
        self.keep = keep
        self.start_timeout = start_timeout
        self.grace = grace
        self.workers: dict[int, _Worker] = {}
        self._lifeline_r = -1
        self._lifeline_w = -1
        self._mask: set[signal.Signals | int] = set()

    def run(self, on_ready: Callable[[], None]) -> int:
        """Start the workers, call ``on_ready``, keep them running until SIGTERM/SIGINT.

        0 when stopped by a signal, 1 when a worker could not start (the reason on stderr)."""
        # Signals are taken with sigwaitinfo (no handler races); workers get the mask back.
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
        self._lifeline_r, self._lifeline_w = os.pipe()
        try:
            try:
                for slot in range(1, self.count + 1):
                    self._start(slot)
                on_ready()
                self._watch()
            except _Stopped:
                pass
            except WorkerFailed as exc:
                print(f"pgbosh broker: {exc}", file=sys.stderr, flush=True)
                return 1
            return 0
        finally:
            self._stop_all()
            os.close(self._lifeline_w)
            os.close(self._lifeline_r)
            # A signal still pending would act on its default (or Python's) handler once unblocked.
            while signal.sigtimedwait(WATCHED, 0) is not None:
                pass
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)

    def _watch(self) -> None:
        while True:
            info = signal.sigwaitinfo(WATCHED)
            if info.si_signo != signal.SIGCHLD:
                log.info("%s: stopping %d workers", signal.Signals(info.si_signo).name, len(self.workers))
                return
            for worker, status in self._reap():
                log.warning(
                    "worker %d (pid %d) %s; starting another", worker.slot, worker.pid, _describe(status)
                )
                if time.monotonic() - worker.started < RESTART_DELAY:
                    if signal.sigtimedwait(STOP, RESTART_DELAY) is not None:
                        return
                self._start(worker.slot)

    def _reap(self) -> list[tuple[_Worker, int]]:
        gone = []
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is not None:
                gone.append((worker, status))
        return gone

    def _start(self, slot: int) -> None:
        ready_r, ready_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):  # or the worker would write it out again
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            self._child(slot, ready_w)
        os.close(ready_w)
        worker = self.workers[pid] = _Worker(slot, pid, time.monotonic())
        try:
            ready = self._wait_ready(ready_r)
        finally:
            os.close(ready_r)
        if ready:
            log.info("worker %d (pid %d) listening", slot, pid)
            return
        if ready is None:
            os.kill(pid, signal.SIGKILL)
            why = f"did not listen within {self.start_timeout:.0f} s"
        else:
            why = "exited"
        _, status = os.waitpid(pid, 0)
        del self.workers[worker.pid]
        if ready is not None:
            why = _describe(status)
        raise WorkerFailed(f"worker {slot} (pid {pid}) could not start: it {why} (its error is above)")

    def _wait_ready(self, fd: int) -> bool | None:
        """True once the worker says it listens, False if it exited first, None on timeout."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if signal.sigpending() & STOP:
                raise _Stopped
            readable, _, _ = select.select([fd], [], [], 0.1)
            if readable:
                return os.read(fd, 1) == b"1"
        return None

    def _child(self, slot: int, ready_w: int) -> None:
        code = 1
        try:
            os.close(self._lifeline_w)
            for sock in self.keep:
                sock.close()
            # The supervisor turns SIGINT (a terminal's Ctrl-C reaches the whole group) into SIGTERM.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)

            def ready() -> None:
                os.write(ready_w, b"1")
                os.close(ready_w)

            code = self.target(slot, ready, self._lifeline_r)
        except BaseException:
            traceback.print_exc()
        finally:
            # os._exit skips logging's shutdown: write what handlers still hold (the serve
            # command's handler writes a loop turn's lines together) before the streams.
            for handler in logging.getLogger().handlers:
                try:
                    handler.flush()
                except Exception:
                    pass
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    def _stop_all(self) -> None:
        for pid in self.workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.grace
        while self.workers:
            for worker, status in self._reap():
                if os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) != 0:
                    log.warning("worker %d (pid %d) %s while stopping", worker.slot, worker.pid, _describe(status))
            remaining = deadline - time.monotonic()
            if not self.workers:
                break
            # A second SIGTERM/SIGINT, or the grace period over: no more waiting.
            info = signal.sigtimedwait(WATCHED, max(remaining, 0)) if remaining > 0 else None
            if info is None or info.si_signo != signal.SIGCHLD:
                for worker in self.workers.values():
                    log.warning("worker %d (pid %d) killed: it did not stop in time", worker.slot, worker.pid)
                    os.kill(worker.pid, signal.SIGKILL)
                for pid in list(self.workers):
                    os.waitpid(pid, 0)
                self.workers.clear()
