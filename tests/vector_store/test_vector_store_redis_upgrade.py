"""A Redis store written by an earlier release, opened by this one: every vector, name,
calibration and cached computation becomes the default tenant's, bit for bit.

The old store is written by the earlier releases' own ``vector_store/redis.py``, taken from
this repository's history, so the test sees what they really left in Redis: layout 2
(indexes, no tenants) and the release before the indexes (no ``layout`` key at all)."""
from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import redis
import torch

from vector_store import codec
from vector_store.base import DEFAULT_TENANT, StoredVector, TenantUsage, VectorNotFound
from vector_store.keys import computation_key
from vector_store.redis import RedisVectorStore

LAYOUT_2_RELEASE = "6907fa553cddb3bd24be203c0d02dfe4627dbc30"  # the release before tenants
BEFORE_INDEXES_RELEASE = "ad1315d6fbd7ae48f9dbc19aed29df18edb010ff"  # the release before layout 2
OTHER = "team-a"


def old_store_class(commit: str, tmp_path: Path) -> type:
    """That release's RedisVectorStore, imported from its source."""
    repo = Path(__file__).resolve().parents[2]
    try:
        source = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:vector_store/redis.py"],
                                capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs this repository's git history (commit {commit[:7]})")
    path = tmp_path / f"redis_{commit[:7]}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"old_redis_{commit[:7]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    store_class = module.RedisVectorStore
    # This release's interface has methods that one lacks; the test calls only those it has.
    store_class.__abstractmethods__ = frozenset()
    return store_class


def at(vector: StoredVector, created: float) -> StoredVector:
    return dataclasses.replace(vector, meta=dataclasses.replace(vector.meta, created=created))


@pytest.fixture(params=[LAYOUT_2_RELEASE, BEFORE_INDEXES_RELEASE], ids=["layout-2", "before-indexes"])
def old_release(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, type]:
    return request.param, old_store_class(request.param, tmp_path)


def test_an_old_store_becomes_the_default_tenants_bit_for_bit(old_release, redis_server, make_vector):
    commit, old_class = old_release
    prefix = f"upgrade-{uuid.uuid4().hex}:"
    client = redis.Redis.from_url(redis_server)
    old = old_class(redis_server, prefix=prefix)

    # What that release's users did: vectors of both kinds, ties on `created`, names (several
    # on one vector, re-pointed, deleted), calibrations in versions, a cached computation, a delete.
    vectors = [at(make_vector(seed), 3000.0 + seed // 3) for seed in range(9)]
    vectors.append(at(make_vector(50, kind="actadd", k=3, layers=(0, 7), stats={"7": {"norm": 2.5}}), 2999.5))
    ids = [old.put(vector) for vector in vectors]
    gone = old.put(make_vector(60))
    for index in (0, 2, 5, 9):
        old.set_name(f"v{index}", ids[index])
    old.set_name("second", ids[0])
    old.set_name("moved", ids[1])
    old.set_name("moved", ids[3])
    old.set_name("dropped", ids[4])
    old.delete_name("dropped")
    old.set_name("gone-with-it", gone)
    key = computation_key("fp", 3, [[7]], [1.0], "actadd", None)
    old.remember_computation(key, ids[2])
    old.remember_computation("key-gone", gone)
    old.put_calibration(ids[0], {"layer": 5, "dose": 0.4, "positions": {"start": 1}, "mode": "constant"})
    old.put_calibration(ids[0], {"layer": 3, "dose": 0.25, "positions": "all", "mode": "constant"})
    old.put_calibration(ids[9], {"layer": 7, "dose": 1.5, "mode": "actadd"})
    old.put_calibration(gone, {"layer": 1, "dose": 0.1})
    old.delete(gone)
    calibrations = {content_id: old.calibration(content_id) for content_id in ids}
    assert calibrations[ids[0]]["version"] == 2 and calibrations[ids[9]]["version"] == 1
    names = {"v0": ids[0], "v2": ids[2], "v5": ids[5], "v9": ids[9], "second": ids[0], "moved": ids[3]}
    if commit == LAYOUT_2_RELEASE:
        old.listing_page(1)  # that release builds its indexes on first use
        assert client.get(f"{prefix}layout") == b"2"
    else:
        assert client.get(f"{prefix}layout") is None and not client.exists(f"{prefix}order")
    stored = {content_id: client.hgetall(f"{prefix}vector:{content_id}") for content_id in ids}
    assert all(b"calibration" in stored[content_id] for content_id in (ids[0], ids[9]))

    # Several replicas of this release open it at once: each upgrades it or finds it upgraded.
    seen: list[tuple] = []
    errors: list[BaseException] = []

    def open_replica() -> None:
        try:
            replica = RedisVectorStore(redis_server, prefix=prefix)
            seen.append((tuple(entry.content_id for entry in replica.listing_page(100).entries), replica.usage()))
        except BaseException as error:  # reported below, with the thread's traceback lost otherwise
            errors.append(error)

    threads = [threading.Thread(target=open_replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(seen) == 4 and len(set(seen)) == 1
    assert client.get(f"{prefix}layout") == b"3"

    store = RedisVectorStore(redis_server, prefix=prefix)
    order = sorted(ids, key=lambda c: (vectors[ids.index(c)].meta.created, c))
    listed = store.listing()
    assert [entry.content_id for entry in listed] == order == list(seen[0][0])
    for entry in listed:
        original = vectors[ids.index(entry.content_id)]
        assert entry.meta == original.meta  # `created` and `stats` included
        assert entry.names == sorted(name for name, target in names.items() if target == entry.content_id)
        assert entry.shapes == {layer: list(t.shape) for layer, t in original.directions.items()}
    assert [e.content_id for e in store.listing_page(100, named_only=True).entries] == \
        [c for c in order if c in names.values()]
    for content_id, original in zip(ids, vectors):
        # The entry is the one that release wrote, less the calibration that moved to the tenant.
        assert client.hgetall(f"{prefix}vector:{content_id}") == \
            {field: value for field, value in stored[content_id].items() if field != b"calibration"}
        read = store.get(content_id)
        assert read.meta == original.meta and read.layers == original.layers
        for layer in original.layers:
            assert read.directions[layer].numpy().tobytes() == original.directions[layer].numpy().tobytes()
        assert store.has(content_id) and store.calibration(content_id) == calibrations[content_id]
        assert store.names_of(content_id) == sorted(n for n, target in names.items() if target == content_id)
    assert {name: store.name_target(name) for name in names} == names
    assert store.name_target("dropped") is None and store.name_target("gone-with-it") is None
    assert store.cached_computation(key) == ids[2] and store.cached_computation("key-gone") is None
    assert not store.has(gone) and store.calibration(gone) is None
    sizes = [len(codec.encode(vector).tensor_bytes) for vector in vectors]
    assert store.usage() == seen[0][1] == TenantUsage(len(ids), sum(sizes))
    # The vectors are the default tenant's only.
    assert store.listing(tenant=OTHER) == [] and store.usage(tenant=OTHER) == TenantUsage(0, 0)
    assert not store.has(ids[0], tenant=OTHER) and store.name_target("v0", tenant=OTHER) is None
    assert store.calibration(ids[0], tenant=OTHER) is None

    # Writes through the upgraded store go on from there.
    assert store.put_calibration(ids[0], {"layer": 4, "dose": 0.3})["version"] == 3
    assert store.put_calibration(ids[5], {"layer": 4, "dose": 0.3})["version"] == 1
    store.add_reference(ids[2], tenant=OTHER)
    store.delete(ids[2])
    assert store.name_target("v2") is None and store.cached_computation(key) == ids[2]
    assert store.listing(tenant=OTHER)[0].content_id == ids[2] and store.calibration(ids[2], tenant=OTHER) is None
    store.delete(ids[9])
    with pytest.raises(VectorNotFound):
        store.get(ids[9])
    assert store.name_target("v9") is None and store.calibration(ids[9]) is None
    assert store.put(vectors[9]) == ids[9] and store.calibration(ids[9]) is None  # stored afresh, uncalibrated
    assert store.usage() == TenantUsage(len(ids) - 1, sum(sizes) - sizes[2])
    reopened = RedisVectorStore(redis_server, prefix=prefix)
    assert len(reopened.listing()) == len(ids) - 1 and reopened.calibration(ids[0])["version"] == 3
    assert reopened.usage(tenant=DEFAULT_TENANT) == store.usage()


def test_a_store_of_this_layout_is_not_upgraded_again(redis_server, make_vector):
    prefix = f"upgrade-{uuid.uuid4().hex}:"
    store = RedisVectorStore(redis_server, prefix=prefix)
    content_id = store.put(make_vector(1), tenant=OTHER)
    store.put_calibration(content_id, {"dose": 1.0}, tenant=OTHER)
    # A new store object (another replica) leaves another tenant's vector that tenant's alone.
    reopened = RedisVectorStore(redis_server, prefix=prefix)
    assert reopened.listing() == [] and not reopened.has(content_id)
    assert reopened.listing(tenant=OTHER)[0].content_id == content_id
    assert reopened.calibration(content_id, tenant=OTHER)["version"] == 1
    assert reopened.usage() == TenantUsage(0, 0)
    assert torch.equal(reopened.get(content_id).directions[3], make_vector(1).directions[3])
