"""Real databases for the storage tests: SQLite in tmp_path, PostgreSQL and MariaDB.

Isolation, so that concurrent runs of the suite never collide:
- PostgreSQL: one database per test session (``kefu_test_<pid>_<random>``), one schema
  per test inside it (selected with ``search_path``); the database is dropped at the end.
- MariaDB/MySQL: one database per test, dropped at teardown.
A server that is down skips its tests locally, and FAILS them when ``CI`` is set.
Override the servers with KEFU_TEST_PG_HOST/PORT/USER and KEFU_TEST_MYSQL_HOST/PORT/USER.
"""
from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import pytest

from server.storage import open_storage

BACKENDS = ["sqlite", "postgresql", "mysql"]

PG_HOST = os.environ.get("KEFU_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("KEFU_TEST_PG_PORT", "5432"))
PG_USERS = [os.environ["KEFU_TEST_PG_USER"]] if "KEFU_TEST_PG_USER" in os.environ else ["postgres", "root"]
MY_HOST = os.environ.get("KEFU_TEST_MYSQL_HOST", "127.0.0.1")
MY_PORT = int(os.environ.get("KEFU_TEST_MYSQL_PORT", "3306"))
MY_USER = os.environ.get("KEFU_TEST_MYSQL_USER", "root")


def unavailable(what: str, why: Any) -> None:
    msg = f"{what} is not reachable: {why!r}"
    if os.environ.get("CI"):
        pytest.fail(msg + " -- CI is set, so the CI script must start this server", pytrace=False)
    pytest.skip(msg)


def run_sync(make_coro) -> Any:
    """Run a coroutine to completion from sync code, even while a loop runs in this thread
    (a session fixture first requested from inside an async test)."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


@dataclass
class Target:
    """How to open storage on one test's private database."""
    backend: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    path: str | None = None          # the SQLite file
    pg_schema: str | None = None

    async def open(self, **options: Any):
        return await open_storage(self.url, **{**self.options, **options})


# -- PostgreSQL
async def _pg_connect(database: str):
    import asyncpg
    errors = []
    for user in PG_USERS:
        try:
            conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user,
                                         database=database, timeout=5)
            return conn, user
        except Exception as exc:  # noqa: BLE001 -- try the next user
            errors.append(exc)
    raise ConnectionError(f"PostgreSQL at {PG_HOST}:{PG_PORT} as {PG_USERS}: {errors}")


@pytest.fixture(scope="session")
def pg_database():
    """(database name, user) of a database private to this test session."""
    name = unique_name("kefu_test")

    async def create():
        conn, user = await _pg_connect("postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return user

    try:
        user = run_sync(create)
    except Exception as exc:  # noqa: BLE001
        unavailable(f"PostgreSQL at {PG_HOST}:{PG_PORT}", exc)

    yield name, user

    async def drop():
        conn, _ = await _pg_connect("postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
    run_sync(drop)


async def pg_admin(target: Target):
    """An asyncpg connection to the target's database and schema."""
    import asyncpg
    u = target.url.split("://", 1)[1]
    user, rest = u.split("@", 1)
    database = rest.rsplit("/", 1)[1]
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database=database,
                                 server_settings={"search_path": target.pg_schema})


# -- MariaDB / MySQL
async def my_admin(database: str | None = None):
    import asyncmy
    return await asyncmy.connect(host=MY_HOST, port=MY_PORT, user=MY_USER, database=database,
                                 connect_timeout=5, autocommit=True, charset="utf8mb4")


async def my_execute(sql: str) -> None:
    """One statement as MariaDB/MySQL's admin (creating or dropping a test database); the
    server being down skips the test (fails it under CI)."""
    try:
        conn = await my_admin()
    except Exception as exc:  # noqa: BLE001
        unavailable(f"MariaDB/MySQL at {MY_HOST}:{MY_PORT}", exc)
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql)
    finally:
        conn.close()


async def pg_execute(database: str, sql: str) -> str:
    """One statement on PostgreSQL's ``database``; returns the user it connected as."""
    try:
        conn, user = await _pg_connect(database)
    except Exception as exc:  # noqa: BLE001
        unavailable(f"PostgreSQL at {PG_HOST}:{PG_PORT}", exc)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
    return user


@pytest.fixture(params=BACKENDS)
async def target(request, tmp_path):
    backend = request.param
    if backend == "sqlite":
        path = str(tmp_path / "data" / "kefu.sqlite3")
        yield Target(backend, f"sqlite+aiosqlite:///{path}", path=path)
    elif backend == "postgresql":
        dbname, user = request.getfixturevalue("pg_database")
        schema = unique_name("t")
        await pg_execute(dbname, f'CREATE SCHEMA "{schema}"')
        yield Target(backend, f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{dbname}",
                     {"connect_args": {"server_settings": {"search_path": schema}}},
                     pg_schema=schema)
        await pg_execute(dbname, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    else:
        name = unique_name("kefu_t")
        await my_execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        yield Target(backend, f"mysql+asyncmy://{MY_USER}@{MY_HOST}:{MY_PORT}/{name}")
        await my_execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
async def storage(target):
    s = await target.open()
    yield s
    await s.close()
