"""A real kefu server on a free loopback port, per test, with a temp data dir and the test bot.

``server_factory(**settings)`` starts one in-process (Sanic's AsyncioServer); clients are the
real ``websockets`` package.  Nothing sleeps: waits are receives with a timeout.
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import socket
import uuid
from typing import Any

import pytest
from sanic import Sanic
from websockets.asyncio.client import connect

from server.app import create_app
from server.auth import hash_password
from server.config import load_server_config

from . import testbot
from .redis_support import private_redis  # noqa: F401  (a fixture, for every server test module)

Sanic.test_mode = True
_names = itertools.count(1)
ORIGIN = "http://127.0.0.1"
TIMEOUT = 5.0


#: ``KEFU_TEST_SHARED=redis://...``: run every in-process server test on the Redis seams
#: (broker, routing state, session memory, limits) instead of the in-process ones.
SHARED_REDIS = os.environ.get("KEFU_TEST_SHARED", "")


def server_config(data_dir, **server: Any):
    config = load_server_config(env={})
    if SHARED_REDIS:
        config["server"].update({"redis_url": SHARED_REDIS, "redis_prefix": f"kefutest:{uuid.uuid4().hex[:12]}:"})
    config["engine"].update({"delays": False, "use_models": False, "watch_knowledge": False, "seed": 0,
                             "bots": ["testbot"]})
    config["server"].update({"data_dir": str(data_dir), "secret_key": "test-secret-key-0123456789",
                             "identity_secret": "host-site-secret", "rate_per_s": 200.0, "rate_burst": 400,
                             "new_conversations_per_ip_per_min": 10000,
                             "visitor_sessions_per_ip_per_min": 10000, "tick_s": 0.2,
                             "origins": [ORIGIN, "https://shop.example"]})
    config["server"].update(server)
    return config


async def drop_prefix(url: str, prefix: str) -> None:
    """Delete every Redis key a test's servers left under ``prefix`` (routing keys have no TTL)."""
    from server.redis_client import client
    redis = client(url)
    try:
        keys = [key async for key in redis.scan_iter(match=prefix + "*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i:i + 500])
    finally:
        await redis.aclose()


def pytest_collection_modifyitems(config, items):
    """With ``KEFU_TEST_SHARED``: only the tests that start an in-process server, less those
    marked ``in_process`` (they check the in-process seams' own structures)."""
    if not SHARED_REDIS:
        return
    keep = [item for item in items if "server_factory" in getattr(item, "fixturenames", ())
            and item.get_closest_marker("in_process") is None]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


class FakeClock:
    """A clock a test moves by hand (routing state, limits)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def samples(text: str):
    """(name, labels, value) of every sample of a /metrics page."""
    import re
    for line in text.splitlines():
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        if m:
            yield m[1], dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or "")), float(m[3])


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a /metrics page, the ``worker`` label left out of the
    comparison (with Redis every sample carries the answering worker's id); None if absent."""
    for got_name, got, value in samples(text):
        got.pop("worker", None)
        if got_name == name and got == labels:
            return value
    return None


class Client:
    """A WebSocket client that reads frames with a timeout and keeps what it skipped."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame = json.loads(raw) if isinstance(raw, str) else __import__("msgpack").unpackb(raw)
        self.frames.append(frame)
        return frame

    async def expect(self, pred, timeout: float = TIMEOUT, what: str = "") -> dict[str, Any]:
        """The next frame matching ``pred`` (a type name or a predicate); others are skipped."""
        test = (lambda f: f.get("type") == pred) if isinstance(pred, str) else pred
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no frame matching {what or pred!r}; got {self.frames[-8:]}")
            try:
                frame = await self.recv(left)
            except asyncio.TimeoutError:
                raise AssertionError(f"no frame matching {what or pred!r}; got {self.frames[-8:]}") from None
            if test(frame):
                return frame

    async def message(self, text: str, conversation: str | None = None, cid: str | None = None) -> dict[str, Any]:
        cid = cid or uuid.uuid4().hex
        frame = {"type": "message", "id": cid, "text": text}
        if conversation:
            frame["conversation"] = conversation
        await self.send(frame)
        return await self.expect(lambda f: f.get("type") in ("ack", "error") and f.get("id") == cid,
                                 what=f"ack {cid}")

    async def close(self) -> None:
        await self.ws.close()


class Server:
    def __init__(self, app, port: int, srv: Any = None) -> None:
        self.app, self.port, self.srv = app, port, srv
        self.stopped = False
        self.base = f"http://127.0.0.1:{port}"
        self.ws_base = f"ws://127.0.0.1:{port}"

    @property
    def ctx(self):
        return self.app.ctx

    async def stop(self) -> None:
        """Shut the server down as Sanic does on SIGTERM (a test may then start another on the
        same data folder)."""
        if self.stopped:
            return
        self.stopped = True
        await self.srv.before_stop()
        self.srv.close()
        await self.srv.wait_closed()
        await self.srv.after_stop()

    async def connect(self, path: str, *, origin: str | None = ORIGIN, **kw: Any) -> Client:
        kw.setdefault("open_timeout", TIMEOUT)
        ws = await connect(self.ws_base + path, origin=origin, **kw)
        return Client(ws)

    async def visitor(self, **hello: Any) -> tuple[Client, dict[str, Any]]:
        client = await self.connect("/ws/visitor")
        await client.send({"type": "hello", "bot": "testbot", **hello})
        welcome = await client.expect("welcome")
        return client, welcome

    async def add_agent(self, username: str, password: str = "password123", capacity: int = 2,
                        display_name: str = "") -> Any:
        return await self.ctx.storage.add_agent(username, hash_password(password), capacity=capacity,
                                                display_name=display_name or username.title())

    async def http(self, method: str, path: str, *, token: str | None = None, json_body: Any = None):
        """A tiny HTTP/1.1 client over asyncio streams (no extra dependency)."""
        return await http_request(self.port, method, path, token=token, json_body=json_body)

    async def login(self, username: str, password: str = "password123") -> str:
        status, data = await self.http("POST", "/api/v1/auth/login",
                                       json_body={"username": username, "password": password})
        assert status == 200, data
        return data["token"]

    async def agent(self, username: str, **hello: Any) -> tuple[Client, dict[str, Any]]:
        token = await self.login(username)
        client = await self.connect("/ws/agent")
        await client.send({"type": "hello", "token": token, **hello})
        welcome = await client.expect("welcome")
        return client, welcome


async def http_request(port: int, method: str, path: str, *, token: str | None = None, json_body: Any = None,
                       headers: dict[str, str] | None = None) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"" if json_body is None else json.dumps(json_body).encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             f"Content-Length: {len(body)}"]
    if json_body is not None:
        lines.append("Content-Type: application/json")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        payload = _unchunk(payload)
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, payload.decode("utf-8", "replace")


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.setblocking(False)
    return sock


@pytest.fixture
async def server_factory(tmp_path):
    if SHARED_REDIS:
        from server.redis_client import RedisUnreachable, open_checked
        from .storage_support import unavailable
        try:
            await (await open_checked(SHARED_REDIS)).aclose()
        except RedisUnreachable as exc:
            unavailable("Redis for KEFU_TEST_SHARED", exc)
    started: list[Any] = []

    async def start(plugins=(testbot,), data_dir=None, **settings: Any) -> Server:
        config = server_config(data_dir or tmp_path / "data", **settings)
        app = create_app(config, plugins=plugins, load_entrypoints=False, name=f"kefu_test_{next(_names)}")
        sock = free_socket()
        srv = await app.create_server(sock=sock, return_asyncio_server=True)
        await srv.startup()
        await srv.before_start()
        await srv.after_start()
        server = Server(app, sock.getsockname()[1], srv)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()
    await _drain_leftover_tasks()
    for server in started:
        if server.ctx.settings.shared:
            await drop_prefix(server.ctx.settings.redis_url, server.ctx.settings.redis_prefix)


async def _drain_leftover_tasks() -> None:
    """Cancel what the stopped server left running, as often as it takes, before pytest-asyncio
    closes the loop.

    The loop's own close cancels leftovers once and then waits for them without a limit, so a
    task that swallows one cancellation hangs the teardown until pytest-timeout (300 s).  The
    one such task seen here, an aiosqlite connection's ``_terminate_graceful_close`` waiting on
    a stopped worker thread after a read was cancelled twice, is prevented in storage now
    (``server.storage.sql._operation``; test_storage checks it); this stays as a guard so another one
    costs a second, not a 300 s timeout.
    """
    gc.collect()   # run finalizers now: they may create such tasks
    me = asyncio.current_task()
    for _ in range(5):
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not left:
            return
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=1.0)


@pytest.fixture
async def server(server_factory) -> Server:
    return await server_factory()


class RawSocket:
    """A hand-rolled WebSocket client for what well-behaved libraries refuse to send
    (invalid UTF-8) and for peers that never answer pings or never read."""

    def __init__(self, reader, writer, response: bytes) -> None:
        self.reader, self.writer, self.response = reader, writer, response

    @classmethod
    async def open(cls, port: int, path: str, origin: str | None = ORIGIN, rcvbuf: int | None = None) -> "RawSocket":
        import base64
        import os as _os

        sock = None
        if rcvbuf:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(_os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if origin:
            lines.append(f"Origin: {origin}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        return cls(reader, writer, response)

    @property
    def status(self) -> int:
        return int(self.response.split(b" ", 2)[1])

    async def send_frame(self, payload: bytes, opcode: int = 1) -> None:
        import os as _os
        import struct

        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = _os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def read_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        import struct

        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return opcode, await self.reader.readexactly(n)

    async def close_code(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server's close frame; its code (None if the TCP connection just ended)."""
        import struct

        try:
            while True:
                opcode, payload = await self.read_frame(timeout)
                if opcode == 8:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self.writer.close()
