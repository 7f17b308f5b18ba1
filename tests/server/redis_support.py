"""A Redis of a test's own, and a bounded wait, for the tests of the Redis seams and of
several nodes (``test_broker``, ``test_redis_seams``, ``test_scale_out``)."""
from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
from typing import Any, Callable

import pytest

WAIT = 5.0


async def until(cond: Callable[[], Any], timeout: float = WAIT, what: str = "") -> None:
    """A bounded poll on a condition nothing signals (a status flag, a Redis-side count)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A ``redis-server`` of this test's own on a free port: start, SIGKILL, start again on the
    same port.  :meth:`stop` (the fixture's finalizer) always kills it."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    async def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await until(self.answers_ping, timeout, f"redis-server on port {self.port} to answer PING")

    async def answers_ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 1.0)) == b"+PONG\r\n"
        except (OSError, asyncio.TimeoutError):
            return False
        finally:
            writer.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    stop = kill


@pytest.fixture
async def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(str(tmp_path))
    try:
        await server.start()
        yield server
    finally:
        server.stop()
