"""Schema migrations, applied automatically when storage opens.

``kefu_schema_version`` holds one row per applied step.  :data:`STEPS` is the ordered list
of steps; each is a function of a sync SQLAlchemy ``Connection`` (run through
``AsyncConnection.run_sync``).  :func:`migrate` runs, in ONE transaction:

1. take a migration lock, so two processes opening the same database at once do not both
   migrate (PostgreSQL: ``pg_advisory_xact_lock``; MySQL/MariaDB: ``GET_LOCK``; SQLite: the
   writer's ``BEGIN IMMEDIATE`` already excludes every other writer);
2. create ``kefu_schema_version`` if missing and read the highest version;
3. refuse a database newer than this code (:class:`SchemaTooNew`);
4. apply the missing steps in order, recording each.

An up-to-date database is only read.  PostgreSQL and SQLite run DDL transactionally, so a
failed step leaves the database as it was; MySQL/MariaDB commit DDL implicitly, so there a
step must be written to be re-runnable (``checkfirst``/``IF NOT EXISTS``).

Rule for future steps: never edit a released step; append a new one with explicit DDL
(``ALTER TABLE``...), because :mod:`.schema` describes only the *latest* schema.
"""
from __future__ import annotations

import time
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema
from .base import StorageError


class SchemaTooNew(StorageError):
    """The database was migrated by a newer kefu than this one."""


def _v1_initial(conn: Connection) -> None:
    # Step 1 is the initial schema, which is also the latest one today.  When the schema
    # changes, step 1 must be frozen (a copy of these four tables) before schema.py moves on.
    for table in (schema.conversations, schema.messages, schema.agents):
        table.create(conn, checkfirst=True)


#: (version, description, apply) in order; versions are 1, 2, 3 ... with no gaps.
STEPS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial schema: conversations, messages, agents", _v1_initial),
]
LATEST = STEPS[-1][0]
assert [v for v, _, _ in STEPS] == list(range(1, LATEST + 1))

_LOCK_NAME = "kefu_schema_migration"
_PG_LOCK_KEY = 0x6B656675  # "kefu"


def _lock(conn: Connection) -> Callable[[], None]:
    name = conn.dialect.name
    if name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    elif name in ("mysql", "mariadb"):
        got = conn.execute(sa.text("SELECT GET_LOCK(:n, 60)"), {"n": _LOCK_NAME}).scalar()
        if got != 1:
            raise StorageError("timed out waiting for another process's schema migration")
        return lambda: conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": _LOCK_NAME})
    return lambda: None


def current_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table(schema.schema_version.name):
        return 0
    return conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).scalar() or 0


def migrate(conn: Connection) -> list[int]:
    """Bring the database to :data:`LATEST`; return the versions applied (empty when the
    database was up to date).  Runs inside the caller's transaction."""
    unlock = _lock(conn)
    try:
        have = current_version(conn)
        if have > LATEST:
            raise SchemaTooNew(
                f"the database schema is at version {have}, newer than this kefu supports "
                f"({LATEST}): it was migrated by a newer kefu; upgrade kefu or use a backup")
        if have == LATEST:
            return []
        schema.schema_version.create(conn, checkfirst=True)
        applied = []
        for version, description, apply in STEPS:
            if version <= have:
                continue
            apply(conn)
            conn.execute(sa.insert(schema.schema_version).values(
                version=version, description=description, applied_at=time.time()))
            applied.append(version)
        return applied
    finally:
        unlock()
