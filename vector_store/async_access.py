"""The vector store as an event loop sees it: no call blocks the loop, every call is
bounded by a timeout, and what was read recently keeps working while the store is away.

- Each backend call runs in a small thread pool of its own and is abandoned after
  ``timeout_s`` (the backends' own socket/busy timeouts are set to the same bound, so the
  threads free up too). Connection errors and timeouts become ``StoreUnavailable``;
  damaged entries stay ``StoredDataDamaged``; both are the store's fault, not the caller's.
- Vectors are cached by content id (``vector_store.cache``): immutable, so always valid.
- Names (and content ids' existence) are cached for ``fresh_s`` seconds. A name used again
  after that, but within ``stale_s`` of the store's last answer, resolves to that answer at
  once while the store is asked in the background (stale-while-revalidate), so a steered
  request never waits on a store round trip for a name this process knows; only a name
  unused for longer than ``stale_s`` (or never seen) is asked for before the request goes on.
  If the store cannot answer, the last answer it gave is used (and trusted for another
  ``fresh_s``), so a steering that worked a moment ago keeps working through a store outage,
  waiting on the store at most once per name and period. Renames and deletes made through
  this process take effect here at once; made on other replicas, they show within
  ``fresh_s`` for a name in steady use, and otherwise from the second use after ``fresh_s``.
- Computation-cache lookups (contrast prompts -> vector) are cached the same way.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import cachetools

from vector_store.base import (
    ListingPage,
    QuotaExceeded,
    StoreLimits,
    StoredDataDamaged,
    StoredVector,
    StoreUnavailable,
    TenantUsage,
    VectorNotFound,
    VectorStore,
    VectorStoreError,
)
from vector_store.cache import VectorCache, process_cache

logger = logging.getLogger("vllm.steer_server")

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_FRESH_S = 5.0
DEFAULT_STALE_S = 60.0
_MAX_NAMES = 8192


class AsyncStore:
    def __init__(
        self,
        store: VectorStore,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fresh_s: float = DEFAULT_FRESH_S,
        stale_s: float = DEFAULT_STALE_S,
        vectors: VectorCache | None = None,
        limits_of: Callable[[str], StoreLimits | None] = lambda tenant: None,
    ):
        self.store = store
        self.limits_of = limits_of  # a tenant's storage quotas, applied to every put and reference
        self.timeout_s = timeout_s
        self.vectors = vectors or process_cache()
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="steer-store")
        # (tenant, name or id) -> content id
        self._fresh: cachetools.TTLCache[tuple[str, str], str] = cachetools.TTLCache(_MAX_NAMES, ttl=fresh_s)
        self.stale_s = max(stale_s, fresh_s)
        # (tenant, name or id) -> (content id, monotonic time the store said so)
        self._last_known: cachetools.LRUCache[tuple[str, str], tuple[str, float]] = cachetools.LRUCache(_MAX_NAMES)
        self._refreshing: dict[tuple[str, str], asyncio.Task] = {}  # names being asked for in the background
        self._generation = 0  # bumped by forget(): an answer asked for before it is not cached
        self._computations: cachetools.LRUCache[str, str] = cachetools.LRUCache(_MAX_NAMES)
        # (tenant, content id) -> its calibration (None: not calibrated), trusted like a name for fresh_s
        self._calibrations: cachetools.TTLCache[tuple[str, str], dict | None] = cachetools.TTLCache(_MAX_NAMES, ttl=fresh_s)

    def __repr__(self) -> str:
        return repr(self.store)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise StoreUnavailable(f"the vector store {self.store!r} is unavailable: no answer within {self.timeout_s:g} s") from None
        except StoredDataDamaged as exc:
            raise StoredDataDamaged(f"the vector store {self.store!r} holds damaged data: {exc}") from None
        except (VectorNotFound, VectorStoreError, QuotaExceeded):
            raise
        except Exception as exc:  # redis.RedisError, sqlite3.Error, OSError: the store is not answering
            raise StoreUnavailable(f"the vector store {self.store!r} is unavailable: {exc}") from None

    # -- names and ids (each tenant's own: every cache below is keyed by tenant)
    async def resolve(self, name_or_id: str, *, tenant: str) -> str:
        """The tenant's name or a content id it references -> content id (VectorNotFound if neither)."""
        key = (tenant, name_or_id)
        content_id = self._fresh.get(key)
        if content_id is not None:
            return content_id
        known = self._last_known.get(key)
        if known is not None and time.monotonic() - known[1] <= self.stale_s:
            if key not in self._refreshing:
                self._refreshing[key] = asyncio.get_running_loop().create_task(self._refresh(key))
            return known[0]
        return await self._ask(key)

    async def _refresh(self, key: tuple[str, str]) -> None:
        try:
            await self._ask(key)
        except (VectorNotFound, VectorStoreError, StoreUnavailable) as exc:  # gone, damaged or unreachable
            logger.warning("vector store: re-checking %r of tenant %r failed: %s", key[1], key[0], exc)
        finally:
            self._refreshing.pop(key, None)

    async def _ask(self, key: tuple[str, str]) -> str:
        tenant, name_or_id = key
        generation = self._generation
        try:
            content_id = await self._call(functools.partial(self.store.resolve, name_or_id, tenant=tenant))
        except VectorNotFound:
            self._last_known.pop(key, None)
            raise
        except StoreUnavailable:
            known = self._last_known.get(key)
            if known is None:
                raise
            logger.warning("vector store unavailable; %r resolves to %s as last seen", name_or_id, known[0])
            self._fresh[key] = known[0]  # trusted again for a while: don't wait on the store per request
            return known[0]
        if generation == self._generation:
            self._fresh[key] = content_id
            self._last_known[key] = (content_id, time.monotonic())
        return content_id

    def forget(self, tenant: str, *names_or_ids: str) -> None:
        """Drop the tenant's cached answers after a rename or delete through this process."""
        self._generation += 1
        for name_or_id in names_or_ids:
            self._fresh.pop((tenant, name_or_id), None)
            self._last_known.pop((tenant, name_or_id), None)

    async def name_target(self, name: str, *, tenant: str) -> str | None:
        return await self._call(functools.partial(self.store.name_target, name, tenant=tenant))

    async def set_name(self, name: str, content_id: str, *, tenant: str) -> None:
        await self._call(functools.partial(self.store.set_name, name, content_id, tenant=tenant))
        self.forget(tenant, name)

    async def delete_name(self, name: str, *, tenant: str) -> None:
        await self._call(functools.partial(self.store.delete_name, name, tenant=tenant))
        self.forget(tenant, name)

    # -- vectors
    async def get(self, content_id: str) -> StoredVector:
        """By content id, for any tenant: callers resolve through the request's tenant first."""
        vector = self.vectors.get(content_id)
        if vector is None:
            vector = await self._call(self.store.get, content_id)
            self.vectors.put(content_id, vector)
        return vector

    async def put(self, vector: StoredVector, *, tenant: str) -> str:
        content_id = await self._call(functools.partial(self.store.put, vector, tenant=tenant,
                                                        limits=self.limits_of(tenant)))
        self.vectors.put(content_id, vector)
        return content_id

    async def add_reference(self, content_id: str, *, tenant: str) -> None:
        await self._call(functools.partial(self.store.add_reference, content_id, tenant=tenant,
                                           limits=self.limits_of(tenant)))

    async def delete(self, content_id: str, *, tenant: str) -> None:
        await self._call(functools.partial(self.store.delete, content_id, tenant=tenant))
        self.forget(tenant, content_id)
        self._calibrations.pop((tenant, content_id), None)
        self._computations = cachetools.LRUCache(_MAX_NAMES)  # some may have pointed at it

    async def listing_page(self, limit: int, after: str | None = None, named_only: bool = False, *,
                           tenant: str) -> ListingPage:
        """One page of the tenant's listing (``VectorStore.listing_page``); never cached: a
        listing shows what the store holds now."""
        return await self._call(functools.partial(self.store.listing_page, limit, after, named_only, tenant=tenant))

    async def names_of(self, content_id: str, *, tenant: str) -> list[str]:
        return await self._call(functools.partial(self.store.names_of, content_id, tenant=tenant))

    async def usage(self, *, tenant: str) -> TenantUsage:
        return await self._call(functools.partial(self.store.usage, tenant=tenant))

    # -- calibrations
    async def calibration(self, content_id: str, *, tenant: str) -> dict | None:
        """The tenant's calibrated default of the vector; one made on another replica shows
        within ``fresh_s`` (as a rename does)."""
        key = (tenant, content_id)
        if key in self._calibrations:
            return self._calibrations[key]
        calibration = await self._call(functools.partial(self.store.calibration, content_id, tenant=tenant))
        self._calibrations[key] = calibration
        return calibration

    async def put_calibration(self, content_id: str, calibration: dict, *, tenant: str) -> dict:
        stored = await self._call(functools.partial(self.store.put_calibration, content_id, calibration,
                                                    tenant=tenant))
        self._calibrations[(tenant, content_id)] = stored
        return stored

    # -- computations (shared by every tenant: a key hashes all of a computation's inputs)
    async def cached_computation(self, key: str) -> str | None:
        content_id = self._computations.get(key)
        if content_id is None:
            content_id = await self._call(self.store.cached_computation, key)
            if content_id is not None:
                self._computations[key] = content_id
        return content_id

    async def remember_computation(self, key: str, content_id: str) -> None:
        await self._call(self.store.remember_computation, key, content_id)
        self._computations[key] = content_id

    # -- quota counters (``VectorStore.charge``, ``acquire``, ``release``)
    async def charge(self, tenant: str, quota: str, amount: int, limit: int, window_s: float) -> float | None:
        return await self._call(self.store.charge, tenant, quota, amount, limit, window_s)

    async def acquire(self, tenant: str, quota: str, token: str, limit: int, lease_s: float) -> bool:
        return await self._call(self.store.acquire, tenant, quota, token, limit, lease_s)

    async def release(self, tenant: str, quota: str, token: str) -> None:
        await self._call(self.store.release, tenant, quota, token)
