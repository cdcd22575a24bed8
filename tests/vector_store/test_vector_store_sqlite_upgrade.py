"""An SQLite store written by the release before tenants (``data/sqlite_before_tenants``, made
by that release's own code; ``expected.json`` is what it reported at the time) opens with
every vector, name, calibration and cached computation kept, all as the default tenant's."""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from vector_store.base import DEFAULT_TENANT, StoredVector, VectorMeta, VectorNotFound
from vector_store.sqlite import SqliteVectorStore

WRITTEN = Path(__file__).parent / "data" / "sqlite_before_tenants"


@pytest.fixture
def upgraded(tmp_path: Path) -> tuple[SqliteVectorStore, dict]:
    shutil.copytree(WRITTEN / "store", tmp_path / "store")
    return SqliteVectorStore(tmp_path / "store"), json.loads((WRITTEN / "expected.json").read_text())


def test_every_vector_name_and_calibration_is_kept_as_the_default_tenants(upgraded) -> None:
    store, expected = upgraded
    vectors = expected["vectors"]
    listed = store.listing()
    assert sorted(entry.content_id for entry in listed) == sorted(vectors)
    for content_id, want in vectors.items():
        vector = store.get(content_id)
        got = {str(layer): hashlib.sha256(t.numpy().tobytes()).hexdigest() for layer, t in vector.directions.items()}
        assert got == want["sha256"], content_id
        assert store.has(content_id, tenant=DEFAULT_TENANT)
        assert store.names_of(content_id) == want["names"]
        assert store.calibration(content_id) == want["calibration"]
        for name in want["names"]:
            assert store.resolve(name) == content_id
    assert [entry.content_id for entry in store.listing_page(10, named_only=True).entries] == [
        entry.content_id for entry in listed if vectors[entry.content_id]["names"]]
    assert store.usage() == (len(vectors), sum(want["nbytes"] for want in vectors.values()))
    for key, content_id in expected["computations"].items():
        assert store.cached_computation(key) == content_id
    with sqlite3.connect(store.index_path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []


def test_the_upgraded_store_is_one_tenant_among_others(upgraded) -> None:
    store, expected = upgraded
    some_id = next(iter(expected["vectors"]))
    assert not store.has(some_id, tenant="team-b")
    assert store.listing(tenant="team-b") == []
    with pytest.raises(VectorNotFound):
        store.resolve("calm", tenant="team-b")
    # The same content stored by another tenant is shared, and survives the default tenant's delete.
    vector = store.get(some_id)
    assert store.put(vector, tenant="team-b") == some_id
    store.delete(some_id)
    assert torch.equal(store.get(some_id).directions[3], vector.directions[3])
    assert store.names_of(some_id) == [] and store.has(some_id, tenant="team-b")
    # A second open finds the layout current and changes nothing.
    again = SqliteVectorStore(store.data_dir)
    assert again.usage(tenant="team-b").vectors == 1
    assert again.usage().vectors == len(expected["vectors"]) - 1


def test_a_new_store_and_an_upgraded_one_have_the_same_schema(upgraded, tmp_path: Path) -> None:
    store, _ = upgraded
    fresh = SqliteVectorStore(tmp_path / "fresh")
    fresh.put(StoredVector(VectorMeta("m", 4, "constant"), {1: torch.ones(1, 4)}))

    def schema(path: Path) -> set[tuple[str, str]]:
        with sqlite3.connect(path) as connection:
            return {(kind, name) for kind, name in connection.execute(
                "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}

    def columns(path: Path, table: str) -> list[str]:
        with sqlite3.connect(path) as connection:
            return sorted(row[1] for row in connection.execute(f"PRAGMA table_info({table})"))

    assert schema(store.index_path) == schema(fresh.index_path)
    for table in ("vectors", "refs", "names", "computations", "calibrations", "usage"):
        kept = {"name_count"} if table == "vectors" else set()  # the earlier release's, left unused
        assert set(columns(store.index_path, table)) - kept == set(columns(fresh.index_path, table)), table
