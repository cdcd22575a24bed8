"""The store-scale benchmark (``steer_server.bench.store_scale``): its bulk fill leaves exactly
what the stores' own writes leave, and the whole script runs at a tiny scale (two tiny servers
per backend, a few requests). Its numbers are the benchmark's business, not checked here."""
from __future__ import annotations

import json
import sqlite3
import uuid

import pytest
import redis

from steer_server.bench import store_scale
from vector_store.redis import RedisVectorStore
from vector_store.sqlite import SqliteVectorStore


def sqlite_contents(store: SqliteVectorStore) -> dict:
    with sqlite3.connect(store.index_path) as connection:
        tables = {table: sorted(connection.execute(f"SELECT * FROM {table}").fetchall())
                  for table in ("vectors", "names", "computations", "calibrations")}
    blobs = {path.name: path.read_bytes() for path in store.blob_dir.iterdir()}
    return {"tables": tables, "blobs": blobs}


def redis_contents(store: RedisVectorStore) -> dict:
    client = redis.Redis.from_url(store.url)
    contents = {}
    for key in client.scan_iter(match=f"{store.prefix}*"):
        kind = client.type(key).decode()
        value = {"hash": client.hgetall, "set": client.smembers, "string": client.get,
                 "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}[kind](key)
        contents[key.decode().removeprefix(store.prefix)] = (kind, value)
    return contents


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_bulk_fill_writes_what_put_and_set_name_write(backend, tmp_path, request):
    vectors, names = store_scale.filler(40, hidden=16, layer=1, teams=3)
    if backend == "sqlite":
        bulk, written = SqliteVectorStore(tmp_path / "bulk"), SqliteVectorStore(tmp_path / "written")
        contents = sqlite_contents
    else:
        url = request.getfixturevalue("redis_server")
        bulk, written = (RedisVectorStore(url, prefix=f"{which}-{uuid.uuid4().hex}:") for which in ("bulk", "written"))
        contents = redis_contents
    store_scale.fill(bulk, vectors, names)
    for vector in vectors:
        written.put(vector)
    for name, content_id in names.items():
        written.set_name(name, content_id)
    assert contents(bulk) == contents(written)
    assert len(bulk.listing()) == 40 and len(bulk.listing_page(1000, named_only=True).entries) == 36


@pytest.mark.slow
def test_the_benchmark_runs_at_a_tiny_scale(tmp_path):
    from models import make_tiny_llama

    model = make_tiny_llama(tmp_path / "llama")
    out = tmp_path / "scale.json"
    assert store_scale.main(["--vectors", "30", "--rounds", "2", "--requests", "2", "--warmup", "1",
                             "--timing-repeats", "2", "--model", model, "--enforce-eager",
                             "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for backend in ("sqlite", "redis"):
        result = data["backends"][backend]
        assert result["stored"] == {"empty": store_scale.STEERING_VECTORS, "full": 30 + store_scale.STEERING_VECTORS}
        for kind in ("steered", "unsteered"):
            assert [len(r) for r in result["rounds_ms"][kind]["full"]] == [2, 2]
            assert [len(r) for r in result["rounds_ms"][kind]["empty"]] == [2, 2]
        for ratio in result["ttft_ratio"].values():
            low, high = ratio["interval95"]
            assert 0 < low <= high and ratio["median"] > 0
        assert set(result["store"]["full"]) == {"first_page_ms", "first_named_page_ms", "deep_page_ms",
                                                "deep_named_page_ms", "names_of_ms"}
