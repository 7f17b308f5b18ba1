"""Group commit: many concurrent appends share one database transaction.

Callers :meth:`GroupCommitter.submit` an item and await a future.  One writer task takes the
first pending item, lets the other ready tasks enqueue theirs (one loop turn, or a short
``window``), takes up to ``max_batch`` items and hands them to ``write_batch``, which writes
them all in ONE transaction and returns one result per item.  Futures are resolved only
after ``write_batch`` returned, i.e. after the commit: nothing is acknowledged unstored.

If the batch transaction fails, every item is retried alone (its own transaction), so one
bad item fails only its own caller.  A failure is always reported as :class:`StorageError`
with the original exception as ``__cause__``.  When the failure is not the items' fault
(a locked or full database, a lost server), the single retries fail too: after
``max_consecutive_failures`` single retries in a row fail, the rest of the batch fails at
once with the same error instead of each waiting out its own lock timeout, so a stuck
database costs (1 + max_consecutive_failures) timeouts, not one per queued message.

``write_batch`` may also return an exception *instance* as an item's result (e.g. unknown
conversation): that caller gets it raised while the rest of the batch commits.

While one batch is being written, new submissions queue up and form the next batch, so
the batch size adapts to the load with no added latency when idle (window 0).
"""
from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

from .base import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class GroupCommitStats:
    batches: int = 0          # transactions committed (batch or single retry)
    items: int = 0            # items resolved with a result
    failed_batches: int = 0   # batch transactions that failed and were retried item by item
    failed_items: int = 0     # items whose own transaction failed too
    single_retries: int = 0   # single-item transactions tried after a failed batch
    given_up: int = 0         # items failed without a retry (the database kept failing)
    largest_batch: int = 0


class GroupCommitter(Generic[T, R]):
    def __init__(self, write_batch: Callable[[Sequence[T]], Awaitable[list[Any]]], *,
                 max_batch: int = 256, window: float = 0.0, max_consecutive_failures: int = 3,
                 name: str = "kefu-storage-writer"):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_consecutive_failures = max(1, max_consecutive_failures)
        self._write_batch = write_batch
        self.max_batch = max_batch
        self.window = window
        self.name = name
        self.stats = GroupCommitStats()
        #: The items of the transaction in progress (tests look at it from commit hooks).
        self.inflight: list[tuple[T, asyncio.Future]] = []
        self._pending: collections.deque[tuple[T, asyncio.Future]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    # -- callers
    async def submit(self, item: T) -> R:
        if self._closing:
            raise StorageError("storage is closed")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        self._wakeup.set()
        if self._task is None or self._task.done():      # first use, or after a crash
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        # A cancelled caller does not stop the write (its item may still be stored; a
        # client id makes the client's retry idempotent); the writer skips done futures.
        return await fut

    async def close(self) -> None:
        """Stop accepting items, write everything already submitted, stop the writer."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # already reported to its callers
                log.exception("storage writer failed")

    # -- the writer task
    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                # Let the other ready tasks enqueue before taking the batch.
                if self.window > 0 and len(self._pending) < self.max_batch:
                    await asyncio.sleep(self.window)
                else:
                    await asyncio.sleep(0)
                batch = []
                while self._pending and len(batch) < self.max_batch:
                    batch.append(self._pending.popleft())
                await self._process(batch)
        except BaseException as exc:  # cancelled or a bug: fail everyone still waiting
            err = StorageError(f"storage writer stopped: {exc!r}")
            for _, fut in list(self.inflight) + list(self._pending):
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            raise

    async def _process(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.inflight = batch
        try:
            try:
                results = await self._write_batch([item for item, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    self.stats.failed_items += 1
                    self._fail(batch[0][1], exc)
                    return
                self.stats.failed_batches += 1
                log.warning("group commit of %d items failed (%r); retrying one by one",
                            len(batch), exc)
                failures = 0
                for i, entry in enumerate(batch):
                    error = await self._process_one(entry)
                    if error is None:
                        failures = 0
                        continue
                    failures += 1
                    if failures >= self.max_consecutive_failures:
                        for _, fut in batch[i + 1:]:
                            self.stats.given_up += 1
                            self.stats.failed_items += 1
                            self._fail(fut, error)
                        break
                return
            self.stats.batches += 1
            for (_, fut), result in zip(batch, results, strict=True):
                self._resolve(fut, result)
        finally:
            self.inflight = []

    async def _process_one(self, entry: tuple[T, asyncio.Future]) -> Exception | None:
        """Write one item in its own transaction; the exception when that failed."""
        item, fut = entry
        self.inflight = [entry]
        self.stats.single_retries += 1
        try:
            (result,) = await self._write_batch([item])
        except Exception as exc:
            self.stats.failed_items += 1
            self._fail(fut, exc)
            return exc
        self.stats.batches += 1
        self._resolve(fut, result)
        return None

    def _resolve(self, fut: asyncio.Future, result: Any) -> None:
        if fut.done():
            return
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            self.stats.items += 1
            fut.set_result(result)

    @staticmethod
    def _fail(fut: asyncio.Future, exc: Exception) -> None:
        if fut.done():
            return
        # A fresh exception per caller (one instance raised in many tasks would share a
        # traceback); the database's error stays reachable as __cause__.
        cause = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ else exc
        err = type(exc)(*exc.args) if isinstance(exc, StorageError) else \
            StorageError(f"could not store the message: {exc}")
        err.__cause__ = cause
        fut.set_exception(err)
