"""A per-process LRU of stored vectors, so steady traffic never touches the store."""
from __future__ import annotations

import threading
from collections import OrderedDict

from vector_store import StoredVector, VectorStore, open_store


class VectorCache:
    def __init__(self, store: VectorStore | None = None, capacity: int = 512):
        self._store = store
        self._capacity = capacity
        self._entries: OrderedDict[str, StoredVector] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def store(self) -> VectorStore:
        if self._store is None:
            self._store = open_store()
        return self._store

    def get(self, content_id: str) -> StoredVector:
        """The vector with this content id; raises the store's VectorNotFound."""
        with self._lock:
            vector = self._entries.get(content_id)
            if vector is not None:
                self._entries.move_to_end(content_id)
                self.hits += 1
                return vector
        vector = self.store.get(content_id)
        with self._lock:
            self.misses += 1
            self._entries[content_id] = vector
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return vector
