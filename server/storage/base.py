"""The storage interface the server codes against.

The database is the source of truth: a message is acknowledged to its sender only
after :meth:`Storage.append` returns, which is after its transaction committed.
Implementations group-commit (many appends share one transaction) for throughput.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Sequence

from engine import KefuError

# Conversation states.
BOT, QUEUED, HUMAN, CLOSED = "bot", "queued", "human", "closed"
STATES = (BOT, QUEUED, HUMAN, CLOSED)
#: "No condition on this field" for :meth:`Storage.transition` (None is a real value there).
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()
# Who sent a message.
ROLES = ("visitor", "bot", "agent", "system")


@dataclass(frozen=True)
class Conversation:
    id: str                   # random 128-bit public id, hex
    visitor_id: str
    bot: str
    state: str
    agent_id: str | None
    created_at: float         # unix seconds
    updated_at: float
    last_seq: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredMessage:
    conversation_id: str
    seq: int                  # 1, 2, 3 ... per conversation, contiguous
    role: str                 # visitor | bot | agent | system
    sender_id: str
    kind: str                 # text | handoff | event | note
    text: str
    client_id: str | None
    created_at: float
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"conversation": self.conversation_id, "seq": self.seq, "role": self.role,
                "sender": self.sender_id, "kind": self.kind, "text": self.text,
                "client_id": self.client_id, "ts": self.created_at, "meta": dict(self.meta)}


@dataclass(frozen=True)
class Agent:
    id: str
    username: str
    display_name: str
    password_hash: str
    capacity: int
    token_version: int        # bumped on password change: revokes every token issued before
    created_at: float
    team: str = "default"


class StorageError(KefuError):
    """The database failed: nothing was stored, so nothing may be acknowledged (clients retry
    with the same id: error ``storage_unavailable``, HTTP 503)."""

    status_code = 503
    code = "storage_unavailable"


class Storage(abc.ABC):
    """SQLAlchemy 2 async Core over SQLite (default), PostgreSQL or MySQL/MariaDB."""

    # -- lifecycle
    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- conversations
    @abc.abstractmethod
    async def create_conversation(self, visitor_id: str, bot: str, state: str = BOT,
                                  meta: dict[str, Any] | None = None) -> Conversation: ...

    @abc.abstractmethod
    async def get_conversation(self, conversation_id: str) -> Conversation | None: ...

    @abc.abstractmethod
    async def list_conversations(self, *, state: str | None = None, agent_id: str | None = None,
                                 visitor_id: str | None = None, limit: int = 50,
                                 before: float | None = None) -> list[Conversation]: ...

    @abc.abstractmethod
    async def delete_closed_conversations(self, *, visitor_id: str | None = None,
                                          closed_before: float | None = None) -> int:
        """Delete closed conversations, with their messages, of one visitor and/or last
        changed (closed) before ``closed_before`` (unix time); returns how many.  Open ones
        are never deleted: a live socket may still write to them."""

    @abc.abstractmethod
    async def transition(self, conversation_id: str, *, to_state: str, agent_id: str | None,
                         from_states: Sequence[str] | None = None,
                         from_agent: Any = UNSET) -> Conversation | None:
        """Compare-and-set: move to ``to_state``/``agent_id`` only if the current state is in
        ``from_states`` (and the current agent equals ``from_agent`` when given).  Returns the
        updated conversation, or None when the condition failed (someone else won)."""

    @abc.abstractmethod
    async def last_seqs(self, conversation_ids: Sequence[str]) -> dict[str, int]:
        """The ``last_seq`` of each conversation that exists (one query per 500 ids): after an
        outage the hub asks which of its conversations moved on without it."""

    # -- messages
    @abc.abstractmethod
    async def append(self, conversation_id: str, *, role: str, sender_id: str, text: str,
                     kind: str = "text", client_id: str | None = None,
                     meta: dict[str, Any] | None = None) -> tuple[StoredMessage, bool]:
        """Store a message durably and return it with its seq, and True when it was new.
        The same (conversation_id, client_id) stores once: a retry returns the first copy
        and False.  Raises StorageError when nothing could be stored."""

    @abc.abstractmethod
    async def messages(self, conversation_id: str, *, after_seq: int = 0,
                       limit: int = 100) -> list[StoredMessage]:
        """Messages with seq > after_seq, in seq order, at most ``limit``."""

    # -- agents
    @abc.abstractmethod
    async def add_agent(self, username: str, password_hash: str, *, display_name: str = "",
                        capacity: int = 5, team: str = "default") -> Agent: ...

    @abc.abstractmethod
    async def get_agent(self, *, agent_id: str | None = None, username: str | None = None) -> Agent | None: ...

    @abc.abstractmethod
    async def list_agents(self) -> list[Agent]: ...

    @abc.abstractmethod
    async def update_agent(self, agent_id: str, *, password_hash: str | None = None,
                           capacity: int | None = None, display_name: str | None = None,
                           revoke_tokens: bool = False) -> Agent | None:
        """A new password_hash (or ``revoke_tokens``: a logout) bumps token_version, revoking
        every token issued before."""
