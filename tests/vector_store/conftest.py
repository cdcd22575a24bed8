"""One `store` fixture, parametrized over both backends, each test in a fresh namespace."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

from vector_store.base import StoredVector, VectorMeta, VectorStore
from vector_store.redis import RedisVectorStore
from vector_store.sqlite import SqliteVectorStore

HIDDEN = 16


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[VectorStore]:
    if request.param == "sqlite":
        yield SqliteVectorStore(tmp_path / "vectors")
    else:
        url = request.getfixturevalue("redis_server")
        yield RedisVectorStore(url, prefix=f"test-{uuid.uuid4().hex}:")


def _make_vector(seed: int = 0, *, kind: str = "constant", k: int = 1, layers=(3, 5), **meta) -> StoredVector:
    """A random vector: float32 [k, HIDDEN] per layer."""
    generator = torch.Generator().manual_seed(seed)
    return StoredVector(
        meta=VectorMeta(
            model_fingerprint=meta.pop("model_fingerprint", "TinyForCausalLM-h16-l6-0123456789abcdef"),
            hidden_size=HIDDEN,
            kind=kind,
            method=meta.pop("method", "mean_diff"),
            source=meta.pop("source", {"prompts": ["Love", "Hate"], "coeffs": [1.0, -1.0]}),
            **meta,
        ),
        directions={layer: torch.randn(k, HIDDEN, generator=generator) for layer in layers},
    )


@pytest.fixture
def make_vector():
    return _make_vector
