"""Operations that run to their end whatever happens to the task that asked for them.

Storage (``SqlStorage``) and routing (``Router``) both need this: a query cut short by a
cancellation can leave an aiosqlite connection closing forever, and a routing step cut between
its stored compare-and-set and its in-memory update leaves the two disagreeing.  The operation
runs in a task of its own; the caller waits for it behind ``asyncio.shield``, so a cancelled
caller alone sees ``CancelledError`` and the operation finishes.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

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
