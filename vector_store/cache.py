"""One process-wide cache of stored vectors, keyed by content id.

A content id never changes meaning, so a cached vector is valid for as long as it is
kept: the cache is bounded by tensor bytes (least recently used goes first). Vectors that
an in-flight request uses are pinned and never evicted, so what a request was validated
against is what the engine receives, whatever happens to the store meanwhile.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import cachetools

from vector_store.base import StoredVector, VectorStore

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def _tensor_bytes(vector: StoredVector) -> int:
    return sum(t.numel() * t.element_size() for t in vector.directions.values())


class VectorCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self._lru: cachetools.LRUCache[str, StoredVector] = cachetools.LRUCache(max_bytes, getsizeof=_tensor_bytes)
        self._pinned: dict[str, tuple[StoredVector, int]] = {}  # content id -> (vector, pin count)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, content_id: str) -> StoredVector | None:
        with self._lock:
            pinned = self._pinned.get(content_id)
            vector = pinned[0] if pinned is not None else self._lru.get(content_id)
            if vector is None:
                self.misses += 1
            else:
                self.hits += 1
            return vector

    def put(self, content_id: str, vector: StoredVector) -> None:
        with self._lock:
            try:
                self._lru[content_id] = vector
            except ValueError:  # larger than the whole cache: only pins can hold it
                pass

    def load(self, content_id: str, store: VectorStore) -> StoredVector:
        """The cached vector, else the store's (a blocking read; raises the store's errors)."""
        vector = self.get(content_id)
        if vector is None:
            vector = store.get(content_id)
            self.put(content_id, vector)
        return vector

    def pin(self, vectors: dict[str, StoredVector]) -> None:
        with self._lock:
            for content_id, vector in vectors.items():
                held = self._pinned.get(content_id)
                self._pinned[content_id] = (vector, 1 if held is None else held[1] + 1)

    def unpin(self, content_ids: Iterable[str]) -> None:
        with self._lock:
            for content_id in content_ids:
                vector, count = self._pinned[content_id]
                if count == 1:
                    del self._pinned[content_id]
                    try:
                        self._lru[content_id] = vector
                    except ValueError:
                        pass
                else:
                    self._pinned[content_id] = (vector, count - 1)

    @contextmanager
    def pinned_while(self, vectors: dict[str, StoredVector]) -> Iterator[None]:
        """``vectors`` pinned for the ``with`` block."""
        self.pin(vectors)
        try:
            yield
        finally:
            self.unpin(vectors)

    @property
    def pinned(self) -> int:
        return len(self._pinned)


_process_cache: VectorCache | None = None
_process_cache_lock = threading.Lock()


def process_cache() -> VectorCache:
    """The cache every part of this process shares (the HTTP layer and vLLM's input
    processor), so a vector is read from the store, and held in memory, once."""
    global _process_cache
    with _process_cache_lock:
        if _process_cache is None:
            _process_cache = VectorCache()
        return _process_cache
