"""Routing's shared state in Redis (:class:`RedisRoutingState`), for several workers and nodes.

It behaves exactly like :class:`~server.routing.state.InMemoryRoutingState` for one worker
(both pass the same tests), plus the rules for several: sockets are counted per worker, and a
worker's sockets count only while its presence is fresh.

Every mutating method is one Lua script (EVALSHA through ``register_script``, which loads the
script again after a Redis restart), so each is atomic between every worker and node.  The
scripts share one prelude of helpers (live sockets, load and score, binding, the queue) and
build their keys from the prefix passed in ``ARGV``, so they need a **standalone Redis** (or a
primary), not Redis Cluster.  Times never come from Redis's ``TIME``: the caller's clock is
passed in (``time.time`` by default, so every worker must have a synchronised clock).

Keys, all under ``<prefix>r:`` (``server.redis_prefix``, default ``kefu:``, so ``kefu:r:``):

============================  ============  ====================================================
key                           type          holds
============================  ============  ====================================================
``gen``                       string        the state's generation, a random token; missing
                                            after Redis lost its data, and the worker whose
                                            ``generation()`` creates it rebuilds from the
                                            database
``rr``                        string (int)  round-robin counter: each reservation stamps the
                                            agent's ``last`` with the next value
``seq``                       string (int)  sequence for queue arrivals, binding order and
                                            agent creation order
``agents``                    sorted set    every known agent id, scored by creation (``seq``)
``a:<agent>``                 hash          ``cap`` (capacity), ``status`` (online|away),
                                            ``team``, ``pending`` (slots reserved, not yet
                                            committed), ``last`` (round-robin stamp, 0 = never
                                            assigned), ``deadline`` (grace deadline; absent
                                            while none)
``s:<agent>``                 hash          worker id -> that worker's open sockets of the
                                            agent
``c:<agent>``                 sorted set    conversations the agent holds, scored by binding
                                            order (``seq``; oldest first, as ``expire`` returns
                                            them)
``load:<team>``               sorted set    every known agent of the team, scored
                                            ``load * 2**32 + last`` (ties: member, the agent
                                            id), so the first eligible one is the least loaded,
                                            then least recently assigned
``owner``                     hash          conversation id -> agent id
``q:<team>``                  sorted set    the team's queue: score = the conversation's queue
                                            score, member = arrival (``seq``, 16 digits) +
                                            conversation id, so equal scores keep arrival
                                            order
``queued``                    hash          conversation id -> arrival (16 digits) + team
                                            (which ``q:<team>`` member it is)
``qteams``                    set           the teams whose queue is not empty
``workers``                   sorted set    worker id -> presence expiry (its clock + the
                                            presence TTL); a worker is live while its expiry is
                                            later than the reader's clock
============================  ============  ====================================================

A worker refreshes its presence every ``presence_ttl_s / 3`` (:meth:`RedisRoutingState.start`)
and withdraws it at :meth:`~RedisRoutingState.close`; connecting or announcing a socket also
refreshes it.  A worker that dies stops refreshing: after the TTL its sockets stop counting and
:meth:`~RedisRoutingState.expire` gives its agents the grace period.  ``expire`` also drops
socket counts of workers that have no presence entry at all (closed ones), and presence entries
dead for longer than :data:`FORGET_WORKER_AFTER_S`.

Redis errors (and timeouts, lost connections) raise
:class:`~server.routing.events.RoutingError` ``routing_unavailable``, with the cause chained.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any, Callable, Iterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..redis_client import workers_key
from ..tasks import stop_tasks
from .events import RoutingError
from .state import DEFAULT_TEAM, ONLINE, AgentInfo, RoutingState

log = logging.getLogger("kefu.routing")

#: A worker whose presence expired this long ago is forgotten (its entry and socket counts).
FORGET_WORKER_AFTER_S = 3600.0

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)

# The Lua below hard-codes these two.
assert (ONLINE, DEFAULT_TEAM) == ("online", "default")

# ARGV[1] key root (prefix .. "r:"), ARGV[2] the caller's clock, ARGV[3] its worker id,
# ARGV[4] its presence expiry if it refreshes now; each script's own arguments follow from ARGV[5].
_PRELUDE = r"""
local R, NOW, WORKER, ALIVE_UNTIL = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local AGENTS, OWNER, QUEUED, QTEAMS = R .. 'agents', R .. 'owner', R .. 'queued', R .. 'qteams'
local WORKERS, SEQ, RR = R .. 'workers', R .. 'seq', R .. 'rr'
local ONLINE, DEFAULT_TEAM = 'online', 'default'
local PAD = 16   -- digits of the arrival number that starts a queue member

local function akey(id) return R .. 'a:' .. id end
local function skey(id) return R .. 's:' .. id end
local function ckey(id) return R .. 'c:' .. id end
local function lkey(team) return R .. 'load:' .. team end
local function qkey(team) return R .. 'q:' .. team end

local function known(id) return redis.call('EXISTS', akey(id)) == 1 end

local function heartbeat() redis.call('ZADD', WORKERS, ALIVE_UNTIL, WORKER) end

-- Sockets of the agent on workers whose presence has not expired; with prune, drop the counts
-- of workers that have no presence entry at all (closed, or forgotten).
local function live_sockets(id, prune)
  local f = redis.call('HGETALL', skey(id))
  local n = 0
  for i = 1, #f, 2 do
    local exp = redis.call('ZSCORE', WORKERS, f[i])
    if exp then
      if tonumber(exp) > NOW then n = n + tonumber(f[i + 1]) end
    elseif prune then
      redis.call('HDEL', skey(id), f[i])
    end
  end
  return n
end

local function load_of(id)
  return redis.call('ZCARD', ckey(id)) + tonumber(redis.call('HGET', akey(id), 'pending') or '0')
end

-- Re-score the agent in its team's sorted set after any change of load or round-robin stamp.
-- (%.0f: tostring would round scores past 14 digits.)
local function touch(id)
  local a = akey(id)
  local team = redis.call('HGET', a, 'team')
  local last = tonumber(redis.call('HGET', a, 'last') or '0')
  redis.call('ZADD', lkey(team), string.format('%.0f', load_of(id) * 4294967296 + last), id)
end

local function new_agent(id, cap, team)
  redis.call('HSET', akey(id), 'cap', cap, 'status', ONLINE, 'team', team, 'pending', 0, 'last', 0)
  redis.call('ZADD', AGENTS, redis.call('INCR', SEQ), id)
  touch(id)
end

-- A changed team: leave the old team's sorted set (the caller re-scores into the new one).
local function set_team(id, team)
  local old = redis.call('HGET', akey(id), 'team')
  if old ~= team then
    if old then redis.call('ZREM', lkey(old), id) end
    redis.call('HSET', akey(id), 'team', team)
  end
end

local function eligible(id)
  local a = akey(id)
  return redis.call('HGET', a, 'status') == ONLINE
     and load_of(id) < tonumber(redis.call('HGET', a, 'cap'))
     and live_sockets(id, false) > 0
end

local function take(id)
  redis.call('HINCRBY', akey(id), 'pending', 1)
  redis.call('HSET', akey(id), 'last', redis.call('INCR', RR))
  touch(id)
end

local function info(id)
  local a = akey(id)
  local f = redis.call('HMGET', a, 'status', 'cap', 'deadline', 'team')
  return {id, f[1], live_sockets(id, false), tonumber(f[2]), load_of(id), f[3], f[4]}
end

local function unqueue(cid)
  local v = redis.call('HGET', QUEUED, cid)
  if not v then return false end
  local arrival, team = string.sub(v, 1, PAD), string.sub(v, PAD + 1)
  redis.call('ZREM', qkey(team), arrival .. cid)
  redis.call('HDEL', QUEUED, cid)
  if redis.call('ZCARD', qkey(team)) == 0 then redis.call('SREM', QTEAMS, team) end
  return true
end

-- The conversation is the agent's (taken from a previous owner), and never queued.
local function bind(cid, id)
  local old = redis.call('HGET', OWNER, cid)
  if old and old ~= id and known(old) then
    redis.call('ZREM', ckey(old), cid)
    touch(old)
  end
  redis.call('HSET', OWNER, cid, id)
  redis.call('ZADD', ckey(id), 'NX', redis.call('INCR', SEQ), cid)   -- NX: a re-bind keeps its age
  unqueue(cid)
  touch(id)
end

local function unbind(cid)
  local id = redis.call('HGET', OWNER, cid)
  if not id then return false end
  redis.call('HDEL', OWNER, cid)
  if known(id) then
    redis.call('ZREM', ckey(id), cid)
    touch(id)
  end
  return id
end

local function remove_agent(id)
  local convs = redis.call('ZRANGE', ckey(id), 0, -1)
  for _, cid in ipairs(convs) do redis.call('HDEL', OWNER, cid) end
  redis.call('ZREM', lkey(redis.call('HGET', akey(id), 'team')), id)
  redis.call('DEL', akey(id), skey(id), ckey(id))
  redis.call('ZREM', AGENTS, id)
  return convs
end
"""

_SCRIPTS: dict[str, str] = {
    "generation": """
local t = redis.call('GET', R .. 'gen')
if t then return {t, 0} end
redis.call('SET', R .. 'gen', ARGV[5])
return {ARGV[5], 1}
""",
    # id, capacity, team
    "connect": """
local id, cap, team = ARGV[5], ARGV[6], ARGV[7]
if not known(id) then new_agent(id, cap, team) end
set_team(id, team)
heartbeat()
redis.call('HINCRBY', skey(id), WORKER, 1)
redis.call('HSET', akey(id), 'cap', cap)
redis.call('HDEL', akey(id), 'deadline')
touch(id)
return info(id)
""",
    # id, deadline
    "disconnect": """
local id = ARGV[5]
if not known(id) then return false end
local mine = tonumber(redis.call('HGET', skey(id), WORKER) or '0')
if mine > 1 then
  redis.call('HSET', skey(id), WORKER, mine - 1)
else
  redis.call('HDEL', skey(id), WORKER)
end
if live_sockets(id, false) == 0 then redis.call('HSET', akey(id), 'deadline', ARGV[6]) end
touch(id)
return info(id)
""",
    # id, sockets, capacity, team, status, deadline
    "announce": """
local id, n = ARGV[5], math.max(0, tonumber(ARGV[6]))
if not known(id) then
  if n == 0 then return false end
  new_agent(id, ARGV[7], ARGV[8])
end
heartbeat()
if n > 0 then
  redis.call('HSET', skey(id), WORKER, n)
else
  redis.call('HDEL', skey(id), WORKER)
end
set_team(id, ARGV[8])
redis.call('HSET', akey(id), 'cap', ARGV[7], 'status', ARGV[9])
if live_sockets(id, false) > 0 then
  redis.call('HDEL', akey(id), 'deadline')
else
  redis.call('HSETNX', akey(id), 'deadline', ARGV[10])
end
touch(id)
return false
""",
    # id, field (status | cap), value
    "set_field": """
local id = ARGV[5]
if not known(id) then return false end
redis.call('HSET', akey(id), ARGV[6], ARGV[7])
touch(id)
return info(id)
""",
    # now, the deadline for agents whose sockets vanished (now + grace), forget-before
    "expire": """
local now = tonumber(ARGV[5])
local out = {}
for _, id in ipairs(redis.call('ZRANGE', AGENTS, 0, -1)) do
  if live_sockets(id, true) == 0 then
    local a = akey(id)
    local deadline = redis.call('HGET', a, 'deadline')
    if not deadline then   -- its worker died without disconnecting: the grace period starts now
      deadline = ARGV[6]
      redis.call('HSET', a, 'deadline', deadline)
    end
    if tonumber(deadline) <= now and tonumber(redis.call('HGET', a, 'pending')) == 0 then
      table.insert(out, {id, remove_agent(id)})
    end
  end
end
redis.call('ZREMRANGEBYSCORE', WORKERS, '-inf', '(' .. ARGV[7])
return out
""",
    # id, deadline, capacity
    "hold": """
local id = ARGV[5]
if not known(id) then new_agent(id, ARGV[7], DEFAULT_TEAM) end
if live_sockets(id, false) == 0 then redis.call('HSETNX', akey(id), 'deadline', ARGV[6]) end
touch(id)
return false
""",
    # team
    "reserve": """
for _, id in ipairs(redis.call('ZRANGE', lkey(ARGV[5]), 0, -1)) do   -- least loaded first
  if eligible(id) then
    take(id)
    return id
  end
end
return false
""",
    # id, allow_away (1 | 0)
    "reserve_agent": """
local id = ARGV[5]
if not known(id) or live_sockets(id, false) == 0
   or (redis.call('HGET', akey(id), 'status') ~= ONLINE and ARGV[6] ~= '1') then
  return 'agent_unavailable'
end
if load_of(id) >= tonumber(redis.call('HGET', akey(id), 'cap')) then return 'agent_full' end
take(id)
return false
""",
    # conversation, id
    "commit": """
local cid, id = ARGV[5], ARGV[6]
if not known(id) then   -- vanished while the write was in flight: expires at the next expire
  new_agent(id, 0, DEFAULT_TEAM)
  redis.call('HSET', akey(id), 'deadline', '-inf')
elseif tonumber(redis.call('HGET', akey(id), 'pending')) > 0 then
  redis.call('HINCRBY', akey(id), 'pending', -1)
end
bind(cid, id)
return false
""",
    # id
    "cancel": """
local id = ARGV[5]
if known(id) and tonumber(redis.call('HGET', akey(id), 'pending')) > 0 then
  redis.call('HINCRBY', akey(id), 'pending', -1)
  touch(id)
end
return false
""",
    # conversation, id
    "adopt": """
local cid, id = ARGV[5], ARGV[6]
if not known(id) then
  unbind(cid)
  return 0
end
bind(cid, id)
return 1
""",
    # conversation
    "unbind": "return unbind(ARGV[5])",
    # team given (1 | 0), team
    "any_online": """
local ids = ARGV[5] == '1' and redis.call('ZRANGE', lkey(ARGV[6]), 0, -1) or redis.call('ZRANGE', AGENTS, 0, -1)
for _, id in ipairs(ids) do
  if redis.call('HGET', akey(id), 'status') == ONLINE and live_sockets(id, false) > 0 then return 1 end
end
return 0
""",
    # conversation, score, team
    "enqueue": """
local cid, team = ARGV[5], ARGV[7]
if redis.call('HEXISTS', OWNER, cid) == 1 then return 0 end
if redis.call('HEXISTS', QUEUED, cid) == 1 then return 1 end
local arrival = string.format('%0' .. PAD .. 'd', redis.call('INCR', SEQ))
redis.call('ZADD', qkey(team), ARGV[6], arrival .. cid)
redis.call('HSET', QUEUED, cid, arrival .. team)
redis.call('SADD', QTEAMS, team)
return 1
""",
    # conversation
    "dequeue": "return unqueue(ARGV[5]) and 1 or 0",
    # team
    "pop_queue": """
local head = redis.call('ZRANGE', qkey(ARGV[5]), 0, 0, 'WITHSCORES')
if #head == 0 then return false end
local cid = string.sub(head[1], PAD + 1)
unqueue(cid)
return {cid, head[2]}   -- the score as Redis prints it (exact), not a Lua number
""",
    # conversation
    "position": """
local v = redis.call('HGET', QUEUED, ARGV[5])
if not v then return false end
return redis.call('ZRANK', qkey(string.sub(v, PAD + 1)), string.sub(v, 1, PAD) .. ARGV[5]) + 1
""",
    # -> team, head member, head score for every team with a queue
    "queue_heads": """
local out = {}
for _, team in ipairs(redis.call('SMEMBERS', QTEAMS)) do
  local head = redis.call('ZRANGE', qkey(team), 0, 0, 'WITHSCORES')
  if #head > 0 then
    table.insert(out, team); table.insert(out, head[1]); table.insert(out, head[2])
  end
end
return out
""",
    # -> member, score of every queued conversation, all teams
    "queue_all": """
local out = {}
for _, team in ipairs(redis.call('SMEMBERS', QTEAMS)) do
  local entries = redis.call('ZRANGE', qkey(team), 0, -1, 'WITHSCORES')
  for i = 1, #entries do table.insert(out, entries[i]) end
end
return out
""",
    # id
    "load": "if not known(ARGV[5]) then return 0 end return load_of(ARGV[5])",
    "agents": """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', AGENTS, 0, -1)) do table.insert(out, info(id)) end
return out
""",
}

_PAD = 16   # the prelude's PAD


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    """Redis trouble becomes a routing refusal, never a raw redis exception."""
    try:
        yield
    except _FAILURES as exc:
        raise RoutingError("routing_unavailable",
                           f"routing state in Redis unreachable: {exc!r}") from exc


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _f(value: float) -> str:
    """A float for ARGV that Redis and Lua parse back to exactly this value."""
    return repr(float(value))


def _agent_info(row: list[Any]) -> AgentInfo:
    agent_id, status, sockets, capacity, load, deadline, team = row
    return AgentInfo(_s(agent_id), _s(status), int(sockets), int(capacity), int(load),
                     None if deadline is None else float(_s(deadline)), _s(team))


class RedisRoutingState(RoutingState):
    """:class:`RoutingState` in Redis: see the module docstring for the keys.  The client is the
    caller's (``server.redis_client.client``); :meth:`close` withdraws this worker's presence
    but leaves the client open for its owner to close."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str = "kefu:", worker_id: str,
                 presence_ttl_s: float = 10.0, clock: Callable[[], float] = time.time):
        self.redis = redis
        self.worker_id = worker_id
        self.presence_ttl_s = presence_ttl_s
        self.clock = clock
        self.prefix = prefix
        self.root = prefix + "r:"
        self._workers_key = workers_key(prefix)
        self._scripts = {name: redis.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()}
        self._refresher: asyncio.Task | None = None

    # -- plumbing
    async def _run(self, name: str, *args: Any) -> Any:
        now = self.clock()
        argv = [self.root, _f(now), self.worker_id, _f(now + self.presence_ttl_s), *args]
        with _unavailable():
            return await self._scripts[name](keys=[], args=argv)

    # -- lifecycle
    async def start(self) -> None:
        """Register this worker's presence (raises ``routing_unavailable`` when Redis does not
        answer) and keep refreshing it in the background."""
        await self.refresh_presence()
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_forever(),
                                                  name=f"routing-presence-{self.worker_id}")

    async def refresh_presence(self) -> None:
        """This worker is live until ``clock() + presence_ttl_s``."""
        with _unavailable():
            await self.redis.zadd(self._workers_key, {self.worker_id: self.clock() + self.presence_ttl_s})

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.presence_ttl_s / 3)
            try:
                await self.refresh_presence()
            except RoutingError as exc:
                # keep going: a Redis back within the TTL never noticed this worker was gone
                log.warning("routing: refreshing presence of worker %s failed (%s)", self.worker_id,
                            exc.__cause__ or exc)

    async def close(self) -> None:
        if self._refresher is not None:
            await stop_tasks([self._refresher])
            self._refresher = None
        try:
            with _unavailable():
                await self.redis.zrem(self._workers_key, self.worker_id)
        except RoutingError as exc:     # its presence expires by itself after the TTL
            log.warning("routing: withdrawing presence of worker %s failed (%s)", self.worker_id,
                        exc.__cause__ or exc)

    async def generation(self) -> tuple[str, bool]:
        token, created = await self._run("generation", secrets.token_hex(8))
        return _s(token), bool(created)

    # -- agents
    async def connect(self, agent_id: str, capacity: int, team: str = DEFAULT_TEAM) -> AgentInfo:
        return _agent_info(await self._run("connect", agent_id, int(capacity), team))

    async def disconnect(self, agent_id: str, deadline: float) -> AgentInfo | None:
        row = await self._run("disconnect", agent_id, _f(deadline))
        return None if row is None else _agent_info(row)

    async def announce(self, agent_id: str, sockets: int, capacity: int, team: str, status: str,
                       deadline: float) -> None:
        await self._run("announce", agent_id, int(sockets), int(capacity), team, status, _f(deadline))

    async def set_status(self, agent_id: str, status: str) -> AgentInfo | None:
        row = await self._run("set_field", agent_id, "status", status)
        return None if row is None else _agent_info(row)

    async def set_capacity(self, agent_id: str, capacity: int) -> AgentInfo | None:
        row = await self._run("set_field", agent_id, "cap", int(capacity))
        return None if row is None else _agent_info(row)

    async def expire(self, now: float, grace_s: float = 0.0) -> list[tuple[str, list[str]]]:
        # deadlines are on the caller's clock (now); presence and forgetting on the state's
        rows = await self._run("expire", _f(now), _f(now + grace_s),
                               _f(self.clock() - FORGET_WORKER_AFTER_S))
        return [(_s(agent_id), [_s(c) for c in convs]) for agent_id, convs in rows]

    async def hold(self, agent_id: str, deadline: float, capacity: int = 0) -> None:
        await self._run("hold", agent_id, _f(deadline), int(capacity))

    # -- slots
    async def reserve(self, team: str = DEFAULT_TEAM) -> str | None:
        agent_id = await self._run("reserve", team)
        return None if agent_id is None else _s(agent_id)

    async def reserve_agent(self, agent_id: str, *, allow_away: bool = False) -> str | None:
        refused = await self._run("reserve_agent", agent_id, "1" if allow_away else "0")
        return None if refused is None else _s(refused)

    async def commit(self, conversation_id: str, agent_id: str) -> None:
        await self._run("commit", conversation_id, agent_id)

    async def cancel(self, agent_id: str) -> None:
        await self._run("cancel", agent_id)

    async def adopt(self, conversation_id: str, agent_id: str) -> bool:
        return bool(await self._run("adopt", conversation_id, agent_id))

    async def unbind(self, conversation_id: str) -> str | None:
        agent_id = await self._run("unbind", conversation_id)
        return None if agent_id is None else _s(agent_id)

    async def owner(self, conversation_id: str) -> str | None:
        with _unavailable():
            agent_id = await self.redis.hget(self.root + "owner", conversation_id)
        return None if agent_id is None else _s(agent_id)

    async def any_online(self, team: str | None = None) -> bool:
        return bool(await self._run("any_online", "0" if team is None else "1", team or ""))

    # -- queue
    async def enqueue(self, conversation_id: str, score: float, team: str = DEFAULT_TEAM) -> bool:
        return bool(await self._run("enqueue", conversation_id, _f(score), team))

    async def dequeue(self, conversation_id: str) -> bool:
        return bool(await self._run("dequeue", conversation_id))

    async def queue_size(self, team: str | None = None) -> int:
        with _unavailable():
            if team is None:
                return int(await self.redis.hlen(self.root + "queued"))
            return int(await self.redis.zcard(self.root + "q:" + team))

    async def pop_queue(self, team: str = DEFAULT_TEAM) -> tuple[str, float] | None:
        head = await self._run("pop_queue", team)
        return None if head is None else (_s(head[0]), float(head[1]))

    async def position(self, conversation_id: str) -> int | None:
        pos = await self._run("position", conversation_id)
        return None if pos is None else int(pos)

    async def queue_teams(self) -> list[str]:
        flat = await self._run("queue_heads")
        heads = [(float(flat[i + 2]), flat[i + 1], _s(flat[i])) for i in range(0, len(flat), 3)]
        # (score, member): members start with the arrival number, so this is (score, arrival)
        return [team for _, _, team in sorted(heads)]

    # -- reads
    async def load(self, agent_id: str) -> int:
        return int(await self._run("load", agent_id))

    async def queue_ids(self, team: str | None = None) -> list[str]:
        if team is not None:
            with _unavailable():
                members = await self.redis.zrange(self.root + "q:" + team, 0, -1)
            return [_s(m)[_PAD:] for m in members]
        flat = await self._run("queue_all")
        entries = sorted((float(flat[i + 1]), flat[i]) for i in range(0, len(flat), 2))
        return [_s(member)[_PAD:] for _, member in entries]

    async def team(self, agent_id: str) -> str | None:
        with _unavailable():
            team = await self.redis.hget(self.root + "a:" + agent_id, "team")
        return None if team is None else _s(team)

    async def agents(self) -> list[AgentInfo]:
        return sorted((_agent_info(row) for row in await self._run("agents")), key=lambda a: a.agent_id)
