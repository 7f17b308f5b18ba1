"""engine.batcher.MicroBatcher: concurrent calls share batches run in one worker thread."""
import asyncio
import threading

import pytest

from engine.batcher import BatcherClosed, MicroBatcher


class Recorder:
    """A batch function that records each batch and the thread that ran it."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list] = []
        self.threads: set[int] = set()
        self.started = threading.Event()
        self.gate = gate

    def __call__(self, items):
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        return [x * 10 for x in items]


async def test_concurrent_calls_share_one_batch():
    fn = Recorder()
    b = MicroBatcher(fn, max_batch=8, max_wait_ms=60_000)  # flushes when full, not on the timer
    results = await asyncio.gather(*(b.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert fn.batches == [list(range(8))]
    await b.aclose()


async def test_each_caller_gets_its_own_result():
    b = MicroBatcher(Recorder(), max_batch=3, max_wait_ms=0)
    results = await asyncio.gather(*(b.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    await b.aclose()


async def test_batches_never_exceed_max_batch():
    fn = Recorder()
    b = MicroBatcher(fn, max_batch=4, max_wait_ms=0)
    await asyncio.gather(*(b.submit(i) for i in range(10)))
    assert all(len(batch) <= 4 for batch in fn.batches)
    assert sorted(x for batch in fn.batches for x in batch) == list(range(10))
    await b.aclose()


async def test_a_lone_call_is_flushed_after_max_wait():
    fn = Recorder()
    b = MicroBatcher(fn, max_batch=100, max_wait_ms=1)
    assert await b.submit(7) == 70
    assert fn.batches == [[7]]
    await b.aclose()


async def test_batches_run_in_one_worker_thread_off_the_event_loop():
    fn = Recorder()
    b = MicroBatcher(fn, max_batch=2, max_wait_ms=0)
    for i in range(3):
        await asyncio.gather(b.submit(i), b.submit(i + 1))
    assert len(fn.threads) == 1
    assert threading.get_ident() not in fn.threads
    await b.aclose()


async def test_event_loop_keeps_running_while_a_batch_runs():
    gate = threading.Event()
    fn = Recorder(gate)
    b = MicroBatcher(fn, max_batch=1, max_wait_ms=0)
    pending = asyncio.ensure_future(b.submit(1))
    await asyncio.to_thread(fn.started.wait, 10)  # the worker is now blocked inside the batch
    other = asyncio.Event()
    asyncio.get_running_loop().call_soon(other.set)
    await other.wait()  # the loop still runs callbacks
    assert not pending.done()
    gate.set()
    assert await pending == 10
    await b.aclose()


async def test_calls_arriving_during_a_batch_form_the_next_batch():
    gate = threading.Event()
    fn = Recorder(gate)
    b = MicroBatcher(fn, max_batch=8, max_wait_ms=0)
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.to_thread(fn.started.wait, 10)
    later = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
    gate.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [10, 20, 30, 40, 50]
    assert fn.batches == [[0], [1, 2, 3, 4, 5]]
    await b.aclose()


async def test_an_error_in_the_batch_reaches_every_caller():
    def boom(items):
        raise ValueError("bad batch")

    b = MicroBatcher(boom, max_batch=3, max_wait_ms=60_000)
    results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    await b.aclose()


async def test_the_batcher_survives_a_failed_batch():
    calls = []

    def flaky(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("first batch fails")
        return items

    b = MicroBatcher(flaky, max_batch=1, max_wait_ms=0)
    with pytest.raises(RuntimeError):
        await b.submit(1)
    assert await b.submit(2) == 2
    await b.aclose()


async def test_wrong_result_count_is_an_error():
    b = MicroBatcher(lambda items: [], max_batch=1, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        await b.submit(1)
    await b.aclose()


async def test_close_fails_waiting_callers_and_rejects_new_ones():
    gate = threading.Event()
    fn = Recorder(gate)
    b = MicroBatcher(fn, max_batch=1, max_wait_ms=0)
    running = asyncio.ensure_future(b.submit(1))
    await asyncio.to_thread(fn.started.wait, 10)
    queued = b.submit_nowait(2)
    b.close()
    gate.set()
    for fut in (running, queued):
        with pytest.raises(BatcherClosed):
            await fut
    with pytest.raises(BatcherClosed):
        await b.submit(3)
    b.close()  # idempotent


async def test_a_cancelled_caller_is_skipped():
    gate = threading.Event()
    fn = Recorder(gate)
    b = MicroBatcher(fn, max_batch=8, max_wait_ms=0)
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.to_thread(fn.started.wait, 10)
    doomed = b.submit_nowait(1)
    kept = b.submit_nowait(2)
    doomed.cancel()
    gate.set()
    assert await first == 0 and await kept == 20
    assert fn.batches == [[0], [2]]
    await b.aclose()


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch=0)
