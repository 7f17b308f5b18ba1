"""Persistence of the chat server: conversations, messages (group-committed), agents.

    storage = await open_storage("sqlite+aiosqlite:///data/kefu.sqlite3")
    msg, new = await storage.append(conv.id, role="visitor", sender_id=v, text="hi",
                                    client_id="c-1")   # returns after the commit
    await storage.close()                               # writes everything submitted

URLs: ``sqlite+aiosqlite:///path`` (default; WAL, synchronous=FULL),
``postgresql+asyncpg://user@host/db``, ``mysql+asyncmy://user@host/db`` (MySQL/MariaDB).
A URL without a driver (``sqlite:///...``) gets the async driver above.
"""
from __future__ import annotations

from typing import Any

from .base import (BOT, CLOSED, HUMAN, QUEUED, ROLES, STATES, UNSET, Agent, Conversation,
                   Storage, StorageError, StoredMessage)
from .migrations import LATEST as SCHEMA_VERSION
from .migrations import SchemaTooNew
from .sql import MAX_PAGE, DuplicateKey, NoSuchRow, SqlStorage

DEFAULT_URL = "sqlite+aiosqlite:///kefu.sqlite3"


async def open_storage(url: str = DEFAULT_URL, **options: Any) -> Storage:
    """Open (creating and migrating the schema as needed) the database at ``url``.

    Options: ``batch_max`` (most appends per transaction, 256; 1 = one transaction per
    message), ``batch_window`` (seconds the writer waits for a batch to fill, 0: take what
    is queued), ``busy_timeout`` (seconds to wait on a locked SQLite database, 5),
    ``sqlite_synchronous`` ("FULL", or "NORMAL": survives a process kill but not a power
    cut), ``pool_size`` (PostgreSQL/MySQL), ``connect_args`` (passed to the driver, e.g.
    ``{"server_settings": {"search_path": "kefu"}}`` for asyncpg), ``echo``, ``migrate``.
    ``busy_timeout`` bounds lock waits everywhere (PostgreSQL ``lock_timeout``, MySQL
    ``innodb_lock_wait_timeout`` in whole seconds).
    Raises StorageError (SchemaTooNew for a database from a newer kefu).
    """
    return await SqlStorage.open(url, **options)


__all__ = ["open_storage", "Storage", "SqlStorage", "StorageError", "NoSuchRow", "DuplicateKey",
           "SchemaTooNew", "Conversation", "StoredMessage", "Agent", "BOT", "QUEUED", "HUMAN",
           "CLOSED", "STATES", "ROLES", "UNSET", "MAX_PAGE", "SCHEMA_VERSION", "DEFAULT_URL"]
