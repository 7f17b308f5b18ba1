"""server.tasks: an operation outlives its cancelled caller, and its failure is
reported once, to whoever can still hear it."""
from __future__ import annotations

import asyncio

import pytest

from server.tasks import run_to_end, wait_all


async def test_a_cancelled_caller_does_not_stop_the_operation():
    running: set[asyncio.Task] = set()
    started, release, done = asyncio.Event(), asyncio.Event(), []

    async def operation():
        started.set()
        await release.wait()
        done.append(True)
        return 7

    caller = asyncio.ensure_future(run_to_end(operation(), running, orphan_failure=pytest.fail))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert len(running) == 1 and not done
    release.set()
    await wait_all(running)
    assert done == [True] and not running


async def test_a_failure_goes_to_the_waiting_caller_not_the_orphan_report():
    orphans: list[BaseException] = []

    async def operation():
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        await run_to_end(operation(), set(), orphan_failure=orphans.append)
    assert orphans == []


async def test_a_failure_after_the_caller_left_is_reported():
    running: set[asyncio.Task] = set()
    started, release = asyncio.Event(), asyncio.Event()
    orphans: list[BaseException] = []

    async def operation():
        started.set()
        await release.wait()
        raise ValueError("disk full")

    caller = asyncio.ensure_future(run_to_end(operation(), running, orphan_failure=orphans.append))
    await started.wait()
    caller.cancel()
    release.set()
    await wait_all(running)
    await asyncio.gather(caller, return_exceptions=True)
    assert [str(e) for e in orphans] == ["disk full"]
