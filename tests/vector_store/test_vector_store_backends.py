"""One suite, run against both backends (the `store` fixture): what a VectorStore promises."""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import redis
import torch

from vector_store import codec
from vector_store.base import StoredVector, VectorNotFound, VectorStore, VectorStoreError
from vector_store.keys import computation_key
from vector_store.open import open_store
from vector_store.redis import RedisVectorStore
from vector_store.sqlite import SqliteVectorStore


def assert_same_vector(stored: StoredVector, original: StoredVector) -> None:
    assert dataclasses.replace(stored.meta, created=0.0) == dataclasses.replace(original.meta, created=0.0)
    assert stored.layers == original.layers
    for layer in original.layers:
        assert stored.directions[layer].dtype == torch.float32
        assert torch.equal(stored.directions[layer], original.directions[layer])


# --- what each backend keeps where: used to damage entries the way a disk or an operator could


def stored_tensor_bytes(store: VectorStore, content_id: str) -> bytes:
    if isinstance(store, SqliteVectorStore):
        return (store.blob_dir / f"{content_id}.safetensors").read_bytes()
    return redis.Redis.from_url(store.url).hget(f"{store.prefix}vector:{content_id}", "tensors")


def overwrite_tensor_bytes(store: VectorStore, content_id: str, data: bytes, *, fix_checksum: bool = False) -> None:
    """Replace a vector's stored tensor bytes; with fix_checksum also its recorded sha256,
    so that only the content-id check can notice."""
    sha256 = hashlib.sha256(data).hexdigest()
    if isinstance(store, SqliteVectorStore):
        (store.blob_dir / f"{content_id}.safetensors").write_bytes(data)
        if fix_checksum:
            with sqlite3.connect(store.index_path) as connection:
                connection.execute("UPDATE vectors SET blob_sha256 = ? WHERE content_id = ?", (sha256, content_id))
    else:
        client = redis.Redis.from_url(store.url)
        key = f"{store.prefix}vector:{content_id}"
        client.hset(key, "tensors", data)
        if fix_checksum:
            client.hset(key, "sha256", sha256)


def overwrite_whole_entry(store: VectorStore, content_id: str) -> None:
    if isinstance(store, SqliteVectorStore):
        (store.blob_dir / f"{content_id}.safetensors").write_bytes(b"not a safetensors file")
    else:
        redis.Redis.from_url(store.url).set(f"{store.prefix}vector:{content_id}", b"overwritten")


# --- round trip and content addressing


def test_put_get_round_trip_is_exact(store, make_vector):
    vector = make_vector(1, kind="actadd", k=4, layers=(0, 2, 6))
    content_id = store.put(vector)
    assert content_id == vector.content_id
    assert codec.is_content_id(content_id)
    stored = store.get(content_id)
    assert_same_vector(stored, vector)
    assert stored.meta.created > 0  # stamped at put
    assert stored.content_id == content_id


def test_put_is_idempotent_and_keeps_the_first_created(store, make_vector):
    first = store.put(make_vector(1))
    created = store.get(first).meta.created
    assert store.put(make_vector(1)) == first
    assert store.put(make_vector(1, created=12345.0)) == first  # created is not content
    assert [content_id for content_id, _, _ in store.list()] == [first]
    assert store.get(first).meta.created == created


def test_content_id_changes_with_content_and_with_meta(store, make_vector):
    base = make_vector(1)
    changed_value = StoredVector(base.meta, {**base.directions, 3: base.directions[3].clone()})
    changed_value.directions[3][0, 0] += 1e-3
    variants = [
        base,
        changed_value,
        StoredVector(base.meta, {4: base.directions[3], 5: base.directions[5]}),  # same tensors, other layer
        make_vector(1, method="last_token_diff"),
        make_vector(1, source={"prompts": ["Love", "Hate"], "coeffs": [2.0, -2.0]}),
        make_vector(1, model_fingerprint="OtherForCausalLM-h16-l6-fedcba9876543210"),
    ]
    ids = [store.put(vector) for vector in variants]
    assert len(set(ids)) == len(variants)
    for content_id, vector in zip(ids, variants):
        assert_same_vector(store.get(content_id), vector)


def test_stats_are_kept_and_listed_but_do_not_make_the_id(store, make_vector):
    """Per-layer stats describe the tensors; the id stays the one the vector had without them
    (so vectors stored before stats existed keep theirs), and both backends give them back."""
    plain = make_vector(1)
    stats = {"3": {"norm": 2.5, "separation": 0.75, "explained_variance": 0.4}, "5": {"norm": 1.0, "separation": 1.0}}
    measured = StoredVector(dataclasses.replace(plain.meta, stats=stats), plain.directions)
    assert measured.content_id == plain.content_id
    content_id = store.put(measured)
    assert store.get(content_id).meta.stats == stats
    assert [entry.meta.stats for entry in store.listing()] == [stats]
    with pytest.raises(VectorStoreError, match="meta.stats is not plain JSON"):
        store.put(StoredVector(dataclasses.replace(plain.meta, stats={"3": {"norm": float("nan")}}), plain.directions))


def test_float16_input_is_stored_as_float32(store, make_vector):
    vector = make_vector(2)
    half = StoredVector(vector.meta, {layer: tensor.half() for layer, tensor in vector.directions.items()})
    stored = store.get(store.put(half))
    for layer in vector.layers:
        assert stored.directions[layer].dtype == torch.float32
        assert torch.equal(stored.directions[layer], half.directions[layer].float())


# --- names


def test_repointing_a_name_keeps_the_old_vector(store, make_vector):
    old_id = store.put(make_vector(1))
    store.set_name("happy", old_id)
    assert store.name_target("happy") == old_id
    assert store.resolve("happy") == old_id

    new_id = store.put(make_vector(2))
    store.set_name("happy", new_id)
    assert new_id != old_id
    assert store.resolve("happy") == new_id
    assert_same_vector(store.get(old_id), make_vector(1))
    assert store.resolve(old_id) == old_id


def test_list_shows_every_vector_with_its_names(store, make_vector):
    a, b, c = (store.put(make_vector(seed)) for seed in (1, 2, 3))
    store.set_name("beta", b)
    store.set_name("alpha", b)
    store.set_name("gamma", c)
    listed = {content_id: (meta, names) for content_id, meta, names in store.list()}
    assert set(listed) == {a, b, c}
    assert listed[a][1] == []
    assert listed[b][1] == ["alpha", "beta"]
    assert listed[c][1] == ["gamma"]
    assert dataclasses.replace(listed[b][0], created=0.0) == make_vector(2).meta


def test_listing_carries_shapes_without_reading_tensors(store, make_vector):
    actadd = store.put(make_vector(1, kind="actadd", k=4, layers=(0, 6)))
    constant = store.put(make_vector(2, layers=(3,)))
    store.set_name("seq", actadd)
    # Tensor bytes no listing could decode: the listing still answers, from what is stored beside them.
    overwrite_tensor_bytes(store, actadd, b"not a safetensors file")
    listed = {entry.content_id: entry for entry in store.listing()}
    assert listed[actadd].shapes == {0: [4, 16], 6: [4, 16]} and listed[actadd].names == ["seq"]
    assert listed[constant].shapes == {3: [1, 16]}
    assert listed[constant].meta.kind == "constant"
    assert store.list() == [(e.content_id, e.meta, e.names) for e in store.listing()]


def forget_stored_shapes(store: VectorStore, content_id: str) -> None:
    """Make an entry look as one written before shapes were stored."""
    if isinstance(store, SqliteVectorStore):
        with sqlite3.connect(store.index_path) as connection:
            connection.execute("UPDATE vectors SET shapes = NULL WHERE content_id = ?", (content_id,))
    else:
        redis.Redis.from_url(store.url).hdel(f"{store.prefix}vector:{content_id}", "shapes")


def test_entries_stored_without_shapes_list_as_unknown_shapes_and_still_read(store, make_vector):
    old = store.put(make_vector(1, layers=(2,)))
    forget_stored_shapes(store, old)
    [entry] = store.listing()
    assert entry.content_id == old and entry.shapes is None
    assert_same_vector(store.get(old), make_vector(1, layers=(2,)))


def test_sqlite_index_from_before_shapes_gains_the_column(tmp_path, make_vector):
    """An index.sqlite3 whose vectors table has no shapes column (as releases before it wrote
    them): the store written by the release before tenants, with that column taken out."""
    old_dir = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "data" / "sqlite_before_tenants" / "store", old_dir)
    with sqlite3.connect(old_dir / "index.sqlite3") as connection:
        connection.execute("ALTER TABLE vectors DROP COLUMN shapes")
    reopened = SqliteVectorStore(old_dir)
    entries = reopened.listing()
    assert len(entries) == 4 and all(entry.shapes is None for entry in entries)
    assert all(reopened.get(entry.content_id).layers for entry in entries)
    added = reopened.put(make_vector(2))
    assert {e.content_id: e.shapes for e in reopened.listing()}[added] == {3: [1, 16], 5: [1, 16]}


def test_delete_removes_the_vector_its_names_and_computations(store, make_vector):
    doomed, kept = store.put(make_vector(1)), store.put(make_vector(2))
    store.set_name("doomed", doomed)
    store.set_name("doomed-too", doomed)
    store.set_name("kept", kept)
    store.remember_computation("key-doomed", doomed)
    store.remember_computation("key-kept", kept)

    store.delete(doomed)

    with pytest.raises(VectorNotFound, match=doomed):
        store.get(doomed)
    assert store.name_target("doomed") is None
    assert store.name_target("doomed-too") is None
    assert store.cached_computation("key-doomed") is None
    assert [content_id for content_id, _, _ in store.list()] == [kept]
    assert store.name_target("kept") == kept
    assert store.cached_computation("key-kept") == kept
    assert_same_vector(store.get(kept), make_vector(2))
    with pytest.raises(VectorNotFound):
        store.delete(doomed)
    # Deleted content can be stored again, under the same id.
    assert store.put(make_vector(1)) == doomed


def test_delete_name(store, make_vector):
    content_id = store.put(make_vector(1))
    store.set_name("temporary", content_id)
    store.delete_name("temporary")
    assert store.name_target("temporary") is None
    assert_same_vector(store.get(content_id), make_vector(1))
    with pytest.raises(VectorNotFound, match="temporary"):
        store.delete_name("temporary")


@pytest.mark.parametrize(
    "bad_name", ["", "x" * 129, "v-reserved", "v-" + "0" * 40, "has space", "a/b", "ümlaut", "semi;colon", None, 7]
)
def test_bad_names_are_rejected_and_change_nothing(store, make_vector, bad_name):
    content_id = store.put(make_vector(1))
    store.set_name("good", content_id)
    with pytest.raises(VectorStoreError, match="bad vector name"):
        store.set_name(bad_name, content_id)
    assert store.list()[0][2] == ["good"]


def test_names_at_the_limits_are_accepted(store, make_vector):
    content_id = store.put(make_vector(1))
    for name in ("x" * 128, "a", "My.Vector_2-final", "v", "v_-"):
        store.set_name(name, content_id)
        assert store.resolve(name) == content_id


def test_unknown_ids_and_names_raise_vector_not_found(store, make_vector):
    content_id = store.put(make_vector(1))
    unknown_id = "v-" + "0" * 40
    for call in (
        lambda: store.get(unknown_id),
        lambda: store.get("not-an-id"),
        lambda: store.delete(unknown_id),
        lambda: store.set_name("name", unknown_id),
        lambda: store.remember_computation("key", unknown_id),
        lambda: store.delete_name("nobody"),
        lambda: store.resolve("nobody"),
        lambda: store.resolve(unknown_id),
    ):
        with pytest.raises(VectorNotFound):
            call()
    assert store.name_target("nobody") is None
    assert store.name_target("name") is None  # the failed set_name left nothing
    assert store.cached_computation("key") is None
    assert [entry[0] for entry in store.list()] == [content_id]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v: StoredVector(v.meta, {3: torch.zeros(1, 8)}), "hidden size 8"),
        (lambda v: StoredVector(v.meta, {3: torch.zeros(2, 16)}), "constant vector has k = 1"),
        (lambda v: StoredVector(v.meta, {3: torch.zeros(16)}), r"expected a tensor \[k, hidden\]"),
        (lambda v: StoredVector(v.meta, {3: torch.full((1, 16), float("nan"))}), "NaN"),
        (lambda v: StoredVector(v.meta, {}), "no directions"),
        (lambda v: StoredVector(v.meta, {-1: v.directions[3]}), "non-negative"),
        (lambda v: StoredVector(dataclasses.replace(v.meta, kind="other"), v.directions), "meta.kind"),
        (lambda v: StoredVector(dataclasses.replace(v.meta, source={"x": object()}), v.directions), "plain JSON"),
        (
            lambda v: StoredVector(
                dataclasses.replace(v.meta, kind="actadd"), {3: torch.zeros(2, 16), 4: torch.zeros(3, 16)}
            ),
            "other layers have k = 2",
        ),
    ],
)
def test_bad_vectors_are_rejected_and_store_nothing(store, make_vector, change, message):
    kept = store.put(make_vector(9))
    with pytest.raises(VectorStoreError, match=message):
        store.put(change(make_vector(1)))
    assert [entry[0] for entry in store.list()] == [kept]


# --- computations


def test_computation_cache(store, make_vector):
    content_id = store.put(make_vector(1))
    key = computation_key("fp", 3, [[1, 2, 3], [1, 4]], [1.0, -1.0], "actadd", None)
    assert store.cached_computation(key) is None
    store.remember_computation(key, content_id)
    assert store.cached_computation(key) == content_id
    other = store.put(make_vector(2))
    store.remember_computation(key, other)  # recomputed: the newer result wins
    assert store.cached_computation(key) == other
    with pytest.raises(VectorStoreError, match="computation key"):
        store.remember_computation("", content_id)


# --- integrity


def test_a_flipped_byte_is_detected_and_nothing_else_is_lost(store, make_vector):
    damaged, intact = store.put(make_vector(1)), store.put(make_vector(2))
    store.set_name("damaged", damaged)
    store.set_name("intact", intact)
    data = bytearray(stored_tensor_bytes(store, damaged))
    data[-1] ^= 0x40  # inside the last float
    overwrite_tensor_bytes(store, damaged, bytes(data))

    with pytest.raises(VectorStoreError, match=f"{damaged} are corrupted"):
        store.get(damaged)
    assert_same_vector(store.get(intact), make_vector(2))
    assert store.name_target("damaged") == damaged
    assert store.name_target("intact") == intact
    assert {entry[0] for entry in store.list()} == {damaged, intact}

    # Putting the same vector again repairs it.
    assert store.put(make_vector(1)) == damaged
    assert_same_vector(store.get(damaged), make_vector(1))


def test_other_valid_tensors_under_an_id_are_detected(store, make_vector):
    victim, donor = store.put(make_vector(1)), store.put(make_vector(2))
    overwrite_tensor_bytes(store, victim, stored_tensor_bytes(store, donor), fix_checksum=True)
    with pytest.raises(VectorStoreError, match=f"{victim} is corrupted: its content no longer hashes to its id"):
        store.get(victim)
    assert_same_vector(store.get(donor), make_vector(2))


def test_an_overwritten_entry_is_detected_and_repaired_by_put(store, make_vector):
    damaged, intact = store.put(make_vector(1)), store.put(make_vector(2))
    store.set_name("intact", intact)
    overwrite_whole_entry(store, damaged)
    with pytest.raises(VectorStoreError, match=damaged):
        store.get(damaged)
    assert_same_vector(store.get(store.resolve("intact")), make_vector(2))
    assert store.put(make_vector(1)) == damaged
    assert_same_vector(store.get(damaged), make_vector(1))
    assert {entry[0] for entry in store.list()} == {damaged, intact}


# --- concurrency


def test_concurrent_threads_writing_one_vector_leave_one_entry(store, make_vector):
    threads_count = 8
    start = threading.Barrier(threads_count)
    results: list[str] = []
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            start.wait()
            for _ in range(5):
                results.append(store.put(make_vector(1)))
            results.append(store.put(make_vector(100 + index)))
            store.set_name(f"writer-{index}", results[-1])
        except BaseException as error:  # reported below, with the thread's traceback lost otherwise
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    shared = make_vector(1).content_id
    assert results.count(shared) == 5 * threads_count
    listed = [content_id for content_id, _, _ in store.list()]
    assert sorted(listed) == sorted({shared} | {make_vector(100 + i).content_id for i in range(threads_count)})
    assert_same_vector(store.get(shared), make_vector(1))


def _location(store: VectorStore) -> tuple[str, ...]:
    if isinstance(store, SqliteVectorStore):
        return ("sqlite", str(store.data_dir))
    return ("redis", store.url, store.prefix)


def _put_from_child(location: tuple[str, ...], vectors: list[StoredVector], repeats: int) -> list[str]:
    """Runs in a spawned process: its own store object on the same data."""
    store = SqliteVectorStore(location[1]) if location[0] == "sqlite" else RedisVectorStore(*location[1:])
    return [store.put(vector) for _ in range(repeats) for vector in vectors]


def test_concurrent_processes_writing_one_vector_leave_one_entry(store, make_vector):
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared through fork
    with context.Pool(2) as pool:
        results = pool.starmap(
            _put_from_child,
            [(_location(store), [make_vector(1), make_vector(seed)], 20) for seed in (11, 12)],
        )
    shared = make_vector(1).content_id
    assert results[0].count(shared) == results[1].count(shared) == 20
    listed = sorted(content_id for content_id, _, _ in store.list())
    assert listed == sorted({shared, make_vector(11).content_id, make_vector(12).content_id})
    assert_same_vector(store.get(shared), make_vector(1))


# --- sqlite only: what a crash leaves behind


def test_sqlite_ignores_and_overwrites_an_orphan_blob(tmp_path, make_vector):
    store = SqliteVectorStore(tmp_path / "vectors")
    vector = make_vector(1)
    orphan = store.blob_dir / f"{vector.content_id}.safetensors"
    orphan.write_bytes(b"half a blob")  # a crash after the blob write, before the index row
    with pytest.raises(VectorNotFound):
        store.get(vector.content_id)
    assert store.list() == []
    assert store.put(vector) == vector.content_id
    assert_same_vector(store.get(vector.content_id), vector)


def test_sqlite_leaves_no_temp_files(tmp_path, make_vector):
    store = SqliteVectorStore(tmp_path / "vectors")
    for seed in range(3):
        store.put(make_vector(seed))
    store.delete(make_vector(0).content_id)
    assert sorted(path.name for path in store.blob_dir.iterdir()) == sorted(
        f"{make_vector(seed).content_id}.safetensors" for seed in (1, 2)
    )


# --- open_store


def test_open_store_opens_redis_urls(redis_server):
    redis_store = open_store(redis_server)
    assert isinstance(redis_store, RedisVectorStore) and redis_store.prefix == "steer:"


def test_open_store_opens_sqlite_directories(tmp_path, monkeypatch):
    from steer_vllm.settings import load_engine_settings

    by_url = open_store(f"sqlite://{tmp_path}/by-url")
    assert isinstance(by_url, SqliteVectorStore) and by_url.data_dir == tmp_path / "by-url"
    by_path = open_store(str(tmp_path / "by-path"))
    assert isinstance(by_path, SqliteVectorStore) and (tmp_path / "by-path" / "index.sqlite3").exists()

    # Where the settings say: $STEER_STORE, else under $XDG_CACHE_HOME.
    monkeypatch.setenv("STEER_STORE", str(tmp_path / "from-env"))
    assert open_store(load_engine_settings().store_location).data_dir == tmp_path / "from-env"
    monkeypatch.delenv("STEER_STORE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert open_store(load_engine_settings().store_location).data_dir == tmp_path / "cache" / "steer-server" / "vectors"


@pytest.mark.parametrize("url", ["sqlite://relative/dir", "http://example.com/vectors", ""])
def test_open_store_rejects_unknown_locations(url):
    with pytest.raises(VectorStoreError, match="bad store"):
        open_store(url)


def test_two_sqlite_store_objects_share_data(tmp_path, make_vector):
    first, second = SqliteVectorStore(tmp_path / "v"), SqliteVectorStore(Path(tmp_path / "v"))
    content_id = first.put(make_vector(1))
    second.set_name("shared", content_id)
    assert first.resolve("shared") == content_id


def test_calibrations_are_versioned_per_vector_and_go_with_it(store, make_vector):
    content_id = store.put(make_vector(11))
    other = store.put(make_vector(12))
    assert store.calibration(content_id) is None
    first = store.put_calibration(content_id, {"layer": 5, "dose": 0.4, "positions": {"start": 1}, "mode": "constant"})
    assert first == {"layer": 5, "dose": 0.4, "positions": {"start": 1}, "mode": "constant", "version": 1}
    assert store.calibration(content_id) == first
    second = store.put_calibration(content_id, {"layer": 3, "dose": 0.2, "positions": "all", "mode": "constant"})
    assert second["version"] == 2 and store.calibration(content_id) == second
    assert store.calibration(other) is None  # another vector's is its own
    assert store.put(make_vector(11)) == content_id and store.calibration(content_id) == second  # a re-put keeps it
    store.delete(content_id)
    assert store.calibration(content_id) is None
    with pytest.raises(VectorNotFound):
        store.put_calibration(content_id, {"layer": 1, "dose": 0.1})
    with pytest.raises(VectorStoreError, match="plain JSON"):
        store.put_calibration(other, {"dose": float("nan")})
    assert store.calibration(other) is None  # the refused write left nothing
