"""The supervisor asks before it starts a process that died (not before the first start),
and a "no" ends its supervision without starting it."""

from __future__ import annotations

import asyncio

from controller.node.supervisor import Backoff, ProcessState, Supervisor

QUICK = Backoff(initial=0.01, maximum=0.01, grace=0.0, poll=0.01, ready_timeout=1.0)


class FakeProcess:
    name = "fake"

    def __init__(self) -> None:
        self.pid: int | None = None
        self.launches = 0

    async def launch(self) -> None:
        self.launches += 1
        self.pid = 1000 + self.launches

    def current_pid(self) -> int | None:
        return self.pid

    async def ready(self) -> bool:
        return self.pid is not None

    async def terminate(self) -> None:
        self.pid = None


async def wait_until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def test_a_process_that_died_is_started_again_only_if_may_restart_says_so() -> None:
    answers: list[bool] = []
    asked = 0

    async def may_restart() -> bool:
        nonlocal asked
        asked += 1
        return answers.pop(0)

    process = FakeProcess()
    supervisor = Supervisor(process, QUICK, may_restart=may_restart)
    supervisor.start()
    try:
        await wait_until(lambda: supervisor.state == ProcessState.RUNNING, "first start")
        assert (process.launches, asked) == (1, 0)  # the first start is not a restart

        answers.append(True)
        process.pid = None  # it died
        await wait_until(lambda: process.launches == 2 and supervisor.state == ProcessState.RUNNING, "restart")
        assert asked == 1

        answers.append(False)
        process.pid = None  # it died again: this time the answer is no
        await wait_until(lambda: asked == 2, "asked again")
        await asyncio.sleep(0.1)
        assert process.launches == 2 and process.pid is None
        assert supervisor.state == ProcessState.FAILING and supervisor.last_error == "not restarted: see the log"
        assert supervisor._task is not None and supervisor._task.done()  # supervision ended
    finally:
        await supervisor.stop()
    assert supervisor.state == ProcessState.STOPPED
