"""Steering vectors: content-addressed, cached, shared across replicas."""
from vector_store.base import (
    QuotaExceeded,
    StoreLimits,
    StoreUnavailable,
    StoredDataDamaged,
    StoredVector,
    VectorMeta,
    VectorNotFound,
    VectorStore,
    VectorStoreError,
    content_id_of,
    layer_outside,
)
from vector_store.open import open_store

__all__ = [
    "QuotaExceeded",
    "StoreLimits",
    "StoreUnavailable",
    "StoredDataDamaged",
    "StoredVector",
    "VectorMeta",
    "VectorNotFound",
    "VectorStore",
    "VectorStoreError",
    "content_id_of",
    "layer_outside",
    "open_store",
]
