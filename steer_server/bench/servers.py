"""Servers the bench starts itself, one at a time, on loopback: plain vLLM (no plugin at all)
or ``steer-server serve``, with the vector store in SQLite (a directory) or in a real
redis-server, optionally behind ``latency_proxy`` so every store command pays a fixed delay.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from steer_server.bench import BenchError
from steer_server.server_process import (
    ServerStartError,
    free_port,
    http_health,
    redis_ping,
    start,
    start_redis,
    start_steer_server,
    stop,
)
from steer_server.settings import Settings, child_environment, load_settings

STORES = ("sqlite", "redis")
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ServerOptions:
    model: str | None = None  # a Hugging Face model directory; None: the embedded default model
    enforce_eager: bool = False
    server_args: tuple[str, ...] = ()  # more flags for every server
    store: str = "sqlite"  # sqlite | redis
    store_latency_ms: float = 0.0  # redis only: delay the proxy adds to every command
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE for every kind, unless the environment sets it
    startup_timeout_s: float = 600

    @property
    def store_description(self) -> str:
        if self.store == "redis" and self.store_latency_ms:
            return f"redis +{self.store_latency_ms:g} ms per command"
        return self.store

    def validate(self) -> None:
        if self.store not in STORES:
            raise BenchError(f"unknown store {self.store!r}: one of {', '.join(STORES)}")
        if self.store_latency_ms < 0:
            raise BenchError("--store-latency-ms must not be negative")
        if self.store_latency_ms and self.store != "redis":
            raise BenchError("--store-latency-ms needs --store redis (the delay sits in front of redis-server)")

    def model_and_name(self) -> tuple[str, str]:
        if self.model is None:
            from steer_server.default_model import default_model_dir

            return default_model_dir(), DEFAULT_SERVED_NAME
        return self.model, Path(self.model).name


@dataclass
class Store:
    location: str  # what `steer-server serve --store` gets
    description: str
    redis_url: str | None = None  # the redis-server itself (``location`` is the proxy's when there is one)
    proxy_totals: dict = field(default_factory=dict)  # the proxy's totals, filled when it stops
    measured_latency_ms: float | None = None  # median round trip through the proxy minus direct


@contextmanager
def vector_store(options: ServerOptions, workdir: Path) -> Iterator[Store]:
    """The vector store a steer server is started with, for as long as the block runs."""
    if options.store == "sqlite":
        yield Store(str(workdir / "store"), options.store_description)
        return
    try:
        redis_server = start_redis(workdir / "redis")
    except ServerStartError as exc:
        raise BenchError(str(exc)) from None
    try:
        if not options.store_latency_ms:
            yield Store(redis_server.url, options.store_description, redis_server.url)
            return
        with latency_proxy(redis_server.url, options.store_latency_ms, workdir / "proxy.log") as (url, totals):
            yield Store(url, options.store_description, redis_server.url, proxy_totals=totals,
                        measured_latency_ms=_added_latency_ms(redis_server.url, url))
    finally:
        stop(redis_server)


@contextmanager
def latency_proxy(redis_url: str, delay_ms: float, log: Path) -> Iterator[tuple[str, dict]]:
    """``latency_proxy`` in front of ``redis_url``; yields the proxied URL and a dict that holds
    the proxy's totals once it has stopped."""
    upstream = redis_url.removeprefix("redis://").split("/")[0]
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    command = [sys.executable, "-m", "steer_server.bench.latency_proxy", "--port", str(port),
               "--upstream", upstream, "--delay-ms", str(delay_ms)]
    proxy = start("latency proxy", command, url=url, ready=redis_ping(url), log=log, timeout_s=60, poll_s=0.1)
    totals: dict = {}
    try:
        yield url, totals
    finally:
        stop(proxy)
        lines = log.read_text(errors="replace").strip().splitlines()
        try:
            totals.update(json.loads(lines[-1]))
        except (IndexError, ValueError):
            pass  # it died without a summary: the totals stay empty


def _added_latency_ms(direct_url: str, proxied_url: str, rounds: int = 50) -> float:
    """Median PING round trip through the proxy minus the median direct one."""
    import statistics

    import redis

    def median_ping_ms(url: str) -> float:
        with redis.Redis.from_url(url) as client:
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                client.ping()
                times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    return median_ping_ms(proxied_url) - median_ping_ms(direct_url)


def server_env(kind: str, kv_cache_gib: int) -> dict[str, str]:
    """The server's environment: this one, with the same model runner for both kinds (what
    the steer plugin selects), the plugins of the kind and a KV cache size unless set."""
    settings = load_settings()
    var = Settings.variable
    overrides: dict[str, str | None] = {var("vllm_use_v2_model_runner"): "0"}
    # plain: an empty list, no plugin at all; steer: `steer-server serve` enables its own
    overrides[var("vllm_plugins")] = "" if kind == "plain" else None
    if settings.vllm_cpu_kvcache_space is None:
        overrides[var("vllm_cpu_kvcache_space")] = str(kv_cache_gib)
    return child_environment(overrides)


@dataclass
class BenchServer:
    kind: str  # plain | steer
    url: str
    api_key: str
    log: Path
    start_s: float


@contextmanager
def running_server(kind: str, options: ServerOptions, *, store: Store | None, log: Path) -> Iterator[BenchServer]:
    """A plain vLLM (``kind="plain"``) or steer (``"steer"``) server, stopped on exit."""
    model_dir, served_name = options.model_and_name()
    api_key = "bench-" + uuid.uuid4().hex[:12]
    flags = ["--api-key", api_key, "--served-model-name", served_name, *options.server_args]
    if options.enforce_eager:
        flags.append("--enforce-eager")
    if not any(flag.split("=")[0] in ("--async-scheduling", "--no-async-scheduling") for flag in flags):
        flags.append("--no-async-scheduling")  # what `steer-server serve` chooses: both kinds run the same engine
    env = server_env(kind, options.kv_cache_gib)
    port = free_port()
    try:
        if kind == "plain":
            url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "steer_server.bench.plain_vllm", model_dir, "--host", "127.0.0.1",
                       "--port", str(port), *flags]
            server = start("plain vLLM", command, url=url, ready=http_health(url), log=log, env=env,
                           timeout_s=options.startup_timeout_s)
        else:
            if store is None:
                raise BenchError("a steer server needs a vector store")
            server = start_steer_server(["--model", model_dir, "--store", store.location, *flags], port=port,
                                        log=log, env=env, timeout_s=options.startup_timeout_s)
    except ServerStartError as exc:
        raise BenchError(str(exc)) from None
    try:
        yield BenchServer(kind, server.url, api_key, log, server.start_s)
    finally:
        stop(server)
