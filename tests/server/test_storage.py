"""The storage rules, each against real SQLite, PostgreSQL and MariaDB databases."""
from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sqlite3
import sys
import textwrap

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from server.storage import (BOT, HUMAN, MAX_PAGE, QUEUED, SCHEMA_VERSION, DuplicateKey, NoSuchRow,
                            SchemaTooNew, StorageError, open_storage)

from .storage_support import Target, my_admin, pg_admin, pg_database, storage, target  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))


async def all_messages(storage, conversation_id):
    out, after = [], 0
    while True:
        page = await storage.messages(conversation_id, after_seq=after, limit=MAX_PAGE)
        if not page:
            return out
        out += page
        after = page[-1].seq


async def test_seq_contiguous_under_500_concurrent_appends_across_5_conversations(storage):
    convs = [await storage.create_conversation(f"v{i}", "shop") for i in range(5)]
    results = await asyncio.gather(*(
        storage.append(convs[i % 5].id, role="visitor", sender_id=f"v{i % 5}", text=f"m{i}")
        for i in range(500)))
    by_conv = collections.defaultdict(list)
    for msg, new in results:
        assert new
        by_conv[msg.conversation_id].append(msg.seq)
    for conv in convs:
        assert sorted(by_conv[conv.id]) == list(range(1, 101))
        stored = await all_messages(storage, conv.id)
        assert [m.seq for m in stored] == list(range(1, 101))
        assert (await storage.get_conversation(conv.id)).last_seq == 100
        # each returned message is the stored one
        texts = {m.seq: m.text for m in stored}
        assert all(texts[m.seq] == m.text for m, _ in results if m.conversation_id == conv.id)


async def test_client_id_idempotent_three_sends_one_row_same_seq_also_concurrently(storage, target):
    conv = await storage.create_conversation("v", "shop")
    await storage.append(conv.id, role="visitor", sender_id="v", text="before")
    # three sequential sends
    sent = [await storage.append(conv.id, role="visitor", sender_id="v", text="hello",
                                 client_id="c-1") for _ in range(3)]
    assert [new for _, new in sent] == [True, False, False]
    assert {m.seq for m, _ in sent} == {2}
    # three concurrent sends (one batch), and three more through a second storage, as if
    # over two connections to two server processes
    other = await target.open()
    try:
        sent = await asyncio.gather(
            *(storage.append(conv.id, role="visitor", sender_id="v", text="again",
                             client_id="c-2") for _ in range(3)),
            *(other.append(conv.id, role="visitor", sender_id="v", text="again",
                           client_id="c-2") for _ in range(3)))
    finally:
        await other.close()
    assert sum(new for _, new in sent) == 1
    assert {m.seq for m, _ in sent} == {3}
    # client ids are per conversation and compared exactly (not case-folded)
    await storage.append(conv.id, role="visitor", sender_id="v", text="x", client_id="C-2")
    conv2 = await storage.create_conversation("v", "shop")
    m, new = await storage.append(conv2.id, role="visitor", sender_id="v", text="x", client_id="c-1")
    assert new and m.seq == 1
    stored = await all_messages(storage, conv.id)
    assert [(m.seq, m.client_id) for m in stored] == [(1, None), (2, "c-1"), (3, "c-2"), (4, "C-2")]
    assert (await storage.get_conversation(conv.id)).last_seq == 4


async def test_group_commit_uses_fewer_transactions_than_messages(storage):
    commits = []
    event.listen(storage.write_engine.sync_engine, "commit", lambda conn: commits.append(1))
    convs = [await storage.create_conversation(f"v{i}", "shop") for i in range(10)]
    commits.clear()
    before = storage.stats.batches
    n = 300
    await asyncio.gather(*(storage.append(convs[i % 10].id, role="visitor", sender_id="v",
                                          text=str(i)) for i in range(n)))
    transactions = storage.stats.batches - before
    assert transactions == len(commits)           # the writer's count is the database's
    assert transactions < n / 10, (transactions, storage.stats)
    assert storage.stats.largest_batch > 1


async def test_nothing_acked_before_commit(storage, target):
    conv = await storage.create_conversation("v", "shop")
    observed = []          # at each commit: how many of the batch's futures were already done
    fail_next = [True]

    def on_commit(conn):
        inflight = storage.committer.inflight
        observed.append((len(inflight), sum(f.done() for _, f in inflight)))
        if fail_next[0] and len(inflight) > 1:     # the first batch's commit fails
            fail_next[0] = False
            raise RuntimeError("injected commit failure")
    event.listen(storage.write_engine.sync_engine, "commit", on_commit)

    observer = await target.open()   # independent connections: sees committed data only
    try:
        async def send(i):
            msg, new = await storage.append(conv.id, role="visitor", sender_id="v",
                                            text=f"m{i}", client_id=f"c{i}")
            # acked: it must already be committed, i.e. visible to another connection
            seen = await observer.messages(conv.id, after_seq=msg.seq - 1, limit=1)
            assert seen and seen[0].client_id == f"c{i}" and seen[0].seq == msg.seq
            return msg
        msgs = await asyncio.gather(*(send(i) for i in range(100)))
    finally:
        await observer.close()
    assert not fail_next[0], "the injected failure never ran"
    assert observed and all(done == 0 for _, done in observed), observed
    assert any(size > 1 for size, _ in observed)
    assert sorted(m.seq for m in msgs) == list(range(1, 101))
    stored = await all_messages(storage, conv.id)
    assert [(m.seq, m.client_id) for m in stored] == sorted((m.seq, m.client_id) for m in msgs)


async def test_transition_is_compare_and_set_20_concurrent_assigners_one_wins(storage, target):
    conv = await storage.create_conversation("v", "shop", state=QUEUED)
    other = await target.open()          # a second router process on the same database
    try:
        agents = [f"{i:032x}" for i in range(20)]
        results = await asyncio.gather(*(
            (storage if i % 2 else other).transition(conv.id, to_state=HUMAN, agent_id=a,
                                                     from_states=[QUEUED])
            for i, a in enumerate(agents)))
    finally:
        await other.close()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert winners[0].state == HUMAN
    now = await storage.get_conversation(conv.id)
    assert (now.state, now.agent_id) == (HUMAN, winners[0].agent_id)
    # transfer: only from the current agent
    loser = next(a for a in agents if a != now.agent_id)
    assert await storage.transition(conv.id, to_state=HUMAN, agent_id="f" * 32,
                                    from_states=[HUMAN], from_agent=loser) is None
    moved = await storage.transition(conv.id, to_state=HUMAN, agent_id="f" * 32,
                                     from_states=[HUMAN], from_agent=now.agent_id)
    assert moved.agent_id == "f" * 32
    # from_agent=None means "unassigned", which it is not
    assert await storage.transition(conv.id, to_state=QUEUED, agent_id=None,
                                    from_agent=None) is None
    assert await storage.transition("0" * 32, to_state=HUMAN, agent_id="a" * 32) is None


async def test_other_writes_not_starved_by_a_stream_of_appends(target):
    s = await target.open(busy_timeout=0.5)
    try:
        chat = await s.create_conversation("v", "shop")
        stop = asyncio.Event()

        async def appender(w):
            n = 0
            while not stop.is_set():
                await s.append(chat.id, role="visitor", sender_id="v", text=f"{w}-{n}")
                n += 1
            return n

        tasks = [asyncio.ensure_future(appender(w)) for w in range(30)]
        try:
            for i in range(15):
                conv = await s.create_conversation(f"v{i}", "shop", state=QUEUED)
                assert await s.transition(conv.id, to_state=HUMAN, agent_id=f"{i:032x}",
                                          from_states=[QUEUED]) is not None
                await s.update_agent("0" * 32, capacity=3)
        finally:
            stop.set()
            sent = sum(await asyncio.gather(*tasks))
        assert sent > 0
        assert [m.seq for m in await all_messages(s, chat.id)] == list(range(1, sent + 1))
    finally:
        await s.close()


async def test_messages_paging_by_seq_with_capped_limit(storage):
    conv = await storage.create_conversation("v", "shop")
    n = MAX_PAGE + 20
    await asyncio.gather(*(storage.append(conv.id, role="bot", sender_id="bot", text=str(i))
                           for i in range(n)))
    assert len(await storage.messages(conv.id, limit=10_000)) == MAX_PAGE
    page = await storage.messages(conv.id, after_seq=100, limit=50)
    assert [m.seq for m in page] == list(range(101, 151))
    assert [m.seq for m in await storage.messages(conv.id, after_seq=n - 3)] == [n - 2, n - 1, n]
    assert await storage.messages(conv.id, after_seq=n) == []
    assert await storage.messages(conv.id, limit=0) == []
    assert await storage.messages("0" * 32) == []
    assert [m.seq for m in await all_messages(storage, conv.id)] == list(range(1, n + 1))


async def test_text_stored_exactly_as_given(storage):
    conv = await storage.create_conversation("v", "shop", meta={"page": "/cart?a=<b>"})
    texts = ["<img src=x onerror=alert(1)>", "<script>alert('x')</script> &amp; &lt;",
             "'; DROP TABLE kefu_messages; --", "{{ 7*7 }} ${7*7}", "javascript:alert(1)",
             "emoji 😀👍🏽 中文 العربية", "  spaces  \r\n\ttabs\n", "\u2028\u2029", "x" * 70_000]
    for t in texts:
        m, _ = await storage.append(conv.id, role="visitor", sender_id="v", text=t,
                                    meta={"html": "<i>"})
        assert m.text == t
    stored = await all_messages(storage, conv.id)
    assert [m.text for m in stored] == texts
    assert stored[0].meta == {"html": "<i>"}
    assert (await storage.get_conversation(conv.id)).meta == {"page": "/cart?a=<b>"}


async def test_migrations_idempotent_and_newer_schema_refused(target):
    s = await target.open()
    assert s.applied_migrations == list(range(1, SCHEMA_VERSION + 1))
    conv = await s.create_conversation("v", "shop")
    await s.append(conv.id, role="visitor", sender_id="v", text="kept")
    async with s.read_engine.connect() as conn:
        versions = (await conn.execute(sa.text(
            "SELECT version, applied_at FROM kefu_schema_version ORDER BY version"))).all()
    await s.close()

    # Opening an up-to-date database changes nothing.
    for _ in range(2):
        s = await target.open()
        assert s.applied_migrations == []
        async with s.read_engine.connect() as conn:
            assert (await conn.execute(sa.text(
                "SELECT version, applied_at FROM kefu_schema_version ORDER BY version"))).all() == versions
        assert [m.text for m in await s.messages(conv.id)] == ["kept"]
        await s.close()

    # A database from a newer kefu is refused with a clear error.
    s = await target.open()
    async with s.write_engine.begin() as conn:
        await conn.execute(sa.text(
            "INSERT INTO kefu_schema_version (version, description, applied_at) "
            "VALUES (:v, 'from the future', 0)"), {"v": SCHEMA_VERSION + 1})
    await s.close()
    with pytest.raises(SchemaTooNew, match="newer than this kefu"):
        await target.open()
    assert issubclass(SchemaTooNew, StorageError)


async def test_concurrent_first_open_migrates_once(target):
    opened = await asyncio.gather(*(target.open() for _ in range(3)))
    try:
        assert sorted(len(s.applied_migrations) for s in opened) == [0, 0, SCHEMA_VERSION]
    finally:
        for s in opened:
            await s.close()


async def test_agent_password_change_bumps_token_version(storage):
    a = await storage.add_agent("alice", "hash-1", display_name="Alice", capacity=3)
    assert a.token_version == 1
    assert (await storage.get_agent(username="alice")) == a
    same = await storage.update_agent(a.id, capacity=7, display_name="Alice B")
    assert (same.capacity, same.display_name, same.token_version) == (7, "Alice B", 1)
    changed = await storage.update_agent(a.id, password_hash="hash-2")
    assert (changed.password_hash, changed.token_version) == ("hash-2", 2)
    assert (await storage.get_agent(agent_id=a.id)).token_version == 2
    assert await storage.update_agent("0" * 32, password_hash="x") is None
    with pytest.raises(DuplicateKey):
        await storage.add_agent("alice", "other")
    await storage.add_agent("Alice", "h")        # usernames compare exactly
    assert [x.username for x in await storage.list_agents()] == ["Alice", "alice"]


async def _install_poison_trigger(storage, target: Target) -> None:
    """A database trigger that rejects the text 'POISON': a real database-side failure."""
    d = storage.dialect
    async with storage.write_engine.begin() as conn:
        if d == "sqlite":
            await conn.exec_driver_sql(
                "CREATE TRIGGER kefu_poison BEFORE INSERT ON kefu_messages "
                "WHEN NEW.text = 'POISON' BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
        elif d == "postgresql":
            await conn.exec_driver_sql(textwrap.dedent("""
                CREATE FUNCTION kefu_poison() RETURNS trigger AS $$
                BEGIN IF NEW.text = 'POISON' THEN RAISE EXCEPTION 'poisoned'; END IF;
                RETURN NEW; END $$ LANGUAGE plpgsql"""))
            await conn.exec_driver_sql(
                "CREATE TRIGGER kefu_poison BEFORE INSERT ON kefu_messages "
                "FOR EACH ROW EXECUTE FUNCTION kefu_poison()")
        else:
            await conn.exec_driver_sql(
                "CREATE TRIGGER kefu_poison BEFORE INSERT ON kefu_messages FOR EACH ROW "
                "BEGIN IF NEW.text = 'POISON' THEN "
                "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned'; END IF; END")


async def test_failing_batch_item_does_not_fail_the_others(storage, target):
    await _install_poison_trigger(storage, target)
    conv = await storage.create_conversation("v", "shop")
    texts = [f"ok {i}" for i in range(20)]
    texts[7] = "POISON"                                   # the database rejects this one
    calls = [storage.append(conv.id, role="visitor", sender_id="v", text=t, client_id=str(i))
             for i, t in enumerate(texts)]
    calls.append(storage.append(conv.id, role="visitor", sender_id="v", text="bad meta",
                                meta={"x": object()}))   # cannot be encoded
    calls.append(storage.append("0" * 32, role="visitor", sender_id="v", text="nowhere"))
    before = storage.stats.failed_batches
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert storage.stats.failed_batches == before + 1   # they were one batch, which failed
    assert isinstance(results[7], StorageError) and "poison" in repr(results[7].__cause__).lower()
    assert isinstance(results[20], StorageError)
    assert isinstance(results[21], NoSuchRow) and isinstance(results[21], StorageError)
    good = [r for i, r in enumerate(results[:20]) if i != 7]
    assert all(isinstance(r, tuple) and r[1] for r in good), results
    assert sorted(m.seq for m, _ in good) == list(range(1, 20))   # no seq burnt by the failure
    stored = await all_messages(storage, conv.id)
    assert [m.text for m in stored] == [t for t in texts if t != "POISON"]
    assert (await storage.get_conversation(conv.id)).last_seq == 19


async def test_close_drains_the_queue(target):
    s = await target.open()
    conv = await s.create_conversation("v", "shop")
    tasks = [asyncio.ensure_future(s.append(conv.id, role="visitor", sender_id="v", text=str(i)))
             for i in range(200)]
    await asyncio.sleep(0)           # let them enqueue (one loop turn; no waiting on work)
    await s.close()
    assert all(t.done() and not t.cancelled() and t.exception() is None for t in tasks)
    with pytest.raises(StorageError, match="closed"):
        await s.append(conv.id, role="visitor", sender_id="v", text="late")
    s = await target.open()
    try:
        assert [m.seq for m in await all_messages(s, conv.id)] == list(range(1, 201))
    finally:
        await s.close()


async def test_a_read_cancelled_twice_mid_query_leaves_nothing_running_after_close(target):
    # Cancelled mid-query, SQLAlchemy invalidates the connection; a second cancel while it
    # closes used to leave an aiosqlite close waiting on a stopped thread forever, which hung
    # the event loop's shutdown.  Operations now finish detached from their callers.
    s = await target.open()
    conv = await s.create_conversation("v", "shop")
    for i in range(30):
        await s.append(conv.id, role="visitor", sender_id="v", text=f"m{i}")
    before = asyncio.all_tasks()
    for turns in range(40):            # cancel at every point of a query's progress
        task = asyncio.ensure_future(s.messages(conv.id))
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.done()
    assert len(await s.messages(conv.id)) == 30      # the pool still serves
    await s.close()
    left = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()}
    assert not left, [t.get_coro() for t in left]
    with pytest.raises(StorageError, match="closed"):
        await s.get_conversation(conv.id)


async def test_storage_error_when_database_unwritable_reads_still_work(target):
    s = await target.open()
    conv = await s.create_conversation("v", "shop")
    await s.append(conv.id, role="visitor", sender_id="v", text="stored")
    await s.close()
    if target.backend == "sqlite":      # a read-only database file (root ignores chmod)
        ro = await open_storage(f"sqlite+aiosqlite:///file:{target.path}?mode=ro&uri=true")
    elif target.backend == "postgresql":
        args = target.options["connect_args"]["server_settings"]
        ro = await target.open(connect_args={"server_settings": {
            **args, "default_transaction_read_only": "on"}})
    else:
        ro = await target.open(connect_args={"init_command": "SET SESSION TRANSACTION READ ONLY"})
    try:
        with pytest.raises(StorageError) as err:
            await ro.append(conv.id, role="visitor", sender_id="v", text="lost")
        assert err.value.__cause__ is not None
        with pytest.raises(StorageError):
            await ro.create_conversation("v", "shop")
        with pytest.raises(StorageError):
            await ro.transition(conv.id, to_state=HUMAN, agent_id="a" * 32)
        assert [m.text for m in await ro.messages(conv.id)] == ["stored"]
        assert (await ro.get_conversation(conv.id)).last_seq == 1
    finally:
        await ro.close()


async def test_held_lock_fails_send_visibly_reads_work_and_it_recovers(target):
    s = await target.open(busy_timeout=0.3)
    conv = await s.create_conversation("v", "shop")
    await s.append(conv.id, role="visitor", sender_id="v", text="one")
    release = None
    if target.backend == "sqlite":
        holder = sqlite3.connect(target.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")              # the database's write lock
        release = holder.close
    elif target.backend == "postgresql":
        holder = await pg_admin(target)
        tr = holder.transaction()
        await tr.start()
        await holder.execute("SELECT 1 FROM kefu_conversations WHERE id = $1 FOR UPDATE", conv.id)
        release = lambda: holder.close()  # noqa: E731
    else:
        holder = await my_admin(target.url.rsplit("/", 1)[1])
        async with holder.cursor() as cur:
            await cur.execute("BEGIN")
            await cur.execute("SELECT 1 FROM kefu_conversations WHERE id = %s FOR UPDATE", (conv.id,))
        release = holder.close
    try:
        with pytest.raises(StorageError):
            await s.append(conv.id, role="visitor", sender_id="v", text="blocked", client_id="b")
        # A queue of sends behind the lock: every one fails (none acked), and the writer
        # gives up after a few single retries instead of one lock timeout per message.
        retries = s.stats.single_retries
        results = await asyncio.gather(*(
            s.append(conv.id, role="visitor", sender_id="v", text=f"q{i}") for i in range(30)),
            return_exceptions=True)
        assert all(isinstance(r, StorageError) for r in results), results
        assert s.stats.single_retries - retries <= s.committer.max_consecutive_failures
        # reads do not wait behind the blocked writer
        assert [m.text for m in await s.messages(conv.id)] == ["one"]
        assert (await s.get_conversation(conv.id)).last_seq == 1
    finally:
        r = release()
        if asyncio.iscoroutine(r):
            await r
    m, new = await s.append(conv.id, role="visitor", sender_id="v", text="blocked", client_id="b")
    assert (m.seq, new) == (2, True)
    await s.close()


async def _wait_for(condition, what: str, timeout: float = 20.0):
    """Poll an outside condition (the database's view of our sessions) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await condition()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return result


@pytest.mark.parametrize("target", ["postgresql", "mysql"], indirect=True)  # SQLite: no connection
async def test_lost_connection_mid_transaction_is_a_storage_error_then_recovers(target):
    s = await target.open(busy_timeout=30)
    conv = await s.create_conversation("v", "shop")
    await s.append(conv.id, role="visitor", sender_id="v", text="one")
    if target.backend == "postgresql":
        holder = await pg_admin(target)
        tr = holder.transaction()
        await tr.start()
        await holder.execute("SELECT 1 FROM kefu_conversations WHERE id = $1 FOR UPDATE", conv.id)

        async def blocked():
            return await holder.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")

        async def kill(rows):
            for r in rows:
                await holder.fetchval("SELECT pg_terminate_backend($1)", r["pid"])
        release = holder.close
    else:
        # The writer's MySQL thread id, taken as it sends its locking SELECT (no
        # information_schema: its snapshot can stall while another run's DDL commits).
        writer_thread: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_connect(dbapi_conn, record):
            cur = dbapi_conn.cursor()
            cur.execute("SELECT CONNECTION_ID()")
            record.info["thread_id"] = cur.fetchone()[0]
            cur.close()

        def before_execute(conn, cursor, statement, *args):
            if "FOR UPDATE" in statement and not writer_thread.done():
                writer_thread.set_result(conn.info["thread_id"])

        await s.write_engine.dispose()          # new connections, seen by on_connect
        event.listen(s.write_engine.sync_engine, "connect", on_connect)
        event.listen(s.write_engine.sync_engine, "before_cursor_execute", before_execute)
        holder = await my_admin(target.url.rsplit("/", 1)[1])
        async with holder.cursor() as cur:
            await cur.execute("BEGIN")
            await cur.execute("SELECT 1 FROM kefu_conversations WHERE id = %s FOR UPDATE", (conv.id,))

        async def blocked():
            return await asyncio.wait_for(asyncio.shield(writer_thread), 20)

        async def kill(thread_id):
            killer = await my_admin()
            try:
                async with killer.cursor() as cur:
                    await cur.execute(f"KILL {int(thread_id)}")
            finally:
                killer.close()

        async def release():
            holder.close()
    try:
        send = asyncio.ensure_future(s.append(conv.id, role="visitor", sender_id="v", text="cut",
                                              client_id="cut"))
        await kill(await _wait_for(blocked, "the writer to wait on the row lock"))
        with pytest.raises(StorageError) as err:
            await send                      # the connection died mid-transaction: not acked
        assert err.value.__cause__ is not None
    finally:
        await release()
    # the pool replaces the dead connection: sending works again, the lost one was not stored
    m, new = await s.append(conv.id, role="visitor", sender_id="v", text="cut", client_id="cut")
    assert (m.seq, new) == (2, True)
    assert [x.text for x in await s.messages(conv.id)] == ["one", "cut"]
    await s.close()


def test_storage_error_when_disk_full_then_recovers(tmp_path):
    """SQLite on a full disk (RLIMIT_FSIZE in a child process: works as root too)."""
    path = tmp_path / "kefu.sqlite3"
    code = textwrap.dedent(f"""
        import asyncio, json, os, resource, signal, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(HERE))!r})
        from server.storage import open_storage, StorageError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG instead of dying
        async def main():
            s = await open_storage("sqlite+aiosqlite:///{path}")
            conv = await s.create_conversation("v", "shop")
            await s.append(conv.id, role="visitor", sender_id="v", text="before")
            files = [p for p in ({str(path)!r}, {str(path)!r} + "-wal") if os.path.exists(p)]
            limit = max(os.path.getsize(p) for p in files)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))   # the disk is full
            out = {{}}
            try:
                await s.append(conv.id, role="visitor", sender_id="v", text="x" * 1_000_000, client_id="big")
                out["full"] = "stored?!"
            except StorageError as exc:
                out["full"] = "StorageError: " + str(exc.__cause__)
            out["read"] = [m.text for m in await s.messages(conv.id)]
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))    # space is back
            m, new = await s.append(conv.id, role="visitor", sender_id="v", text="x" * 1_000_000, client_id="big")
            out["after"] = [m.seq, new]
            await s.close()
            s = await open_storage("sqlite+aiosqlite:///{path}")
            out["final"] = [(m.seq, len(m.text)) for m in await s.messages(conv.id)]
            await s.close()
            print(json.dumps(out))
        asyncio.run(main())
    """)
    import subprocess
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["full"].startswith("StorageError"), out
    assert "full" in out["full"].lower() or "disk" in out["full"].lower() or "large" in out["full"].lower(), out
    assert out["read"] == ["before"]
    assert out["after"] == [2, True]
    assert out["final"] == [[1, 6], [2, 1_000_000]]


async def test_sigkill_mid_burst_keeps_every_acked_message_once_and_seqs_contiguous(target):
    s = await target.open()
    conv = await s.create_conversation("v", "shop")
    await s.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(HERE, "storage_crash_worker.py"), target.url,
        json.dumps(target.options), conv.id, "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    acked = {}
    killed = False
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)) == b"ready\n"
        while len(acked) < 613:          # not a multiple of the writer count
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, (await proc.stderr.read()).decode()
            _, seq, cid = line.decode().split()
            acked[cid] = int(seq)
        assert proc.returncode is None
        proc.send_signal(signal.SIGKILL)         # mid-burst: 20 writers are still appending
        killed = True
        rest = await proc.stdout.read()          # acks printed before the kill count too
    finally:
        if not killed:   # (a second signal would race asyncio's child watcher for the pid)
            proc.kill()
        await proc.wait()
    for line in rest.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ack":    # a torn last line is not an ack
            acked[parts[2]] = int(parts[1])
    assert proc.returncode == -signal.SIGKILL

    s = await target.open()
    try:
        stored = await all_messages(s, conv.id)
        last_seq = (await s.get_conversation(conv.id)).last_seq
    finally:
        await s.close()
    seqs = [m.seq for m in stored]
    assert seqs == list(range(1, len(stored) + 1)) and last_seq == len(stored)
    by_client = collections.Counter(m.client_id for m in stored)
    assert max(by_client.values()) == 1
    where = {m.client_id: m.seq for m in stored}
    missing = [cid for cid in acked if cid not in where]
    assert not missing, f"{len(missing)} acked messages lost, e.g. {missing[:5]}"
    assert all(where[cid] == seq for cid, seq in acked.items())
    assert len(stored) >= len(acked)


async def test_deleting_closed_conversations_by_visitor_or_age_leaves_open_ones_and_others(storage):
    """Rule (privacy): a visitor's erasure and the retention job delete closed conversations
    with their messages, by visitor or by when they were closed, never an open conversation
    nor anyone else's."""
    import time as _time

    from server.storage.base import CLOSED

    async def conversation(visitor: str, closed: bool):
        conv = await storage.create_conversation(visitor, "bot")
        for i in range(3):
            await storage.append(conv.id, role="visitor", sender_id=visitor, text=f"m{i}")
        if closed:
            await storage.transition(conv.id, to_state=CLOSED, agent_id=None)
        return conv.id

    old_closed = await conversation("v" * 32, True)
    open_one = await conversation("v" * 32, False)
    other = await conversation("w" * 32, True)
    assert await storage.delete_closed_conversations(visitor_id="v" * 32) == 1
    assert await storage.get_conversation(old_closed) is None
    assert await storage.messages(old_closed, after_seq=0, limit=10) == []
    assert len(await storage.messages(open_one, after_seq=0, limit=10)) == 3
    assert await storage.delete_closed_conversations(closed_before=_time.time() - 3600) == 0   # too recent
    assert await storage.delete_closed_conversations(closed_before=_time.time() + 1) == 1      # "w"'s
    assert await storage.get_conversation(other) is None
    assert (await storage.get_conversation(open_one)).state != CLOSED
    with pytest.raises(ValueError):
        await storage.delete_closed_conversations()
