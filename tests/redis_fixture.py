"""Throwaway redis-servers for tests, on loopback.

``redis_server`` (a session fixture, shared by every test folder through
tests/conftest.py) persists nothing; a test that uses it gets the server's URL and must
keep its keys apart (a unique key prefix, or a db it flushes). Tests that pause, kill or
restart a server start their own ``RedisProcess``.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from steer_server.server_process import free_port, start_redis


class RedisProcess:
    """A redis-server on a free loopback port. With ``persist`` it writes every change to
    an append-only file in ``workdir``, so it can be killed and restarted with its data."""

    def __init__(self, workdir: Path, persist: bool = False, persistence: list[str] | None = None):
        self.port = free_port()
        self.workdir = workdir
        self.persist = persist
        self.persistence = persistence
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start (or restart, on the same port and directory) and wait until it answers PING."""
        self.process = start_redis(self.workdir, port=self.port, persist=self.persist,
                                   persistence=self.persistence).process

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.process.terminate()
        self.process.wait(timeout=10)


def deployed_redis_persistence() -> list[str]:
    """redis-server's flags as deploy/compose.yaml runs it (its persistence: AOF, fsynced each
    second), so tests kill and restart the Redis that deployments get."""
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "compose.yaml").read_text())
    command = compose["services"]["redis"]["command"]
    assert command[0] == "redis-server", command
    return list(command[1:])


def needs_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a redis-server started for this test session (skips without the binary)."""
    needs_redis_server()
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
