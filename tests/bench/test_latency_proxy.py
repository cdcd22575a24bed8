"""The bench's latency proxy between a client and a real redis-server: every command arrives
no earlier than the delay (a lower bound, which load can only lengthen), bytes arrive intact
and in order, and the proxy reports what it forwarded when it stops."""
from __future__ import annotations

import time

import redis

from steer_server.bench.servers import latency_proxy

DELAY_MS = 20.0  # large against loopback round trips, so a proxy that forgets to wait is caught


def test_every_command_waits_at_least_the_delay(redis_server, tmp_path):
    with latency_proxy(redis_server, DELAY_MS, tmp_path / "proxy.log") as (url, totals):
        with redis.Redis.from_url(url) as client:
            for _ in range(10):
                started = time.perf_counter()
                assert client.ping()
                assert (time.perf_counter() - started) * 1e3 >= DELAY_MS
            value = bytes(range(256)) * 20_000  # 5 MB: many reads, kept in order
            client.set("proxy-test", value)
            assert client.get("proxy-test") == value
            client.delete("proxy-test")
    assert totals["connections"] >= 1
    assert totals["forwarded_reads"] >= 13 and totals["forwarded_bytes"] > len(value)
