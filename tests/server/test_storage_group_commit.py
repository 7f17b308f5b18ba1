"""GroupCommitter on its own (its write function is a plain in-memory one, the database
behaviour is covered in test_storage.py)."""
from __future__ import annotations

import asyncio

import pytest

from server.storage import StorageError
from server.storage.group_commit import GroupCommitter


class Log:
    def __init__(self, fail_when=lambda items: False):
        self.batches: list[list] = []
        self.fail_when = fail_when

    async def write(self, items):
        await asyncio.sleep(0)                # a real write yields to the loop
        if self.fail_when(items):
            raise RuntimeError(f"cannot write {items}")
        self.batches.append(list(items))
        return [f"ok {i}" for i in items]


async def test_batches_are_capped_at_max_batch_and_keep_submission_order():
    log = Log()
    gc = GroupCommitter(log.write, max_batch=7)
    results = await asyncio.gather(*(gc.submit(i) for i in range(50)))
    await gc.close()
    assert results == [f"ok {i}" for i in range(50)]
    assert max(len(b) for b in log.batches) == 7
    assert [i for b in log.batches for i in b] == list(range(50))
    assert gc.stats.batches == len(log.batches) == 8


async def test_one_bad_item_fails_alone_and_others_are_written():
    log = Log(fail_when=lambda items: 13 in items)
    gc = GroupCommitter(log.write)
    results = await asyncio.gather(*(gc.submit(i) for i in range(30)), return_exceptions=True)
    await gc.close()
    assert isinstance(results[13], StorageError)
    assert isinstance(results[13].__cause__, RuntimeError)
    assert [r for i, r in enumerate(results) if i != 13] == [f"ok {i}" for i in range(30) if i != 13]
    assert gc.stats.failed_batches == 1 and gc.stats.failed_items == 1


async def test_a_failing_database_fails_the_queue_after_a_few_single_retries():
    log = Log(fail_when=lambda items: True)
    gc = GroupCommitter(log.write, max_consecutive_failures=3)
    results = await asyncio.gather(*(gc.submit(i) for i in range(100)), return_exceptions=True)
    await gc.close()
    assert all(isinstance(r, StorageError) and isinstance(r.__cause__, RuntimeError) for r in results)
    assert gc.stats.single_retries == 3 and gc.stats.given_up == 97
    assert len({id(r) for r in results}) == 100          # one exception object per caller


async def test_a_cancelled_caller_does_not_disturb_the_others():
    log = Log()
    gc = GroupCommitter(log.write)
    tasks = [asyncio.ensure_future(gc.submit(i)) for i in range(10)]
    await asyncio.sleep(0)
    tasks[3].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    await gc.close()
    assert isinstance(done[3], asyncio.CancelledError)
    assert [d for i, d in enumerate(done) if i != 3] == [f"ok {i}" for i in range(10) if i != 3]
    assert gc.stats.batches >= 1


async def test_close_drains_then_refuses():
    log = Log()
    gc = GroupCommitter(log.write)
    tasks = [asyncio.ensure_future(gc.submit(i)) for i in range(20)]
    await asyncio.sleep(0)
    await gc.close()
    assert [t.result() for t in tasks] == [f"ok {i}" for i in range(20)]
    with pytest.raises(StorageError, match="closed"):
        await gc.submit(99)
