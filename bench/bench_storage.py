"""Storage benchmark: appends/s with group commit vs one transaction per message.

    .venv/bin/python bench/bench_storage.py [--backends sqlite,postgresql,mysql]
        [--writers 1,10,100] [--seconds 2] [--sqlite-synchronous FULL]

For each backend, mode and number of concurrent writers (each its own conversation, each
appending in a loop, awaiting every ack), it counts acknowledged appends for a fixed time.
Modes:
  group        the storage as shipped: one writer task, many appends per transaction;
  serial-1     the same writer with batch_max=1: one transaction per message, in turn;
  parallel-1   no writer queue: every append runs its own transaction on the pool at once
               (what a naive server would do; on SQLite they still take turns, on the
               storage's in-process write lock, as SQLite has one write lock anyway).
A PostgreSQL or MySQL server that is down is reported and left out.  Prints a table and
writes bench/results/storage.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from server.storage import StorageError, open_storage  # noqa: E402
from server.storage.sql import _Append  # noqa: E402

PG = os.environ.get("KEFU_BENCH_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432")
MY = os.environ.get("KEFU_BENCH_MYSQL", "mysql+asyncmy://root@127.0.0.1:3306")
MODES = ("group", "serial-1", "parallel-1")


class Database:
    """A throw-away database per backend."""

    def __init__(self, backend: str, sqlite_sync: str):
        self.backend, self.sqlite_sync = backend, sqlite_sync
        self.name = f"kefu_bench_{os.getpid()}_{secrets.token_hex(3)}"

    async def create(self) -> None:
        if self.backend == "sqlite":
            self.dir = tempfile.mkdtemp(prefix="kefu-bench-")
            return
        await self._admin(f"CREATE DATABASE {self.name}")

    async def drop(self) -> None:
        if self.backend == "sqlite":
            import shutil
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        await self._admin(f"DROP DATABASE IF EXISTS {self.name}"
                          + (" WITH (FORCE)" if self.backend == "postgresql" else ""))

    async def _admin(self, sql: str) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy import text
        base = PG + "/postgres" if self.backend == "postgresql" else MY + "/mysql"
        engine = create_async_engine(base, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    def url(self, run: str) -> str:
        if self.backend == "sqlite":
            return f"sqlite+aiosqlite:///{self.dir}/{run}.sqlite3"
        return (PG if self.backend == "postgresql" else MY) + "/" + self.name

    def options(self) -> dict:
        return {"sqlite_synchronous": self.sqlite_sync} if self.backend == "sqlite" else {}


async def run_one(db: Database, mode: str, writers: int, seconds: float) -> dict:
    run = f"{mode}-{writers}"
    storage = await open_storage(db.url(run), batch_max=1 if mode == "serial-1" else 256,
                                 pool_size=max(10, writers if mode == "parallel-1" else 10),
                                 **db.options())
    try:
        convs = [(await storage.create_conversation(f"v{w}", "bench")).id for w in range(writers)]
        start_batches = storage.stats.batches
        latencies: list[float] = []
        errors = 0
        deadline = time.perf_counter() + seconds

        async def writer(w: int) -> int:
            nonlocal errors
            n = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    if mode == "parallel-1":
                        (res,) = await storage._write_batch([_Append(
                            convs[w], "visitor", f"v{w}", "text", f"message {n}", None, {},
                            time.time())])
                    else:
                        await storage.append(convs[w], role="visitor", sender_id=f"v{w}",
                                             text=f"message {n}")
                except StorageError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                n += 1
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - t0
        total = sum(counts)
        txns = storage.stats.batches - start_batches if mode != "parallel-1" else total
        latencies.sort()
        q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
        return {"backend": db.backend, "mode": mode, "writers": writers, "appends": total,
                "seconds": round(elapsed, 3), "appends_per_s": round(total / elapsed, 1),
                "transactions": txns, "mean_batch": round(total / txns, 1) if txns else 0,
                "p50_ms": round(q(0.5), 2) if latencies else None,
                "p99_ms": round(q(0.99), 2) if latencies else None, "errors": errors}
    finally:
        await storage.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--writers", default="1,10,100")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--sqlite-synchronous", default="FULL")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "storage.json"))
    args = ap.parse_args()
    rows, skipped = [], {}
    for backend in args.backends.split(","):
        db = Database(backend, args.sqlite_synchronous.upper())
        try:
            await db.create()
        except Exception as exc:  # noqa: BLE001 -- a server that is down
            skipped[backend] = repr(exc)
            print(f"# {backend}: not reachable, left out ({exc!r})", file=sys.stderr)
            continue
        try:
            for mode in args.modes.split(","):
                for writers in map(int, args.writers.split(",")):
                    row = await run_one(db, mode, writers, args.seconds)
                    rows.append(row)
                    print(f"{row['backend']:<11}{row['mode']:<12}{row['writers']:>8}"
                          f"{row['appends_per_s']:>12,.0f}{row['mean_batch']:>11}"
                          f"{row['p50_ms']!s:>9}{row['p99_ms']!s:>9}{row['errors']:>7}", flush=True)
        finally:
            await db.drop()
    print()
    print(f"{'backend':<11}{'mode':<12}{'writers':>8}{'appends/s':>12}{'per txn':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}")
    for row in rows:
        print(f"{row['backend']:<11}{row['mode']:<12}{row['writers']:>8}{row['appends_per_s']:>12,.0f}"
              f"{row['mean_batch']:>11}{row['p50_ms']!s:>9}{row['p99_ms']!s:>9}{row['errors']:>7}")
    for backend in {r["backend"] for r in rows}:
        for w in map(int, args.writers.split(",")):
            g = [r for r in rows if r["backend"] == backend and r["writers"] == w]
            by = {r["mode"]: r["appends_per_s"] for r in g}
            if "group" in by and by.get("serial-1"):
                print(f"{backend} {w} writers: group commit {by['group'] / by['serial-1']:.1f}x serial-1"
                      + (f", {by['group'] / by['parallel-1']:.1f}x parallel-1" if by.get("parallel-1") else ""))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "storage appends", "seconds_per_run": args.seconds,
                   "sqlite_synchronous": args.sqlite_synchronous.upper(),
                   "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                               "platform": platform.platform()},
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "left_out": skipped, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
