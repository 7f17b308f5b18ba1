"""Load benchmark of the chat server over loopback WebSockets.

Starts ``kefu serve`` on a free 127.0.0.1 port with a temporary data dir (engine delays off,
no trained models, rate limits lifted), then N concurrent visitors each send M messages:

* ``--mode bot``: to a bot conversation; measures ack latency (stored) and bot-reply latency;
* ``--mode echo``: handed off to agents who echo every message; measures ack latency and the
  visitor -> agent -> visitor round trip.

Prints a table and writes JSON to bench/results/server.json.  Bounded: ``--visitors`` <= 2000,
``--messages`` <= 1000, ``--time-limit`` seconds for the whole run; only 127.0.0.1.

    python bench/bench_server.py --visitors 100 --messages 20 --mode bot
    python bench/bench_server.py --visitors 50 --messages 20 --mode echo --agents 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def http(port: int, method: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict | str]:
    reader, writer = await asyncio.open_connection(HOST, port)
    data = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close", f"Content-Length: {len(data)}"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    raw = await reader.read()
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    try:
        return int(status_line.split()[1]), json.loads(payload)
    except ValueError:
        return int(status_line.split()[1]), payload.decode("utf-8", "replace")


#: ``--server-core``: the core ``taskset`` pins the server to (run this script on another one).
SERVER_CORE: int | None = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kefu_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main())", *args]


async def start_server(data_dir: Path, port: int, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "KEFU_ENGINE_DELAYS": "false", "KEFU_ENGINE_USE_MODELS": "false",
           "KEFU_ENGINE_WATCH_KNOWLEDGE": "false", "KEFU_SERVER_RATE_PER_S": "100000", "KEFU_SERVER_RATE_BURST": "100000",
           "KEFU_SERVER_NEW_CONVERSATIONS_PER_IP_PER_MIN": "1000000", "KEFU_SERVER_MAX_CONNECTIONS_PER_IP": "0",
           "KEFU_SERVER_SEND_QUEUE_FRAMES": "100000", "KEFU_SERVER_SECRET_KEY": "bench-secret-key-0123456789",
           **env_extra}
    pin = ["taskset", "-c", str(SERVER_CORE)] if SERVER_CORE is not None else []
    proc = subprocess.Popen(pin + kefu_cmd("serve", "--host", HOST, "--port", str(port), "--data-dir", str(data_dir)),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            status, _ = await http(port, "GET", "/healthz")
            if status == 200:
                return proc
        except OSError:
            pass
        await asyncio.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not start in 60 s")


async def recv_json(ws) -> dict:
    return json.loads(await ws.recv())


async def visitor(port: int, bot: str, messages: int, mode: str, stats: dict, start: asyncio.Event, texts: list[str]) -> None:
    ws = await connect(f"ws://{HOST}:{port}/ws/visitor", origin=f"http://{HOST}:{port}", max_queue=None, open_timeout=60)
    try:
        await ws.send(json.dumps({"type": "hello", "bot": bot}))
        while (await recv_json(ws)).get("type") != "welcome":
            pass
        if mode == "echo":
            await ws.send(json.dumps({"type": "handoff"}))
            while True:
                f = await recv_json(ws)
                if f.get("type") == "state" and f.get("event") == "assigned":
                    break
                if f.get("type") == "state" and f.get("event") in ("queued", "unavailable"):
                    raise RuntimeError(f"not assigned: {f}")
        stats["connected"] += 1
        await start.wait()
        for i in range(messages):
            cid = uuid.uuid4().hex
            text = texts[i % len(texts)]
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "message", "id": cid, "text": text}))
            acked = answered = False
            while not (acked and answered):
                f = await recv_json(ws)
                kind = f.get("type")
                if kind == "ack" and f.get("id") == cid:
                    stats["ack"].append(time.perf_counter() - t0)
                    acked = True
                elif kind == "message" and ((mode == "bot" and f["role"] == "bot")
                                            or (mode == "echo" and f["role"] == "agent" and f["text"] == "echo: " + text)):
                    if acked:
                        stats["reply"].append(time.perf_counter() - t0)
                        answered = True
                elif kind == "error":
                    stats["errors"].append(f.get("code"))
                    answered = acked = True
    finally:
        await ws.close()


async def echo_agent(port: int, token: str, ready: asyncio.Event, stop: asyncio.Event) -> None:
    ws = await connect(f"ws://{HOST}:{port}/ws/agent", origin=f"http://{HOST}:{port}", max_queue=None, open_timeout=60)
    await ws.send(json.dumps({"type": "hello", "token": token}))
    while (await recv_json(ws)).get("type") != "welcome":
        pass
    ready.set()
    try:
        while not stop.is_set():
            try:
                f = await asyncio.wait_for(recv_json(ws), 1.0)
            except asyncio.TimeoutError:
                continue
            if f.get("type") == "message" and f.get("role") == "visitor":
                await ws.send(json.dumps({"type": "message", "conversation": f["conversation"],
                                          "id": uuid.uuid4().hex, "text": "echo: " + f["text"]}))
    finally:
        await ws.close()


async def run(args: argparse.Namespace) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kefu-bench-") as tmp:
        data_dir = Path(tmp)
        agents: list[str] = []
        if args.mode == "echo":
            per_agent = -(-args.visitors // args.agents)
            for i in range(args.agents):
                name = f"bench{i}"
                subprocess.run(kefu_cmd("agent", "add", name, "--password-stdin", "--capacity", str(per_agent + 1),
                                        "--data-dir", str(data_dir)),
                               input="bench-password\n", text=True, check=True, cwd=ROOT, capture_output=True,
                               env={**os.environ, "KEFU_SERVER_SECRET_KEY": "bench-secret-key-0123456789"})
                agents.append(name)
        proc = await start_server(data_dir, port, {})
        try:
            stats: dict = {"ack": [], "reply": [], "errors": [], "connected": 0}
            stop = asyncio.Event()
            agent_tasks = []
            for name in agents:
                status, data = await http(port, "POST", "/api/v1/auth/login", {"username": name, "password": "bench-password"})
                assert status == 200, data
                ready = asyncio.Event()
                agent_tasks.append(asyncio.create_task(echo_agent(port, data["token"], ready, stop)))
                await ready.wait()
            start = asyncio.Event()
            texts = ["where is my order", "what are your opening hours", "how do I return an item",
                     "do you ship abroad", "I forgot my password"]
            tasks = [asyncio.create_task(visitor(port, args.bot, args.messages, args.mode, stats, start, texts))
                     for _ in range(args.visitors)]
            deadline = time.perf_counter() + args.time_limit
            while (stats["connected"] + sum(t.done() for t in tasks) < args.visitors
                   and time.perf_counter() < deadline):
                await asyncio.sleep(0.05)
            # all connected (and, for echo, assigned) before the clock starts
            await asyncio.sleep(0.2)
            t0, cpu0 = time.perf_counter(), cpu_seconds(proc.pid)
            start.set()
            done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.perf_counter()))
            elapsed = time.perf_counter() - t0
            server_cpu = (cpu_seconds(proc.pid) - cpu0) / elapsed if elapsed else float("nan")
            for t in pending:
                t.cancel()
            failures = [repr(t.exception()) for t in done if t.exception()]
            stop.set()
            await asyncio.gather(*agent_tasks, return_exceptions=True)
            _, metrics = await http(port, "GET", "/metrics")
            peak = next((float(line.split()[-1]) for line in str(metrics).splitlines()
                         if line.startswith("kefu_connections_peak ")), float("nan"))
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    acked = len(stats["ack"])
    return {
        "mode": args.mode, "bot": args.bot, "visitors": args.visitors, "agents": len(agents),
        "messages_per_visitor": args.messages, "acked": acked, "replies": len(stats["reply"]),
        "timed_out": bool(pending), "failures": failures[:5], "error_codes": sorted(set(stats["errors"])),
        "elapsed_s": round(elapsed, 3), "messages_per_s": round(acked / elapsed, 1) if elapsed else None,
        "ack_ms": {"p50": round(pct(stats["ack"], 50) * 1000, 2), "p99": round(pct(stats["ack"], 99) * 1000, 2),
                   "mean": round(statistics.fmean(stats["ack"]) * 1000, 2) if stats["ack"] else None},
        "reply_ms": {"p50": round(pct(stats["reply"], 50) * 1000, 2), "p99": round(pct(stats["reply"], 99) * 1000, 2)},
        "peak_connections": peak, "server_cpu_percent": round(server_cpu * 100, 1), "server_core": SERVER_CORE,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("bot", "echo"), default="bot")
    parser.add_argument("--visitors", type=int, default=100)
    parser.add_argument("--messages", type=int, default=20, help="per visitor")
    parser.add_argument("--agents", type=int, default=5, help="echo mode")
    parser.add_argument("--bot", default="shop")
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server.json")
    parser.add_argument("--server-core", type=int, help="pin the server to this core with taskset (run the "
                                                        "script itself on another: taskset -c 1 python ...)")
    args = parser.parse_args()
    global SERVER_CORE
    SERVER_CORE = args.server_core
    args.visitors = max(1, min(args.visitors, 2000))
    args.messages = max(1, min(args.messages, 1000))
    args.time_limit = max(5.0, min(args.time_limit, 600.0))
    result = asyncio.run(run(args))
    reply_label = "bot reply" if args.mode == "bot" else "echo round trip"
    rows = [
        ("mode", f"{result['mode']} ({result['bot']})" if args.mode == "bot" else f"echo via {result['agents']} agents"),
        ("visitors (concurrent sockets)", result["visitors"]),
        ("messages acked", f"{result['acked']} / {args.visitors * args.messages}"),
        ("elapsed", f"{result['elapsed_s']} s"),
        ("messages/s (acked)", result["messages_per_s"]),
        ("ack latency p50 / p99", f"{result['ack_ms']['p50']} / {result['ack_ms']['p99']} ms"),
        (f"{reply_label} p50 / p99", f"{result['reply_ms']['p50']} / {result['reply_ms']['p99']} ms"),
        ("peak connections (server)", result["peak_connections"]),
        ("server CPU (of one core)", f"{result['server_cpu_percent']} %"
                                     + (f" pinned to core {SERVER_CORE}" if SERVER_CORE is not None else "")),
        ("errors", ", ".join(result["error_codes"]) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = {}
    if args.out.exists():
        try:
            existing = json.loads(args.out.read_text())
        except ValueError:
            existing = {}
    existing[args.mode] = result
    args.out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if not result["timed_out"] and not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
