"""What routing answers and announces, and how it refuses.

:class:`Assigned`, :class:`Queued` and :class:`Unavailable` are the results of a routing call
and the events a router notifies (see :class:`server.routing.router.Router`); callers match them
by type (``match``/``isinstance``), never by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from engine import KefuError


@dataclass(frozen=True)
class Assigned:
    conversation_id: str
    agent_id: str
    previous_agent: str | None = None   # set on a transfer, and when re-queued after that agent's grace expired
    #: an agent handed it over (``transfer``), rather than routing finding someone
    transfer: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Queued:
    conversation_id: str
    position: int              # 1-based
    previous_agent: str | None = None   # set when re-queued after that agent's grace expired


@dataclass(frozen=True)
class Unavailable:
    conversation_id: str
    reason: str                # "no_agents_online" | "outside_business_hours"


Event = Union[Assigned, Queued, Unavailable]


class RoutingError(KefuError):
    """A refused routing action.  ``code`` is one of: ``agent_unavailable`` (agent not
    connected, or away, as a transfer target), ``agent_full`` (at capacity), ``not_owner``,
    ``not_found``, ``closed``, ``already_assigned``, ``not_queued``, ``invalid``,
    ``forbidden`` (the agent is not in the conversation's team), ``routing_unavailable``
    (the shared routing state, Redis, cannot be reached)."""

    status_code = 409

    def __init__(self, code: str, message: str = ""):
        super().__init__(message or code)
        self.code = code
