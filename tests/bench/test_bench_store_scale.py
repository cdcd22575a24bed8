"""The store-scale benchmark (``steer_server.bench.store_scale``): its filler spreads the
vectors over tenants, sharing some content; its bulk fill leaves exactly what the stores' own
writes (``put``/``add_reference``/``set_name`` per tenant) leave; and the whole script runs at a
tiny scale (SQLite only: two tiny servers, a few requests, resolved as a non-default tenant; the
Redis path differs only in where the two stores live, and its fill is checked above).
Its numbers are the benchmark's business, not checked here."""
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
                  for table in ("vectors", "refs", "names", "computations", "calibrations", "usage")}
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


TENANTS = store_scale.tenant_names(3)


def test_the_filler_spreads_the_vectors_over_tenants_sharing_some():
    plan = store_scale.filler(200, hidden=8, layer=1, tenants=TENANTS)
    assert TENANTS == ["default", "team1", "team2"]
    ids = [vector.content_id for vector in plan.vectors]
    assert len(set(ids)) == 200
    held = [content_id for tenant in TENANTS for content_id in plan.refs[tenant]]
    assert set(held) == set(ids)  # every vector is some tenant's
    shared = {content_id for content_id in ids if held.count(content_id) == 2}
    assert 0 < len(shared) < 200 and plan.references == 200 + len(shared)
    assert all(held.count(content_id) <= 2 for content_id in ids)
    for tenant in TENANTS:
        named = plan.names[tenant]
        assert set(named.values()) <= set(plan.refs[tenant])
        assert 0 < len(named) < len(plan.refs[tenant])  # some references stay unnamed
        assert plan.shared[tenant] in shared and plan.shared[tenant] in named.values()
    # the same names exist in every tenant, pointing at different vectors (but for shared ones)
    common = set.intersection(*(set(plan.names[tenant]) for tenant in TENANTS))
    assert len(common) > 40
    assert sum(len({plan.names[tenant][name] for tenant in TENANTS}) == 3 for name in common) > 40


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_bulk_fill_writes_what_put_add_reference_and_set_name_write(backend, tmp_path, request):
    plan = store_scale.filler(60, hidden=16, layer=1, tenants=TENANTS)
    if backend == "sqlite":
        bulk, written = SqliteVectorStore(tmp_path / "bulk"), SqliteVectorStore(tmp_path / "written")
        contents = sqlite_contents
    else:
        url = request.getfixturevalue("redis_server")
        bulk, written = (RedisVectorStore(url, prefix=f"{which}-{uuid.uuid4().hex}:") for which in ("bulk", "written"))
        contents = redis_contents
    store_scale.fill(bulk, plan)
    by_id = {vector.content_id: vector for vector in plan.vectors}
    for i, vector in enumerate(plan.vectors):  # each by its owner (vector i is tenant i mod T's)
        written.put(vector, tenant=TENANTS[i % len(TENANTS)])
    for tenant, ids in plan.refs.items():
        for content_id in ids:
            written.add_reference(content_id, tenant=tenant)  # idempotent for the owner
        for name, content_id in plan.names[tenant].items():
            written.set_name(name, content_id, tenant=tenant)
    assert contents(bulk) == contents(written)
    for tenant, ids in plan.refs.items():
        assert [entry.content_id for entry in bulk.listing(tenant=tenant)] == sorted(
            ids, key=lambda content_id: (by_id[content_id].meta.created, content_id))
        assert bulk.usage(tenant=tenant).vectors == len(ids)
        assert len(bulk.listing_page(1000, named_only=True, tenant=tenant).entries) == len(set(plan.names[tenant].values()))
    store_scale.check_tenant_views(bulk, plan, {vector.content_id: vector.meta.created for vector in plan.vectors}, {})


@pytest.mark.slow
def test_the_benchmark_runs_at_a_tiny_scale(tmp_path):
    from models import make_tiny_llama

    model = make_tiny_llama(tmp_path / "llama")
    out = tmp_path / "scale.json"
    assert store_scale.main(["--vectors", "30", "--tenants", "3", "--tenant", "team2", "--rounds", "2",
                             "--requests", "2", "--warmup", "1", "--timing-repeats", "2", "--model", model, "--stores", "sqlite",
                             "--enforce-eager", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["tenants"]) == {"default", "team1", "team2"}
    assert sum(held["vectors"] for held in data["tenants"].values()) == data["references"] > 30
    assert set(data["backends"]) == {"sqlite"}
    for result in data["backends"].values():
        assert result["tenant"] == "team2"
        assert result["stored"]["empty"] == store_scale.STEERING_VECTORS
        assert result["stored"]["full"] == 30 + store_scale.STEERING_VECTORS
        assert result["stored"]["references"] == {  # the bench tenant also holds the steering vectors
            tenant: held["vectors"] + (store_scale.STEERING_VECTORS if tenant == "team2" else 0)
            for tenant, held in data["tenants"].items()}
        for kind in ("steered", "unsteered"):
            assert [len(r) for r in result["rounds_ms"][kind]["full"]] == [2, 2]
            assert [len(r) for r in result["rounds_ms"][kind]["empty"]] == [2, 2]
        for ratio in result["ttft_ratio"].values():
            low, high = ratio["interval95"]
            assert 0 < low <= high and ratio["median"] > 0
        timed = {"first_page_ms", "first_named_page_ms", "deep_page_ms", "deep_named_page_ms", "names_of_ms",
                 "resolve_ms", "usage_ms"}
        assert set(result["store"]["full"]) == {"default", "team1", "team2"}
        assert all(set(timings) == timed for timings in result["store"]["full"].values())
        assert set(result["store"]["empty"]) == set(result["store"]["full_worst"]) == timed
        assert set(result["route_page_ms"]) == {"empty", "full"}
