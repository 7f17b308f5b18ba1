"""How stored records look to clients (frames and REST bodies): one place, so the socket and
the REST API can never disagree, and no password hash or token version ever leaves."""
from __future__ import annotations

from typing import Any

from .storage.base import Agent, Conversation, StoredMessage


def agent_dict(agent: Agent) -> dict[str, Any]:
    """An agent's account as clients see it (never the password hash or token version)."""
    return {"id": agent.id, "username": agent.username, "display_name": agent.display_name,
            "capacity": agent.capacity, "team": agent.team}


def conversation_dict(conv: Conversation) -> dict[str, Any]:
    return {"id": conv.id, "visitor": conv.visitor_id, "bot": conv.bot, "state": conv.state,
            "agent": conv.agent_id, "created_at": conv.created_at, "updated_at": conv.updated_at,
            "last_seq": conv.last_seq, "meta": dict(conv.meta)}


def message_frame(msg: StoredMessage) -> dict[str, Any]:
    frame = msg.as_dict()
    frame["type"] = "message"
    return frame
