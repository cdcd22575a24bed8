"""The store as the API process sees it: every call bounded by a timeout, recently seen
names and vectors still answered while a real redis-server is paused, damaged entries
named, and the process cache never evicting what an in-flight request pinned."""
from __future__ import annotations

import asyncio
import signal
import time

import pytest
import torch

from redis_fixture import RedisProcess, needs_redis_server
from vector_store import StoredDataDamaged, StoredVector, StoreUnavailable, VectorMeta, VectorNotFound
from vector_store.async_access import AsyncStore
from vector_store.cache import VectorCache
from vector_store.redis import RedisVectorStore

TIMEOUT_S = 0.5
TENANT = "team-a"  # not the default tenant: every cache must be the tenant's


def vector(seed: int, rows: int = 1, hidden: int = 16) -> StoredVector:
    gen = torch.Generator().manual_seed(seed)
    return StoredVector(VectorMeta("model-x", hidden, "constant" if rows == 1 else "actadd"),
                        {3: torch.randn(rows, hidden, generator=gen)})


@pytest.fixture
def paused_store(tmp_path):
    needs_redis_server()
    server = RedisProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_paused_store_fails_fast_and_known_answers_keep_working(paused_store):
    backend = RedisVectorStore(paused_store.url, timeout_s=TIMEOUT_S)
    store = AsyncStore(backend, timeout_s=TIMEOUT_S, fresh_s=0.2, vectors=VectorCache())
    used, unseen = vector(1), vector(2)

    async def scenario():
        used_id = await store.put(used, tenant=TENANT)
        await store.set_name("used", used_id, tenant=TENANT)
        unseen_id = backend.put(unseen, tenant=TENANT)  # written by someone else: never seen here
        backend.set_name("unseen", unseen_id, tenant=TENANT)
        assert await store.resolve("used", tenant=TENANT) == used_id
        paused_store.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)  # past fresh_s: the name must be asked for again
            started = time.monotonic()
            assert await store.resolve("used", tenant=TENANT) == used_id  # the last answer, while the store is away
            assert (await store.get(used_id)).content_id == used_id  # held by content id
            for call in (lambda: store.resolve("unseen", tenant=TENANT), lambda: store.get(unseen_id)):
                with pytest.raises(StoreUnavailable, match=rf"{paused_store.url}.* is unavailable: "):
                    await call()
            assert time.monotonic() - started < 3 * TIMEOUT_S + 1
        finally:
            paused_store.signal(signal.SIGCONT)
        assert await store.resolve("unseen", tenant=TENANT) == unseen_id
        paused_store.kill()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await store.listing_page(10, tenant=TENANT)

    asyncio.run(scenario())


def test_deletes_through_this_process_apply_at_once_and_damage_is_named(tmp_path):
    from vector_store.sqlite import SqliteVectorStore

    backend = SqliteVectorStore(tmp_path / "store")
    store = AsyncStore(backend, timeout_s=TIMEOUT_S, fresh_s=60, vectors=VectorCache())

    async def scenario():
        kept = await store.put(vector(3), tenant=TENANT)
        await store.set_name("kept", kept, tenant=TENANT)
        assert await store.resolve("kept", tenant=TENANT) == kept
        await store.delete_name("kept", tenant=TENANT)
        with pytest.raises(VectorNotFound):
            await store.resolve("kept", tenant=TENANT)  # not the cached answer: this process made the change
        damaged = backend.put(vector(4), tenant=TENANT)
        (tmp_path / "store" / "blobs" / f"{damaged}.safetensors").write_bytes(b"\0" * 64)
        with pytest.raises(StoredDataDamaged, match=rf"SqliteVectorStore.*{damaged}"):
            await store.get(damaged)

    asyncio.run(scenario())


def test_a_known_name_resolves_without_waiting_and_changes_elsewhere_show_at_the_next_use(tmp_path):
    """Stale-while-revalidate: past fresh_s a known name answers what the store last said (the
    store is asked in the background), so a rename by another replica shows from the next use;
    past stale_s the store is asked first; a delete elsewhere fails the use after the re-check."""
    from vector_store.sqlite import SqliteVectorStore

    backend = SqliteVectorStore(tmp_path / "store")  # written directly = by another replica
    store = AsyncStore(backend, timeout_s=TIMEOUT_S, fresh_s=0.1, stale_s=1.0, vectors=VectorCache())
    first, second = backend.put(vector(6), tenant=TENANT), backend.put(vector(7), tenant=TENANT)

    async def scenario():
        backend.set_name("n", first, tenant=TENANT)
        assert await store.resolve("n", tenant=TENANT) == first
        backend.set_name("n", second, tenant=TENANT)
        await asyncio.sleep(0.15)  # past fresh_s, within stale_s
        assert await store.resolve("n", tenant=TENANT) == first  # answered without asking the store first
        await store._refreshing[(TENANT, "n")]  # the re-check that answer started
        assert await store.resolve("n", tenant=TENANT) == second
        backend.set_name("n", first, tenant=TENANT)
        await asyncio.sleep(1.1)  # past stale_s: the store is asked before answering
        assert await store.resolve("n", tenant=TENANT) == first
        backend.delete_name("n", tenant=TENANT)
        await asyncio.sleep(0.15)
        assert await store.resolve("n", tenant=TENANT) == first  # the last use of the old answer
        await store._refreshing[(TENANT, "n")]
        with pytest.raises(VectorNotFound):
            await store.resolve("n", tenant=TENANT)

    asyncio.run(scenario())


def test_pinned_vectors_survive_eviction_and_the_cache_stays_bounded():
    one = vector(5, rows=64, hidden=256)  # 64 KiB of float32
    cache = VectorCache(max_bytes=100 * 1024)
    cache.pin({one.content_id: one})
    others = [vector(10 + i, rows=64, hidden=256) for i in range(4)]
    for v in others:
        cache.put(v.content_id, v)
    assert cache.get(one.content_id) is one
    assert sum(cache.get(v.content_id) is not None for v in others) == 1  # only one more fits
    cache.unpin([one.content_id])
    cache.put(others[0].content_id, others[0])
    cache.put(others[1].content_id, others[1])
    assert cache.get(one.content_id) is None and cache.pinned == 0


def test_a_vector_pinned_while_a_block_runs_is_unpinned_after_it_even_when_it_fails():
    one = vector(6, rows=64, hidden=256)
    cache = VectorCache(max_bytes=100 * 1024)
    with pytest.raises(RuntimeError, match="probe failed"):
        with cache.pinned_while({one.content_id: one}):
            assert cache.pinned == 1
            for i in range(3):  # 192 KiB put through a 100 KiB cache: the pinned one stays
                cache.put(str(i), vector(20 + i, rows=64, hidden=256))
            assert cache.get(one.content_id) is one
            raise RuntimeError("probe failed")
    assert cache.pinned == 0


def test_one_tenants_cached_answers_are_not_anothers(tmp_path):
    from vector_store.sqlite import SqliteVectorStore

    store = AsyncStore(SqliteVectorStore(tmp_path / "store"), fresh_s=60, vectors=VectorCache())

    async def scenario():
        mine = await store.put(vector(8), tenant=TENANT)
        await store.set_name("shared-name", mine, tenant=TENANT)
        await store.put_calibration(mine, {"layer": 3, "dose": 0.5}, tenant=TENANT)
        assert await store.resolve("shared-name", tenant=TENANT) == mine  # now cached for TENANT
        assert await store.calibration(mine, tenant=TENANT) == {"layer": 3, "dose": 0.5, "version": 1}
        for ask in (lambda: store.resolve("shared-name", tenant="team-b"), lambda: store.resolve(mine, tenant="team-b")):
            with pytest.raises(VectorNotFound):
                await ask()
        assert await store.calibration(mine, tenant="team-b") is None
        theirs = await store.put(vector(9), tenant="team-b")
        await store.set_name("shared-name", theirs, tenant="team-b")
        assert await store.resolve("shared-name", tenant="team-b") == theirs
        assert await store.resolve("shared-name", tenant=TENANT) == mine

    asyncio.run(scenario())
