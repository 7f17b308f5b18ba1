"""The :class:`~server.storage.base.Storage` implementation: SQLAlchemy 2 async Core.

One class for SQLite (aiosqlite, the embedded default), PostgreSQL (asyncpg) and
MySQL/MariaDB (asyncmy); the dialect differences are confined to engine set-up here and to
the migration lock in :mod:`.migrations`.

Concurrency model
-----------------
* ``append`` goes through a :class:`~.group_commit.GroupCommitter`: one writer task writes
  many messages per transaction (see :meth:`SqlStorage._write_batch`).
* Every other write (conversations, transitions, agents) runs in its own short transaction
  on the write engine; it does not queue behind the message writer's queue: on
  PostgreSQL/MySQL row locks order it, on SQLite it waits at most for the batch being
  written (in-process writes take turns on a fair lock, see ``_serial_writes``).
* Reads use a separate read engine (on SQLite: separate connections in WAL mode, so a
  reader never waits for a writer; on PostgreSQL/MySQL the same pool, READ COMMITTED).
* Seq allocation: the batch locks the conversation rows it appends to (``SELECT ... FOR
  UPDATE`` in id order; SQLite's ``BEGIN IMMEDIATE`` locks the whole database), reads
  ``last_seq``, looks up already-stored client ids, inserts the new messages with
  ``last_seq+1 ...`` and writes the new ``last_seq`` -- all in one transaction, so seqs are
  contiguous even with several server processes on one PostgreSQL/MySQL database.  The
  unique (conversation_id, client_id) key is the last line of defence: a duplicate that
  slips through fails the batch, the per-item retry then finds the stored copy.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import migrations, schema
from .base import (BOT, CLOSED, ROLES, STATES, UNSET, Agent, Conversation, Storage, StorageError,
                   StoredMessage)
from ..tasks import run_to_end, wait_all
from .group_commit import GroupCommitter

log = logging.getLogger(__name__)

#: Hard cap on rows returned by one read (messages, conversations).
MAX_PAGE = 500

_DEFAULT_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg", "mysql": "asyncmy",
                    "mariadb": "asyncmy"}


class NoSuchRow(StorageError, LookupError):
    """The row an operation needs (e.g. the conversation of an append) does not exist."""

    status_code = 404
    code = "not_found"


class DuplicateKey(StorageError):
    """A unique key is taken (e.g. an agent username)."""

    status_code = 409
    code = "conflict"


_C, _M, _A = schema.conversations, schema.messages, schema.agents


def _storage_errors(what: str):
    """Turn database and I/O failures into StorageError (cause attached)."""
    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except StorageError:
                raise
            except (sa.exc.SQLAlchemyError, OSError, TimeoutError, UnicodeError) as exc:
                raise StorageError(f"{what} failed: {exc}") from exc
        return wrapper
    return deco


def _operation(what: str):
    """A public storage operation: failures become StorageError (see _storage_errors), and it
    runs to its end whatever its caller does (``server.tasks.run_to_end``); after close() it is a
    StorageError.

    Why: cancelling a task in the middle of a query makes SQLAlchemy invalidate the connection,
    and a second cancellation while it closes leaves aiosqlite waiting on a worker thread that
    has already stopped: a task that never ends, which hangs the event loop's shutdown
    (asyncio.run cancels it once and waits forever).  Cancels come in pairs in practice: a
    handler cancelled on disconnect and again at server shutdown.  Run to its end, the query
    finishes (bounded by busy/lock timeouts), its connection goes back to the pool, and the
    caller alone sees CancelledError.  close() waits for these operations before disposing
    the pools."""
    def deco(fn):
        guarded = _storage_errors(what)(fn)

        @functools.wraps(fn)
        async def wrapper(self: "SqlStorage", *args, **kwargs):
            if self._closed:
                raise StorageError("storage is closed")
            return await run_to_end(guarded(self, *args, **kwargs), self._running,
                                    orphan_failure=_orphan_failure)
        return wrapper
    return deco


def _orphan_failure(exc: BaseException) -> None:
    # The caller was cancelled (it went away): nobody else would hear of this failure.
    log.warning("storage operation failed after its caller went away: %r", exc)


@dataclass(slots=True)
class _Append:
    conversation_id: str
    role: str
    sender_id: str
    kind: str
    text: str
    client_id: str | None
    meta: dict[str, Any]
    created_at: float


def _json(value: dict[str, Any] | None) -> str:
    return json.dumps(value or {}, ensure_ascii=False, separators=(",", ":"))


def _conversation(row: Any) -> Conversation:
    return Conversation(id=row.id, visitor_id=row.visitor_id, bot=row.bot, state=row.state,
                        agent_id=row.agent_id, created_at=row.created_at,
                        updated_at=row.updated_at, last_seq=int(row.last_seq),
                        meta=json.loads(row.meta))


def _message(row: Any) -> StoredMessage:
    return StoredMessage(conversation_id=row.conversation_id, seq=int(row.seq), role=row.role,
                         sender_id=row.sender_id, kind=row.kind, text=row.text,
                         client_id=row.client_id, created_at=row.created_at,
                         meta=json.loads(row.meta))


def _agent(row: Any) -> Agent:
    return Agent(id=row.id, username=row.username, display_name=row.display_name,
                 password_hash=row.password_hash, capacity=int(row.capacity),
                 token_version=int(row.token_version), created_at=row.created_at, team=row.team)


def _normalise_url(url: str | URL) -> URL:
    u = make_url(url)
    backend = u.get_backend_name()
    if backend not in _DEFAULT_DRIVERS:
        raise StorageError(f"unsupported database {backend!r}: use sqlite, postgresql or mysql")
    if "+" not in u.drivername:
        u = u.set(drivername=f"{backend}+{_DEFAULT_DRIVERS[backend]}")
    if backend in ("mysql", "mariadb") and "charset" not in u.query:
        u = u.update_query_dict({"charset": "utf8mb4"})
    return u


def _sqlite_engine(url: URL, *, writer: bool, synchronous: str, busy_timeout: float,
                   echo: bool) -> AsyncEngine:
    engine = create_async_engine(url, echo=echo)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Take transaction control away from the sqlite3 module (it would BEGIN lazily and
        # DEFERRED); we emit BEGIN ourselves in the "begin" hook below.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        # (WAL mode is persistent in the file: _sqlite_enable_wal sets it once at open.)
        # Durability.  In WAL mode a commit appends the transaction's pages and a commit
        # frame to the -wal file with write(2) before COMMIT returns.  From then on the data
        # is in the kernel's page cache and survives the death of *this process* (SIGKILL,
        # crash, OOM kill) with any `synchronous` setting, NORMAL included: the next opener
        # replays the WAL.  What NORMAL risks is an OS crash or power cut, which can lose the
        # last commits because the WAL is fsynced only at checkpoints.  We default to FULL
        # (fsync of the WAL on every commit) so that an acknowledged message survives power
        # loss too; group commit pays that fsync once per batch, not once per message.
        # `sqlite_synchronous="NORMAL"` trades that for speed where SIGKILL-safety suffices.
        cur.execute(f"PRAGMA synchronous = {synchronous}")
        if not writer:
            cur.execute("PRAGMA query_only = ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn):
        # The writer takes the write lock up front (IMMEDIATE): a deferred transaction that
        # reads and then writes could fail with SQLITE_BUSY on lock upgrade instead of
        # waiting busy_timeout.  Readers start a plain (deferred) snapshot transaction.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    return engine


async def _sqlite_enable_wal(engine: AsyncEngine, busy_timeout: float) -> None:
    """Put the database in WAL mode (readers never block the writer nor the writer readers).

    Switching needs an exclusive lock, and SQLite answers SQLITE_BUSY at once, without its
    busy handler, when another connection (e.g. a second process opening a new database at
    the same moment) is busy with it: so retry until busy_timeout."""
    import sqlite3
    deadline = time.monotonic() + max(busy_timeout, 1.0)
    async with engine.connect() as conn:
        db = (await conn.get_raw_connection()).driver_connection   # aiosqlite, no transaction
        while True:
            try:
                async with db.execute("PRAGMA journal_mode = WAL") as cur:
                    mode = (await cur.fetchone())[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
    if str(mode).lower() != "wal":      # e.g. a read-only file still in rollback-journal mode
        log.warning("SQLite database is in journal_mode=%s, not WAL", mode)


class SqlStorage(Storage):
    """Open it with :func:`server.storage.open_storage`."""

    def __init__(self, write_engine: AsyncEngine, read_engine: AsyncEngine, *,
                 batch_max: int = 256, batch_window: float = 0.0):
        self.write_engine = write_engine
        self.read_engine = read_engine
        self.dialect = write_engine.dialect.name
        self.committer: GroupCommitter[_Append, tuple[StoredMessage, bool]] = GroupCommitter(
            self._write_batch, max_batch=batch_max, window=batch_window)
        self.applied_migrations: list[int] = []
        self._closed = False
        # SQLite has one write lock per database, and its busy handler polls with sleeps
        # (up to 100 ms): writers of one process competing through it would add latency and
        # could starve a transition behind a stream of batches.  So in-process writes take
        # turns on a fair asyncio.Lock and reach SQLite one at a time; busy_timeout is left
        # for other processes.  (PostgreSQL and MySQL lock rows, so writes run in parallel.)
        self._serial_writes = asyncio.Lock() if self.dialect == "sqlite" else None
        self._running: set[asyncio.Task] = set()     # operations in flight (see _operation)

    @contextlib.asynccontextmanager
    async def _write(self):
        """A write transaction (committed on leaving the block)."""
        if self._serial_writes is None:
            async with self.write_engine.begin() as conn:
                yield conn
        else:
            async with self._serial_writes, self.write_engine.begin() as conn:
                yield conn

    @property
    def stats(self):
        """Group-commit counters: batches (transactions), items, failures."""
        return self.committer.stats

    # -- lifecycle
    @classmethod
    async def open(cls, url: str | URL, *, batch_max: int = 256, batch_window: float = 0.0,
                   busy_timeout: float = 5.0, sqlite_synchronous: str = "FULL",
                   pool_size: int = 10, echo: bool = False, migrate: bool = True,
                   connect_args: dict[str, Any] | None = None) -> "SqlStorage":
        u = _normalise_url(url)
        backend = u.get_backend_name()
        if backend == "sqlite":
            if sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
                raise ValueError("sqlite_synchronous must be FULL, NORMAL or EXTRA")
            path = u.database
            if not path or path == ":memory:" or u.query.get("mode") == "memory":
                raise StorageError("an in-memory SQLite database cannot be shared between the "
                                   "writer and readers; give a file path")
            if not path.startswith("file:"):          # (a "file:" URI is used as it is)
                parent = os.path.dirname(os.path.abspath(path))
                try:
                    os.makedirs(parent, exist_ok=True)
                except OSError as exc:
                    raise StorageError(f"cannot create the data directory {parent}: {exc}") from exc
            kw = dict(synchronous=sqlite_synchronous.upper(), busy_timeout=busy_timeout, echo=echo)
            write = _sqlite_engine(u, writer=True, **kw)
            read = _sqlite_engine(u, writer=False, **kw)
        else:
            # busy_timeout bounds lock waits on every backend, so a held lock makes a send
            # fail visibly (StorageError, not acked) instead of hanging (THREATS 18).
            args: dict[str, Any] = dict(connect_args or {})
            if backend == "postgresql":
                settings = dict(args.get("server_settings") or {})
                settings.setdefault("lock_timeout", f"{max(1, int(busy_timeout * 1000))}ms")
                args["server_settings"] = settings
                args.setdefault("command_timeout", max(busy_timeout * 6, 30.0))
            write = read = create_async_engine(
                u, echo=echo, isolation_level="READ COMMITTED", pool_size=pool_size,
                max_overflow=pool_size, pool_pre_ping=True, pool_recycle=3600,
                connect_args=args)
            if backend in ("mysql", "mariadb"):
                wait = max(1, round(busy_timeout))      # MySQL counts whole seconds

                @event.listens_for(write.sync_engine, "connect")
                def _on_connect(dbapi_conn, _record):
                    cur = dbapi_conn.cursor()
                    cur.execute(f"SET SESSION innodb_lock_wait_timeout = {wait}")
                    cur.close()
        self = cls(write, read, batch_max=batch_max, batch_window=batch_window)
        try:
            if backend == "sqlite":
                await self._enable_wal(busy_timeout)
            if migrate:
                await self._migrate()
        except BaseException:
            await self._dispose()
            raise
        return self

    @_storage_errors("opening the SQLite database")
    async def _enable_wal(self, busy_timeout: float) -> None:
        await _sqlite_enable_wal(self.write_engine, busy_timeout)

    @_storage_errors("schema migration")
    async def _migrate(self) -> None:
        async with self.write_engine.begin() as conn:
            self.applied_migrations = await conn.run_sync(migrations.migrate)
        if self.applied_migrations:
            log.info("storage migrated to schema version %d (applied %s)",
                     migrations.LATEST, self.applied_migrations)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Operations whose callers went away finish and return their connections first.
            await wait_all(self._running)
            await self.committer.close()      # drains: every submitted append is written
        finally:
            await self._dispose()

    async def _dispose(self) -> None:
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()

    # -- conversations
    @_operation("create_conversation")
    async def create_conversation(self, visitor_id: str, bot: str, state: str = BOT,
                                  meta: dict[str, Any] | None = None) -> Conversation:
        if state not in STATES:
            raise ValueError(f"unknown conversation state {state!r}")
        now = time.time()
        conv = Conversation(id=secrets.token_hex(16), visitor_id=visitor_id, bot=bot,
                            state=state, agent_id=None, created_at=now, updated_at=now,
                            last_seq=0, meta=dict(meta or {}))
        async with self._write() as conn:
            await conn.execute(sa.insert(_C).values(
                id=conv.id, visitor_id=visitor_id, bot=bot, state=state, agent_id=None,
                created_at=now, updated_at=now, last_seq=0, meta=_json(meta)))
        return conv

    @_operation("get_conversation")
    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        async with self.read_engine.connect() as conn:
            row = (await conn.execute(sa.select(_C).where(_C.c.id == conversation_id))).first()
        return _conversation(row) if row is not None else None

    @_operation("list_conversations")
    async def list_conversations(self, *, state: str | None = None, agent_id: str | None = None,
                                 visitor_id: str | None = None, limit: int = 50,
                                 before: float | None = None) -> list[Conversation]:
        """Newest first (by created_at); ``before`` pages on to older conversations."""
        limit = min(int(limit), MAX_PAGE)
        if limit <= 0:
            return []
        q = sa.select(_C)
        if state is not None:
            q = q.where(_C.c.state == state)
        if agent_id is not None:
            q = q.where(_C.c.agent_id == agent_id)
        if visitor_id is not None:
            q = q.where(_C.c.visitor_id == visitor_id)
        if before is not None:
            q = q.where(_C.c.created_at < before)
        q = q.order_by(_C.c.created_at.desc(), _C.c.id.desc()).limit(limit)
        async with self.read_engine.connect() as conn:
            return [_conversation(r) for r in await conn.execute(q)]

    @_operation("last_seqs")
    async def last_seqs(self, conversation_ids: Sequence[str]) -> dict[str, int]:
        ids = sorted(set(conversation_ids))
        out: dict[str, int] = {}
        async with self.read_engine.connect() as conn:
            for i in range(0, len(ids), MAX_PAGE):
                q = sa.select(_C.c.id, _C.c.last_seq).where(_C.c.id.in_(ids[i:i + MAX_PAGE]))
                out.update({r.id: int(r.last_seq) for r in await conn.execute(q)})
        return out

    @_operation("delete_closed_conversations")
    async def delete_closed_conversations(self, *, visitor_id: str | None = None,
                                          closed_before: float | None = None) -> int:
        if visitor_id is None and closed_before is None:
            raise ValueError("name a visitor or a date: deleting every closed conversation is not offered")
        q = sa.select(_C.c.id).where(_C.c.state == CLOSED)
        if visitor_id is not None:
            q = q.where(_C.c.visitor_id == visitor_id)
        if closed_before is not None:
            q = q.where(_C.c.updated_at < closed_before)
        deleted = 0
        while True:        # in pages: one transaction never holds the write lock for long
            async with self._write() as conn:
                ids = [r.id for r in await conn.execute(q.limit(MAX_PAGE))]
                if not ids:
                    return deleted
                await conn.execute(sa.delete(_M).where(_M.c.conversation_id.in_(ids)))
                await conn.execute(sa.delete(_C).where(_C.c.id.in_(ids)).where(_C.c.state == CLOSED))
            deleted += len(ids)

    @_operation("transition")
    async def transition(self, conversation_id: str, *, to_state: str, agent_id: str | None,
                         from_states: Sequence[str] | None = None,
                         from_agent: Any = UNSET) -> Conversation | None:
        if to_state not in STATES:
            raise ValueError(f"unknown conversation state {to_state!r}")
        # Compare-and-set in ONE statement: the database evaluates the WHERE clause on the
        # locked row, so of two concurrent routers exactly one sees rowcount 1.
        stmt = sa.update(_C).where(_C.c.id == conversation_id)
        if from_states is not None:
            stmt = stmt.where(_C.c.state.in_(list(from_states)))
        if from_agent is not UNSET:
            stmt = stmt.where(_C.c.agent_id.is_(None) if from_agent is None
                              else _C.c.agent_id == from_agent)
        stmt = stmt.values(state=to_state, agent_id=agent_id, updated_at=time.time())
        async with self._write() as conn:
            if (await conn.execute(stmt)).rowcount != 1:
                return None
            row = (await conn.execute(sa.select(_C).where(_C.c.id == conversation_id))).first()
        return _conversation(row)

    # -- messages
    async def append(self, conversation_id: str, *, role: str, sender_id: str, text: str,
                     kind: str = "text", client_id: str | None = None,
                     meta: dict[str, Any] | None = None) -> tuple[StoredMessage, bool]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if not isinstance(text, str):
            raise TypeError("text must be a str")
        # A closed storage is refused by the committer (closed first thing in close()).
        return await self.committer.submit(_Append(
            conversation_id=conversation_id, role=role, sender_id=sender_id, kind=kind,
            text=text, client_id=client_id, meta=dict(meta or {}), created_at=time.time()))

    @_storage_errors("storing messages")
    async def _write_batch(self, items: Sequence[_Append]) -> list[Any]:
        """Write ``items`` in ONE transaction; one result per item: (message, new) or an
        exception instance for an item that cannot be stored (unknown conversation)."""
        results: list[Any] = [None] * len(items)
        now = time.time()
        conv_ids = sorted({it.conversation_id for it in items})
        async with self._write() as conn:
            # Lock the conversation rows, always in id order (no deadlock between writers).
            rows = await conn.execute(
                sa.select(_C.c.id, _C.c.last_seq).where(_C.c.id.in_(conv_ids))
                .order_by(_C.c.id).with_for_update())
            last = {r.id: int(r.last_seq) for r in rows}
            start = dict(last)
            # Client ids already stored (a resend): they return the stored copy.
            stored: dict[tuple[str, str], StoredMessage] = {}
            keyed = [it for it in items if it.client_id is not None and it.conversation_id in last]
            if keyed:
                q = sa.select(_M).where(
                    _M.c.conversation_id.in_(sorted({it.conversation_id for it in keyed})),
                    _M.c.client_id.in_(sorted({it.client_id for it in keyed})))
                for r in await conn.execute(q):
                    stored[(r.conversation_id, r.client_id)] = _message(r)
            inserts = []
            for i, it in enumerate(items):
                if it.conversation_id not in last:
                    results[i] = NoSuchRow(f"no conversation {it.conversation_id!r}")
                    continue
                key = (it.conversation_id, it.client_id)
                if it.client_id is not None and key in stored:
                    results[i] = (stored[key], False)   # a retry, maybe within this batch
                    continue
                seq = last[it.conversation_id] = last[it.conversation_id] + 1
                msg = StoredMessage(conversation_id=it.conversation_id, seq=seq, role=it.role,
                                    sender_id=it.sender_id, kind=it.kind, text=it.text,
                                    client_id=it.client_id, created_at=it.created_at,
                                    meta=it.meta)
                inserts.append({"conversation_id": it.conversation_id, "seq": seq,
                                "role": it.role, "sender_id": it.sender_id, "kind": it.kind,
                                "text": it.text, "client_id": it.client_id,
                                "created_at": it.created_at, "meta": _json(it.meta)})
                if it.client_id is not None:
                    stored[key] = msg
                results[i] = (msg, True)
            if inserts:
                await conn.execute(sa.insert(_M), inserts)
                await conn.execute(
                    sa.update(_C).where(_C.c.id == sa.bindparam("b_id"))
                    .values(last_seq=sa.bindparam("b_last"), updated_at=sa.bindparam("b_now")),
                    [{"b_id": cid, "b_last": seq, "b_now": now}
                     for cid, seq in last.items() if seq != start[cid]])
        # Leaving the block committed the transaction; only now are results handed out.
        return results

    @_operation("reading messages")
    async def messages(self, conversation_id: str, *, after_seq: int = 0,
                       limit: int = 100) -> list[StoredMessage]:
        limit = min(int(limit), MAX_PAGE)
        if limit <= 0:
            return []
        q = (sa.select(_M).where(_M.c.conversation_id == conversation_id,
                                 _M.c.seq > int(after_seq))
             .order_by(_M.c.seq).limit(limit))
        async with self.read_engine.connect() as conn:
            return [_message(r) for r in await conn.execute(q)]

    # -- agents
    @_operation("add_agent")
    async def add_agent(self, username: str, password_hash: str, *, display_name: str = "",
                        capacity: int = 5, team: str = "default") -> Agent:
        agent = Agent(id=secrets.token_hex(16), username=username,
                      display_name=display_name or username, password_hash=password_hash,
                      capacity=int(capacity), token_version=1, created_at=time.time(), team=team)
        try:
            async with self._write() as conn:
                await conn.execute(sa.insert(_A).values(
                    id=agent.id, username=username, display_name=agent.display_name,
                    password_hash=password_hash, capacity=agent.capacity,
                    token_version=agent.token_version, created_at=agent.created_at, team=team))
        except sa.exc.IntegrityError as exc:
            raise DuplicateKey(f"agent username {username!r} is taken") from exc
        return agent

    @_operation("get_agent")
    async def get_agent(self, *, agent_id: str | None = None,
                        username: str | None = None) -> Agent | None:
        if (agent_id is None) == (username is None):
            raise ValueError("give exactly one of agent_id, username")
        cond = _A.c.id == agent_id if agent_id is not None else _A.c.username == username
        async with self.read_engine.connect() as conn:
            row = (await conn.execute(sa.select(_A).where(cond))).first()
        return _agent(row) if row is not None else None

    @_operation("list_agents")
    async def list_agents(self) -> list[Agent]:
        async with self.read_engine.connect() as conn:
            return [_agent(r) for r in await conn.execute(sa.select(_A).order_by(_A.c.username))]

    @_operation("update_agent")
    async def update_agent(self, agent_id: str, *, password_hash: str | None = None,
                           capacity: int | None = None,
                           display_name: str | None = None, revoke_tokens: bool = False) -> Agent | None:
        values: dict[str, Any] = {}
        if password_hash is not None:
            values["password_hash"] = password_hash
        if password_hash is not None or revoke_tokens:
            values["token_version"] = _A.c.token_version + 1   # revokes older tokens
        if capacity is not None:
            values["capacity"] = int(capacity)
        if display_name is not None:
            values["display_name"] = display_name
        if not values:  # nothing to write: no write transaction (on SQLite, no write lock)
            return await self.get_agent(agent_id=agent_id)
        async with self._write() as conn:
            res = await conn.execute(sa.update(_A).where(_A.c.id == agent_id).values(**values))
            if res.rowcount != 1:
                return None
            row = (await conn.execute(sa.select(_A).where(_A.c.id == agent_id))).first()
        return _agent(row) if row is not None else None
