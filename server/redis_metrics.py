"""/metrics for every worker at once, through Redis.

With several workers (or nodes) a scrape of /metrics reaches one worker, chosen by the kernel
or the load balancer.  So each worker stores a snapshot of its metrics in Redis every
``push_s`` (``<prefix>stats:<worker id>``, a JSON string that expires after three periods), and
whichever worker answers the scrape renders its own metrics, live, beside the snapshots of
the other *live* workers (those in routing's ``<prefix>r:workers`` presence set), every
sample labelled ``worker="<worker id>"``.  Sum them in Prometheus with
``sum without (worker) (...)``.  A worker that stopped leaves its snapshot out as soon as its
presence is gone; a restarted worker is a new id (its counters start at 0 under a new label).

Redis away: the scrape still answers, with this worker's own metrics only.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

from redis.exceptions import RedisError

from .metrics import Family, Metrics
from .redis_client import workers_key
from .tasks import stop_tasks

log = logging.getLogger("kefu.metrics")


class SharedMetrics:
    def __init__(self, redis: Any, metrics: Metrics, *, prefix: str, worker_id: str, push_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis, self.metrics, self.worker_id = redis, metrics, worker_id
        self.prefix, self.push_s, self.clock = prefix + "stats:", push_s, clock
        self._workers = workers_key(prefix)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.push()
        self._task = asyncio.create_task(self._push_forever(), name="kefu-metrics-push")

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
        try:
            await self.redis.delete(self.prefix + self.worker_id)
        except (RedisError, OSError):
            pass

    async def push(self) -> None:
        data = json.dumps(self.metrics.families(worker=self.worker_id), separators=(",", ":"))
        await self.redis.set(self.prefix + self.worker_id, data, px=int(self.push_s * 3000))

    async def _push_forever(self) -> None:
        while True:
            await asyncio.sleep(self.push_s)
            try:
                await self.push()
            except (RedisError, OSError) as exc:
                log.debug("metrics: snapshot not stored (%s)", exc)

    async def others(self) -> list[dict[str, Family]]:
        """The snapshots of the other live workers (none when Redis does not answer)."""
        try:
            live = [w.decode() if isinstance(w, bytes) else w
                    for w in await self.redis.zrangebyscore(self._workers, self.clock(), "+inf")]
            live = [w for w in live if w != self.worker_id]
            if not live:
                return []
            raw = await self.redis.mget([self.prefix + w for w in live])
        except (RedisError, OSError) as exc:
            log.warning("metrics: other workers' snapshots not read (%s)", exc)
            return []
        out = []
        for data in raw:
            if data:
                try:
                    out.append(json.loads(data))
                except ValueError:
                    continue
        return out

    async def render(self) -> str:
        return self.metrics.render(worker=self.worker_id, others=await self.others())
