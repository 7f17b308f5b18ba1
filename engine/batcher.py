"""An asyncio micro-batcher: concurrent calls share one synchronous batch run in a worker thread.

``await batcher.submit(item)`` queues the item; a collector task takes the first waiting item,
then whatever else arrives until ``max_batch`` items or ``max_wait_ms`` have passed, and runs
``fn(items) -> results`` in ONE dedicated worker thread.  While that batch runs, new items
queue up for the next one, so under load batches fill by themselves and the event loop only
ever awaits.  ONNX Runtime releases the GIL, so the loop keeps serving sockets meanwhile.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """Raised by ``submit`` on, and to callers still waiting in, a closed batcher."""


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch: int = 32,
                 max_wait_ms: float = 2.0, name: str = "kefu-batcher") -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (exceptions from ``fn`` propagate)."""
        return await self.submit_nowait(item)

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` now and return the future of its result (call from the event loop)."""
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (tests): start afresh there
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._collect(self._queue), name="kefu-batcher-collect")
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.put_nowait((item, fut))
        return fut

    async def _collect(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # skip cancelled callers
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._fn, [item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
            except asyncio.CancelledError:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(BatcherClosed("the batcher was closed"))
                raise
            except Exception as e:  # hand the failure to every caller of this batch
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(live, results):
                if not fut.done():
                    fut.set_result(result)

    def close(self) -> None:
        """Stop collecting, fail queued callers with BatcherClosed, and stop the worker thread
        (after the batch it may be running).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            self._task.cancel()
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done() and not fut.get_loop().is_closed():
                    fut.set_exception(BatcherClosed("the batcher was closed"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """close() and wait until the collector task has finished."""
        task = self._task
        self.close()
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            await asyncio.gather(task, return_exceptions=True)
