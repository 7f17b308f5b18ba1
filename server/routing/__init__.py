"""Routing: least-loaded assignment of conversations to human agents.

* :mod:`.router` - :class:`Router`, the rules (least loaded, queue, teams, grace, transfer).
* :mod:`.state` - :class:`RoutingState`, the shared state it runs on, and the in-process one.
* :mod:`.redis_state` - the Redis state, for several workers and nodes.
* :mod:`.events` - what routing answers and announces, and :class:`RoutingError`.
* :mod:`.hours` - business hours.
"""
from .events import Assigned, Event, Queued, RoutingError, Unavailable
from .hours import BusinessHours, business_hours, parse_business_hours
from .router import TEAM_CACHE_SIZE, Router
from .state import AWAY, DEFAULT_TEAM, ONLINE, PRESENCES, AgentInfo, InMemoryRoutingState, RoutingState

__all__ = ["Assigned", "Event", "Queued", "RoutingError", "Unavailable", "BusinessHours", "business_hours",
           "parse_business_hours", "Router", "TEAM_CACHE_SIZE", "AWAY", "DEFAULT_TEAM", "ONLINE", "PRESENCES",
           "AgentInfo", "InMemoryRoutingState", "RoutingState"]
