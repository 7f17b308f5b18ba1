"""The broker: how a frame published on one worker reaches the sockets of every worker.

Topics name who listens: ``c:<conversation id>`` (the conversation's sockets: messages,
typing, read receipts, state changes), ``a:<agent id>`` (every socket of one agent: assignments,
presence echoes, revocation) and ``t:<team>`` (the team's agents: queue changes).  The hub
(:mod:`server.conversations`) is the only publisher and the only subscriber; a worker
subscribes to a topic while one of its sockets needs it.

Contract, for every implementation (the same tests run on both):

* :meth:`Broker.publish` never blocks and never fails the caller: the frame is delivered to
  this worker's own subscribers at once (synchronously, before ``publish`` returns) and sent to
  the other workers in the background, in publish order.
* Delivery to other workers is **at most once**.  A frame lost on the way (Redis restarting, a
  network cut) is not resent: stored messages are recovered by their seq from the database
  (the hub repairs a gap as soon as it sees one, and every subscribed conversation after the
  broker reconnects); transient frames (typing, read) are simply lost.
* :meth:`Broker.subscribe` returns once the subscription is in effect: whatever is published
  on the topic afterwards, anywhere, arrives.  So "subscribe, then read the database" leaves no
  gap.
* After an outage the broker re-subscribes by itself and then calls ``on_recovered``.
"""
from __future__ import annotations

import abc
from typing import Any, Awaitable, Callable

#: (topic, payload, the local socket to leave out or None) -> None; called on the event loop.
Deliver = Callable[[str, dict[str, Any], Any], None]


def conversation_topic(conversation_id: str) -> str:
    return "c:" + conversation_id


def agent_topic(agent_id: str) -> str:
    return "a:" + agent_id


def team_topic(team: str) -> str:
    return "t:" + team


class Broker(abc.ABC):
    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        #: Awaited after the broker came back from an outage and re-subscribed.
        self.on_recovered: Callable[[], Awaitable[None]] | None = None

    def attach(self, deliver: Deliver) -> None:
        """The hub's delivery callback (set once, before :meth:`start`)."""
        self._deliver = deliver

    def deliver_here(self, topic: str, payload: dict[str, Any], exclude: Any = None) -> None:
        if self._deliver is not None:
            self._deliver(topic, payload, exclude)

    async def start(self) -> None:
        """Connect (the in-process broker has nothing to connect to)."""

    async def close(self) -> None:
        """Send what is still queued (briefly) and disconnect."""

    @abc.abstractmethod
    def publish(self, topic: str, payload: dict[str, Any], exclude: Any = None) -> None:
        """Deliver ``payload`` to this worker's subscribers of ``topic`` now (leaving out the
        local socket ``exclude``) and to every other worker's."""

    @abc.abstractmethod
    async def subscribe(self, topic: str) -> None:
        """This worker wants ``topic`` (in effect when this returns)."""

    @abc.abstractmethod
    def unsubscribe(self, topic: str) -> None:
        """This worker no longer wants ``topic`` (ordered after earlier subscribes)."""

    def status(self) -> dict[str, Any]:
        """For /healthz and /metrics: ``{"broker": name, "connected": bool, ...}``."""
        return {"broker": "in-process", "connected": True}


class InProcessBroker(Broker):
    """One process: publishing is delivering; there is nobody else to tell."""

    def publish(self, topic: str, payload: dict[str, Any], exclude: Any = None) -> None:
        self.deliver_here(topic, payload, exclude)

    async def subscribe(self, topic: str) -> None:
        return None

    def unsubscribe(self, topic: str) -> None:
        return None
