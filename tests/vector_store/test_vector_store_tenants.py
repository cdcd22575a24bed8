"""Per-tenant namespaces, both backends (the `store` fixture): a tenant sees, names, lists,
calibrates and deletes only the vectors it references; content is stored once whoever puts it
and collected with its last reference; usage counts each tenant's references; bad tenants are
refused before anything is read or written."""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import redis
import torch

from vector_store import codec
from vector_store.base import (
    DEFAULT_TENANT,
    ListedVector,
    StoredVector,
    TenantUsage,
    VectorNotFound,
    VectorStore,
    VectorStoreError,
)
from vector_store.keys import computation_key
from vector_store.redis import RedisVectorStore
from vector_store.sqlite import SqliteVectorStore

A, B, C = "team-a", "team.b_2", "C"


def walk(store: VectorStore, limit: int, *, tenant: str, named_only: bool = False) -> list[ListedVector]:
    entries, after = [], None
    while True:
        page = store.listing_page(limit, after, named_only=named_only, tenant=tenant)
        assert len(page.entries) <= limit
        entries += page.entries
        if page.next_cursor is None:
            return entries
        after = page.next_cursor


def listed_ids(store: VectorStore, tenant: str, named_only: bool = False) -> list[str]:
    return [entry.content_id for entry in walk(store, 1000, tenant=tenant, named_only=named_only)]


def at(vector: StoredVector, created: float) -> StoredVector:
    return dataclasses.replace(vector, meta=dataclasses.replace(vector.meta, created=created))


def stored_size(vector: StoredVector) -> int:
    """What a vector counts in a tenant's usage: its tensors as stored, a safetensors file of
    float32 ``layer.<L>`` tensors (independent of ``created``, which the id leaves out too)."""
    return len(codec.encode(vector).tensor_bytes)


def stored_contents(store: VectorStore) -> int:
    """How many vectors' tensors the backend holds, whoever references them."""
    if isinstance(store, SqliteVectorStore):
        return len(list(Path(store.blob_dir).glob("*.safetensors")))
    assert isinstance(store, RedisVectorStore)
    return sum(1 for _ in redis.Redis.from_url(store.url).scan_iter(match=f"{store.prefix}vector:*"))


def test_names_listings_and_ids_are_per_tenant(store, make_vector):
    a_only = store.put(at(make_vector(1), 100.0), tenant=A)
    b_only = store.put(at(make_vector(2), 200.0), tenant=B)
    store.set_name("shared-name", a_only, tenant=A)
    store.set_name("shared-name", b_only, tenant=B)  # the same name, another vector
    store.set_name("a-second", a_only, tenant=A)
    a_unnamed = store.put(at(make_vector(3), 300.0), tenant=A)

    assert store.name_target("shared-name", tenant=A) == a_only
    assert store.name_target("shared-name", tenant=B) == b_only
    assert store.name_target("shared-name") is None and store.name_target("a-second", tenant=B) is None
    assert store.resolve("shared-name", tenant=A) == a_only and store.resolve("shared-name", tenant=B) == b_only
    assert store.resolve(a_only, tenant=A) == a_only
    assert listed_ids(store, A) == [a_only, a_unnamed] and listed_ids(store, A, named_only=True) == [a_only]
    assert listed_ids(store, B) == [b_only] == listed_ids(store, B, named_only=True)
    assert listed_ids(store, DEFAULT_TENANT) == [] == listed_ids(store, C, named_only=True)
    assert [entry.names for entry in walk(store, 10, tenant=A)] == [["a-second", "shared-name"], []]
    assert store.list(tenant=B) == [(b_only, store.get(b_only).meta, ["shared-name"])]
    assert store.names_of(a_only, tenant=A) == ["a-second", "shared-name"]
    assert store.names_of(a_only, tenant=B) == [] and store.names_of(b_only, tenant=A) == []

    # Another tenant's vector is not found by its id, whatever is asked of it.
    assert store.has(a_only, tenant=A) and not store.has(a_only, tenant=B) and not store.has(a_only)
    for resolve_as in (B, DEFAULT_TENANT):
        with pytest.raises(VectorNotFound):
            store.resolve(a_only, tenant=resolve_as)
        with pytest.raises(VectorNotFound):
            store.resolve("a-second", tenant=resolve_as)
    with pytest.raises(VectorNotFound):
        store.set_name("stolen", a_only, tenant=B)
    with pytest.raises(VectorNotFound):
        store.set_name("shared-name", a_only, tenant=B)  # nor may B re-point its own name at it
    with pytest.raises(VectorNotFound):
        store.delete(a_only, tenant=B)
    with pytest.raises(VectorNotFound):
        store.delete_name("a-second", tenant=B)
    with pytest.raises(VectorNotFound):
        store.put_calibration(a_only, {"dose": 1.0}, tenant=B)
    assert store.calibration(a_only, tenant=B) is None
    # ... and nothing of A's changed.
    assert store.name_target("stolen", tenant=B) is None and store.name_target("shared-name", tenant=B) == b_only
    assert store.names_of(a_only, tenant=A) == ["a-second", "shared-name"]
    assert listed_ids(store, A) == [a_only, a_unnamed] and listed_ids(store, B) == [b_only]
    assert torch.equal(store.get(a_only).directions[3], make_vector(1).directions[3])

    # Deleting a name or a vector in one tenant leaves the other's alone.
    store.delete_name("shared-name", tenant=B)
    assert store.name_target("shared-name", tenant=A) == a_only and listed_ids(store, B, named_only=True) == []
    store.delete(a_only, tenant=A)
    assert store.name_target("a-second", tenant=A) is None and store.names_of(a_only, tenant=A) == []
    assert listed_ids(store, A) == [a_unnamed] and listed_ids(store, B) == [b_only]


def test_the_default_tenant_is_the_one_without_a_tenant(store, make_vector):
    content_id = store.put(make_vector(1))
    store.set_name("plain", content_id)
    assert store.has(content_id, tenant=DEFAULT_TENANT) and not store.has(content_id, tenant=A)
    assert store.name_target("plain", tenant=DEFAULT_TENANT) == content_id
    assert listed_ids(store, DEFAULT_TENANT) == [content_id] and listed_ids(store, A) == []
    assert store.usage() == store.usage(tenant=DEFAULT_TENANT) == TenantUsage(1, stored_size(make_vector(1)))


def test_same_content_is_stored_once_and_collected_with_its_last_reference(store, make_vector):
    vector = make_vector(7)
    content_id = store.put(vector, tenant=A)
    assert store.put(at(vector, 12345.0), tenant=B) == content_id  # `created` is no part of the id
    assert stored_contents(store) == 1
    assert store.get(content_id).meta.created == store.listing(tenant=B)[0].meta.created  # the first writer's
    store.set_name("mine", content_id, tenant=A)
    store.set_name("ours", content_id, tenant=B)
    key = computation_key("fp", 3, [[7]], [1.0], "actadd", None)
    store.remember_computation(key, content_id)
    assert listed_ids(store, A) == [content_id] == listed_ids(store, B, named_only=True)

    store.delete(content_id, tenant=A)
    assert not store.has(content_id, tenant=A) and store.has(content_id, tenant=B)
    assert store.name_target("mine", tenant=A) is None and listed_ids(store, A) == []
    assert store.name_target("ours", tenant=B) == content_id and listed_ids(store, B, named_only=True) == [content_id]
    assert store.cached_computation(key) == content_id
    assert torch.equal(store.get(content_id).directions[5], vector.directions[5])
    with pytest.raises(VectorNotFound):
        store.delete(content_id, tenant=A)

    store.delete(content_id, tenant=B)
    with pytest.raises(VectorNotFound):
        store.get(content_id)
    assert store.cached_computation(key) is None and stored_contents(store) == 0
    assert not store.has(content_id, tenant=B) and store.name_target("ours", tenant=B) is None
    with pytest.raises(VectorNotFound):
        store.add_reference(content_id, tenant=A)
    assert store.usage(tenant=A) == store.usage(tenant=B) == TenantUsage(0, 0)
    # Collected content can be stored again, under the same id.
    assert store.put(vector, tenant=B) == content_id and listed_ids(store, B) == [content_id]


def test_add_reference_makes_a_stored_vector_the_tenants_too(store, make_vector):
    vector = make_vector(3, kind="actadd", k=4)
    content_id = store.put(vector, tenant=A)
    assert not store.has(content_id, tenant=B)
    store.add_reference(content_id, tenant=B)
    store.add_reference(content_id, tenant=B)  # idempotent
    store.add_reference(content_id, tenant=A)  # a reference it already holds
    assert store.has(content_id, tenant=B) and listed_ids(store, B) == [content_id]
    assert store.usage(tenant=A) == store.usage(tenant=B) == TenantUsage(1, stored_size(vector))
    store.set_name("borrowed", content_id, tenant=B)
    assert store.resolve("borrowed", tenant=B) == content_id
    store.delete(content_id, tenant=A)
    assert torch.equal(store.get(content_id).directions[3], vector.directions[3])
    with pytest.raises(VectorNotFound):
        store.add_reference(make_vector(99).content_id, tenant=B)  # never stored
    with pytest.raises(VectorNotFound):
        store.add_reference("not-an-id", tenant=B)
    assert listed_ids(store, C) == [] and store.usage(tenant=C) == TenantUsage(0, 0)


def test_calibrations_are_per_tenant_and_go_with_the_reference(store, make_vector):
    content_id = store.put(make_vector(5), tenant=A)
    store.add_reference(content_id, tenant=B)
    first = store.put_calibration(content_id, {"layer": 5, "dose": 0.4}, tenant=A)
    assert first == {"layer": 5, "dose": 0.4, "version": 1}
    assert store.calibration(content_id, tenant=B) is None and store.calibration(content_id) is None
    assert store.put_calibration(content_id, {"layer": 3, "dose": 0.1}, tenant=B) == {"layer": 3, "dose": 0.1,
                                                                                      "version": 1}
    second = store.put_calibration(content_id, {"layer": 5, "dose": 0.5}, tenant=A)
    assert second["version"] == 2 and store.calibration(content_id, tenant=A) == second
    assert store.calibration(content_id, tenant=B)["dose"] == 0.1
    with pytest.raises(VectorNotFound):
        store.put_calibration(content_id, {"dose": 1.0}, tenant=C)
    assert store.calibration(content_id, tenant=C) is None

    store.delete(content_id, tenant=A)
    assert store.calibration(content_id, tenant=A) is None
    assert store.calibration(content_id, tenant=B)["version"] == 1
    store.add_reference(content_id, tenant=A)  # a new reference starts with no calibration
    assert store.calibration(content_id, tenant=A) is None
    assert store.put_calibration(content_id, {"dose": 0.2}, tenant=A)["version"] == 1


def test_usage_counts_each_tenants_vectors_and_their_stored_bytes(store, make_vector):
    small, large = make_vector(1), make_vector(2, kind="actadd", k=6, layers=(0, 2, 4))
    assert store.usage(tenant=A) == TenantUsage(0, 0)
    small_id, large_id = store.put(small, tenant=A), store.put(large, tenant=A)
    both = TenantUsage(2, stored_size(small) + stored_size(large))
    assert stored_size(large) > stored_size(small) > 16 * 4 * 2  # headers, then float32 [k, 16] per layer
    assert store.usage(tenant=A) == both
    store.put(small, tenant=A)  # a re-put, a name and a calibration add nothing
    store.set_name("small", small_id, tenant=A)
    store.put_calibration(small_id, {"dose": 1.0}, tenant=A)
    assert store.usage(tenant=A) == both
    store.put(small, tenant=B)  # shared content counts for each tenant
    assert store.usage(tenant=B) == TenantUsage(1, stored_size(small)) and store.usage(tenant=A) == both
    store.delete(small_id, tenant=A)
    assert store.usage(tenant=A) == TenantUsage(1, stored_size(large))
    assert store.usage(tenant=B) == TenantUsage(1, stored_size(small))
    store.delete(large_id, tenant=A)
    assert store.usage(tenant=A) == TenantUsage(0, 0) and store.usage() == TenantUsage(0, 0)


def test_pages_and_cursors_are_per_tenant(store, make_vector):
    vectors = [at(make_vector(seed), 1000.0 + seed // 2) for seed in range(12)]  # ties, ordered by id
    a_ids = [store.put(v, tenant=A) for v in vectors[:8]]
    b_ids = [store.put(v, tenant=B) for v in vectors[5:]]  # 5, 6, 7 are both tenants'
    for content_id in a_ids[::3]:
        store.set_name(f"a{a_ids.index(content_id)}", content_id, tenant=A)
    store.set_name("b", b_ids[0], tenant=B)
    store.set_name("b-last", b_ids[-1], tenant=B)
    created = {v.content_id: v.meta.created for v in vectors}
    a_sorted, b_sorted = (sorted(set(ids), key=lambda c: (created[c], c)) for ids in (a_ids, b_ids))

    for limit in (1, 2, 3, 8, 20):
        assert [e.content_id for e in walk(store, limit, tenant=A)] == a_sorted
        assert [e.content_id for e in walk(store, limit, tenant=B)] == b_sorted
        assert [e.content_id for e in walk(store, limit, tenant=A, named_only=True)] == \
            [c for c in a_sorted if c in a_ids[::3]]
        assert [e.content_id for e in walk(store, limit, tenant=B, named_only=True)] == \
            [c for c in b_sorted if c in (b_ids[0], b_ids[-1])]
    # A page shows the tenant's names only, on shared vectors too.
    assert {e.content_id: e.names for e in walk(store, 4, tenant=B)}[b_ids[0]] == ["b"]
    assert {e.content_id: e.names for e in walk(store, 4, tenant=A)}[b_ids[0]] == []
    # A cursor walks on in the tenant's listing, whatever the other tenant deletes.
    first = store.listing_page(3, tenant=B)
    assert [e.content_id for e in first.entries] == b_sorted[:3]
    store.delete(vectors[6].content_id, tenant=A)  # shared: B's listing keeps it
    store.delete(b_sorted[4], tenant=B)
    rest = store.listing_page(20, first.next_cursor, tenant=B)
    assert [e.content_id for e in rest.entries] == b_sorted[3:4] + b_sorted[5:] and rest.next_cursor is None
    assert vectors[6].content_id in listed_ids(store, B) and vectors[6].content_id not in listed_ids(store, A)
    assert store.listing_page(20, tenant=C) == ([], None)


def test_concurrent_tenants_sharing_one_vector_leave_consistent_references(store, make_vector):
    vector, tenants = make_vector(42), [f"t{index}" for index in range(4)]
    start = threading.Barrier(len(tenants))
    errors: list[BaseException] = []

    def churn(tenant: str) -> None:
        try:
            start.wait()
            for round_ in range(6):
                content_id = store.put(vector, tenant=tenant)
                store.set_name(f"n{round_}", content_id, tenant=tenant)
                store.put_calibration(content_id, {"round": round_}, tenant=tenant)
                store.delete(content_id, tenant=tenant)
                store.put(vector, tenant=tenant)
                store.add_reference(content_id, tenant=tenant)
                store.set_name("kept", content_id, tenant=tenant)
        except BaseException as error:  # reported below, with the thread's traceback lost otherwise
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(tenant,)) for tenant in tenants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    content_id = vector.content_id
    for tenant in tenants:
        assert store.usage(tenant=tenant) == TenantUsage(1, stored_size(vector))
        assert store.names_of(content_id, tenant=tenant) == ["kept"]
        assert listed_ids(store, tenant) == [content_id] == listed_ids(store, tenant, named_only=True)
        assert store.calibration(content_id, tenant=tenant) is None  # deleted with its reference each round
    assert stored_contents(store) == 1
    for tenant in tenants:
        store.delete(content_id, tenant=tenant)
    with pytest.raises(VectorNotFound):
        store.get(content_id)
    assert stored_contents(store) == 0


def overwrite_whole_entry(store: VectorStore, content_id: str) -> None:
    """Damage a stored vector the way a disk or an operator could."""
    if isinstance(store, SqliteVectorStore):
        (Path(store.blob_dir) / f"{content_id}.safetensors").write_bytes(b"not a safetensors file")
    else:
        redis.Redis.from_url(store.url).set(f"{store.prefix}vector:{content_id}", b"overwritten")


def test_a_damaged_entry_rewritten_by_one_tenant_stays_every_tenants(store, make_vector):
    vector = make_vector(8)
    content_id = store.put(at(vector, 100.0), tenant=A)
    store.put(vector, tenant=B)
    store.set_name("a-name", content_id, tenant=A)
    between = store.put(at(make_vector(9), 150.0), tenant=A)
    for tenant in (B, C):
        store.add_reference(between, tenant=tenant)
    store.set_name("between", between, tenant=B)
    overwrite_whole_entry(store, content_id)
    with pytest.raises(VectorStoreError, match=content_id):
        store.get(content_id)
    assert store.put(at(vector, 200.0), tenant=C) == content_id
    rewritten = store.get(content_id)
    assert torch.equal(rewritten.directions[3], vector.directions[3])
    # Each tenant's listing holds it once, where its `created` (kept or renewed) puts it.
    expected = sorted([(150.0, between), (rewritten.meta.created, content_id)])
    for tenant in (A, B, C):
        listed = walk(store, 1, tenant=tenant)
        assert [(e.meta.created, e.content_id) for e in listed] == expected
        assert store.usage(tenant=tenant) == TenantUsage(2, stored_size(vector) + stored_size(make_vector(9)))
    assert listed_ids(store, A, named_only=True) == [content_id] and listed_ids(store, B, named_only=True) == [between]
    assert store.resolve("a-name", tenant=A) == content_id
    for tenant in (A, B, C):
        store.delete(content_id, tenant=tenant)
        store.delete(between, tenant=tenant)
    assert stored_contents(store) == 0


BAD_TENANTS = ["", "a:b", "x" * 65, "has space", "a/b", "../up", "ümlaut", "nul\0", None, 7, b"bytes"]


@pytest.mark.parametrize("bad_tenant", BAD_TENANTS)
def test_bad_tenants_are_refused_and_change_nothing(store, make_vector, bad_tenant):
    content_id = store.put(make_vector(1))
    store.set_name("kept", content_id)
    calls = [
        lambda: store.put(make_vector(2), tenant=bad_tenant),
        lambda: store.add_reference(content_id, tenant=bad_tenant),
        lambda: store.has(content_id, tenant=bad_tenant),
        lambda: store.delete(content_id, tenant=bad_tenant),
        lambda: store.listing_page(10, tenant=bad_tenant),
        lambda: store.listing_page(10, named_only=True, tenant=bad_tenant),
        lambda: store.listing(tenant=bad_tenant),
        lambda: store.list(tenant=bad_tenant),
        lambda: store.names_of(content_id, tenant=bad_tenant),
        lambda: store.usage(tenant=bad_tenant),
        lambda: store.set_name("other", content_id, tenant=bad_tenant),
        lambda: store.name_target("kept", tenant=bad_tenant),
        lambda: store.resolve("kept", tenant=bad_tenant),
        lambda: store.delete_name("kept", tenant=bad_tenant),
        lambda: store.put_calibration(content_id, {"dose": 1.0}, tenant=bad_tenant),
        lambda: store.calibration(content_id, tenant=bad_tenant),
    ]
    for call in calls:
        with pytest.raises(VectorStoreError, match="bad tenant"):
            call()
    assert store.list() == [(content_id, store.get(content_id).meta, ["kept"])]
    assert stored_contents(store) == 1 and store.usage() == TenantUsage(1, stored_size(make_vector(1)))


def test_tenants_at_the_limits_are_accepted(store, make_vector):
    for tenant in ("x" * 64, "a", "A.b_c-9", "tenant", "v-" + "0" * 40):
        content_id = store.put(make_vector(1), tenant=tenant)
        store.set_name("n", content_id, tenant=tenant)
        assert store.resolve("n", tenant=tenant) == content_id and listed_ids(store, tenant) == [content_id]
    assert store.usage(tenant="x" * 64) == TenantUsage(1, stored_size(make_vector(1)))


# ---------------------------------------------------------------- quotas


def test_store_limits_refuse_a_new_reference_in_the_write_itself(store, make_vector):
    from vector_store.base import QuotaExceeded, StoreLimits

    size = len(codec.encode(make_vector(1)).tensor_bytes)
    two = StoreLimits(vectors=2)
    first = store.put(make_vector(1), tenant="t", limits=two)
    store.put(make_vector(2), tenant="t", limits=two)
    with pytest.raises(QuotaExceeded) as refused:
        store.put(make_vector(3), tenant="t", limits=two)
    assert (refused.value.quota, refused.value.limit) == ("vectors", 2)
    assert not store.has(make_vector(3).content_id, tenant="t") and store.usage(tenant="t").vectors == 2
    assert store.put(make_vector(1), tenant="t", limits=two) == first  # held already: no new reference
    with pytest.raises(QuotaExceeded):
        store.add_reference(store.put(make_vector(3), tenant="other"), tenant="t", limits=two)
    with pytest.raises(QuotaExceeded) as refused:
        store.put(make_vector(4), tenant="u", limits=StoreLimits(bytes=size - 1))
    assert (refused.value.quota, refused.value.limit) == ("bytes", size - 1)
    assert store.usage(tenant="u") == (0, 0)


def test_rate_counters_fill_per_window_and_tenant(store):
    window_s = 2.0
    assert store.charge("t", "tokens", 30, 50, window_s) is None
    wait = store.charge("t", "tokens", 30, 50, window_s)
    assert wait is not None and 0 < wait <= window_s
    assert store.charge("t", "tokens", 20, 50, window_s) is None  # exactly the limit
    assert store.charge("other", "tokens", 50, 50, window_s) is None  # tenants count apart
    time.sleep(wait + 0.05)
    assert store.charge("t", "tokens", 50, 50, window_s) is None  # a new window


def test_slots_are_taken_released_and_expire(store):
    assert store.acquire("t", "flight", "r1", 2, lease_s=60)
    assert store.acquire("t", "flight", "r2", 2, lease_s=60)
    assert not store.acquire("t", "flight", "r3", 2, lease_s=60)
    assert store.acquire("other", "flight", "r3", 2, lease_s=60)
    store.release("t", "flight", "r1")
    assert store.acquire("t", "flight", "r3", 2, lease_s=0.2)
    assert not store.acquire("t", "flight", "r4", 2, lease_s=60)
    time.sleep(0.3)  # r3's process "died": its lease ends
    assert store.acquire("t", "flight", "r4", 2, lease_s=60)
