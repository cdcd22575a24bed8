"""The vector store as an event loop sees it: no call blocks the loop, every call is
bounded by a timeout, and what was read recently keeps working while the store is away.

- Each backend call runs in a small thread pool of its own and is abandoned after
  ``timeout_s`` (the backends' own socket/busy timeouts are set to the same bound, so the
  threads free up too). Connection errors and timeouts become ``StoreUnavailable``;
  damaged entries stay ``StoredDataDamaged``; both are the store's fault, not the caller's.
- Vectors are cached by content id (``vector_store.cache``): immutable, so always valid.
- Names (and content ids' existence) are cached for ``fresh_s`` seconds; after that the
  store is asked again, and if it cannot answer the last answer it gave is used (and
  trusted for another ``fresh_s``), so a steering that worked a moment ago keeps working
  through a store outage, waiting on the store at most once per name and period. Renames and
  deletes made through this process take effect here at once; other replicas see them
  within ``fresh_s``.
- Computation-cache lookups (contrast prompts -> vector) are cached the same way.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import cachetools

from vector_store.base import (
    ListedVector,
    StoredDataDamaged,
    StoredVector,
    StoreUnavailable,
    VectorMeta,
    VectorNotFound,
    VectorStore,
    VectorStoreError,
)
from vector_store.cache import VectorCache, process_cache

logger = logging.getLogger("vllm.steer_server")

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_FRESH_S = 5.0
_MAX_NAMES = 8192


class AsyncStore:
    def __init__(
        self,
        store: VectorStore,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fresh_s: float = DEFAULT_FRESH_S,
        vectors: VectorCache | None = None,
    ):
        self.store = store
        self.timeout_s = timeout_s
        self.vectors = vectors or process_cache()
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="steer-store")
        self._fresh: cachetools.TTLCache[str, str] = cachetools.TTLCache(_MAX_NAMES, ttl=fresh_s)
        self._last_known: cachetools.LRUCache[str, str] = cachetools.LRUCache(_MAX_NAMES)
        self._computations: cachetools.LRUCache[str, str] = cachetools.LRUCache(_MAX_NAMES)

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
        except (VectorNotFound, VectorStoreError):
            raise
        except Exception as exc:  # redis.RedisError, sqlite3.Error, OSError: the store is not answering
            raise StoreUnavailable(f"the vector store {self.store!r} is unavailable: {exc}") from None

    # -- names and ids
    async def resolve(self, name_or_id: str) -> str:
        """A name or a content id -> content id (VectorNotFound if neither)."""
        content_id = self._fresh.get(name_or_id)
        if content_id is not None:
            return content_id
        try:
            content_id = await self._call(self.store.resolve, name_or_id)
        except VectorNotFound:
            self._last_known.pop(name_or_id, None)
            raise
        except StoreUnavailable:
            known = self._last_known.get(name_or_id)
            if known is None:
                raise
            logger.warning("vector store unavailable; %r resolves to %s as last seen", name_or_id, known)
            self._fresh[name_or_id] = known  # trusted again for a while: don't wait on the store per request
            return known
        self._fresh[name_or_id] = self._last_known[name_or_id] = content_id
        return content_id

    def forget(self, *names_or_ids: str) -> None:
        """Drop cached answers after a rename or delete through this process."""
        for key in names_or_ids:
            self._fresh.pop(key, None)
            self._last_known.pop(key, None)

    async def name_target(self, name: str) -> str | None:
        return await self._call(self.store.name_target, name)

    async def set_name(self, name: str, content_id: str) -> None:
        await self._call(self.store.set_name, name, content_id)
        self.forget(name)

    async def delete_name(self, name: str) -> None:
        await self._call(self.store.delete_name, name)
        self.forget(name)

    # -- vectors
    async def get(self, content_id: str) -> StoredVector:
        vector = self.vectors.get(content_id)
        if vector is None:
            vector = await self._call(self.store.get, content_id)
            self.vectors.put(content_id, vector)
        return vector

    async def put(self, vector: StoredVector) -> str:
        content_id = await self._call(self.store.put, vector)
        self.vectors.put(content_id, vector)
        return content_id

    async def delete(self, content_id: str) -> None:
        await self._call(self.store.delete, content_id)
        self.forget(content_id)
        self._computations = cachetools.LRUCache(_MAX_NAMES)  # some may have pointed at it

    async def list(self) -> list[tuple[str, VectorMeta, list[str]]]:
        return await self._call(self.store.list)

    async def listing(self) -> list[ListedVector]:
        return await self._call(self.store.listing)

    # -- computations
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
