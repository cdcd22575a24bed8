"""Servers this project starts for itself: a process in its own process group, ready when a
probe says so, stopped together with every process it spawned.

The bench (which starts plain vLLM, `steer-server serve`, redis-server and a latency proxy one
after another) and the API tests' session fixture both start and stop servers through here.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class ServerStartError(RuntimeError):
    """A server exited or never became ready; the message ends with its log's tail."""


@dataclass
class ServerProcess:
    name: str  # for messages: "steer-server", "redis-server", ...
    url: str
    process: subprocess.Popen
    log: Path
    start_s: float  # from spawn to ready


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_health(url: str) -> Callable[[], bool]:
    """Probe: ``GET {url}/health`` answers 200 (vLLM's readiness route)."""
    import httpx

    def ready() -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


def redis_ping(url: str) -> Callable[[], bool]:
    """Probe: the Redis server at ``url`` answers PING (not while it is still loading its data)."""
    import redis

    def ready() -> bool:
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    return ready


def start(name: str, command: Sequence[str], *, url: str, ready: Callable[[], bool], log: Path,
          env: Mapping[str, str] | None = None, timeout_s: float = 600, poll_s: float = 0.5) -> ServerProcess:
    """Spawn ``command`` in a new session (its own process group), output to ``log``, and wait
    until ``ready()``; on exit or timeout stop what was spawned and raise ``ServerStartError``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("wb") as log_file:
        process = subprocess.Popen(list(command), stdout=log_file, stderr=subprocess.STDOUT,
                                   env=dict(env) if env is not None else None, start_new_session=True,
                                   preexec_fn=_die_with_parent)
    server = ServerProcess(name, url, process, log, 0.0)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if process.poll() is not None:
                raise ServerStartError(f"{name} exited with {process.returncode} while starting:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"{name} not ready after {timeout_s:.0f} s:\n{log_tail(log)}")
            time.sleep(poll_s)
    except BaseException:
        stop(server)
        raise
    server.start_s = time.perf_counter() - started
    return server


def stop(server: ServerProcess, grace_s: float = 30) -> None:
    """SIGINT (vLLM and redis-server shut down cleanly on it), then SIGKILL the whole process
    group, so engine cores and workers the server spawned go too."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when its parent dies, even by SIGKILL, so no server
    outlives a killed bench or test run (Linux only; elsewhere nothing happens)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def steer_server_command(*args: str) -> list[str]:
    """``steer-server ARGS``: the installed console script when there is one (what users run),
    else the module."""
    script = Path(sys.executable).parent / "steer-server"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "steer_server.cli"]
    return [*launcher, *args]


def steer_serve_command(*args: str) -> list[str]:
    """``steer-server serve ARGS``."""
    return steer_server_command("serve", *args)


def start_steer_server(args: Sequence[str], *, port: int, log: Path, env: Mapping[str, str] | None = None,
                       timeout_s: float = 600) -> ServerProcess:
    """``steer-server serve ARGS --host 127.0.0.1 --port PORT``, ready when /health answers."""
    url = f"http://127.0.0.1:{port}"
    command = steer_serve_command(*args, "--host", "127.0.0.1", "--port", str(port))
    return start("steer-server", command, url=url, ready=http_health(url), log=log, env=env, timeout_s=timeout_s)


def start_redis(workdir: Path, *, port: int | None = None, persist: bool = False,
                persistence: list[str] | None = None, timeout_s: float = 10) -> ServerProcess:
    """A redis-server on loopback, ``url`` ``redis://...:PORT/0``. It persists nothing, or with
    ``persist`` writes every change to an append-only file in ``workdir`` (so it can be killed
    and restarted with its data), fsynced on every write unless ``persistence`` gives
    redis-server's flags for it (as a deployment file does)."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerStartError("redis-server is not installed (apt-get install redis-server)")
    port = port or free_port()
    url = f"redis://127.0.0.1:{port}/0"
    workdir.mkdir(parents=True, exist_ok=True)

    if not persist:
        persistence = ["--appendonly", "no"]
    elif persistence is None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", *persistence, "--dir", str(workdir)]
    return start("redis-server", command, url=url, ready=redis_ping(url), log=workdir / "redis.log",
                 timeout_s=timeout_s, poll_s=0.05)
