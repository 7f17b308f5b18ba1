"""Operations that run to their end whatever happens to the task that asked for them.

Storage (``SqlStorage``) and routing (``Router``) both need this: a query cut short by a
cancellation can leave an aiosqlite connection closing forever, and a routing step cut between
its stored compare-and-set and its in-memory update leaves the two disagreeing.  The operation
runs in a task of its own; the caller waits for it behind ``asyncio.shield``, so a cancelled
caller alone sees ``CancelledError`` and the operation finishes.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterable

OrphanFailure = Callable[[BaseException], None]


async def run_to_end(operation: Awaitable[Any], running: set[asyncio.Task], *,
                     orphan_failure: OrphanFailure) -> Any:
    """Await ``operation`` in its own task, kept in ``running`` until it ends (so an owner can
    wait for every such task before it closes).  A failure its cancelled caller can no longer
    receive goes to ``orphan_failure``."""
    task = asyncio.ensure_future(operation)
    running.add(task)
    task.add_done_callback(running.discard)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # (on a task already done, the callback runs at once: a failure is still reported)
        task.add_done_callback(lambda t: _report(t, orphan_failure))
        raise


def _report(task: asyncio.Task, orphan_failure: OrphanFailure) -> None:
    if not task.cancelled() and task.exception() is not None:
        orphan_failure(task.exception())


async def wait_all(running: set[asyncio.Task]) -> None:
    """Wait until ``running`` is empty, including tasks added while waiting."""
    while running:
        await asyncio.gather(*running, return_exceptions=True)


async def stop_tasks(tasks: Iterable[asyncio.Task], *, retry_s: float = 0.1) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again as often as it
    takes.  Background loops need this: redis-py awaits a command under ``asyncio.wait_for``,
    which on Python < 3.12 swallows a cancellation that arrives as the command completes, and
    a loop that lost its one cancellation would run on and hang the shutdown waiting for it."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
    await asyncio.gather(*tasks, return_exceptions=True)
