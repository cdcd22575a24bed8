"""Listing pages and names, both backends (the `store` fixture): every vector exactly once,
oldest first, through concurrent writes; cursors; limits; ``names_of``; stores written by the
previous release (no indexes) upgraded on open; and the proof that a page costs O(page): the
queries SQLite plans and the commands Redis receives, which a scan of the store would change."""
from __future__ import annotations

import dataclasses
import random
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
import redis

from vector_store import codec
from vector_store.base import ListedVector, VectorNotFound, VectorStore, VectorStoreError, order_key, parse_order_key
from vector_store.keys import computation_key
from vector_store.redis import RedisVectorStore
from vector_store.sqlite import SqliteVectorStore


def walk(store: VectorStore, limit: int, named_only: bool = False) -> list[ListedVector]:
    entries, after = [], None
    while True:
        page = store.listing_page(limit, after, named_only=named_only)
        assert len(page.entries) <= limit
        entries += page.entries
        if page.next_cursor is None:
            return entries
        after = page.next_cursor


def sort_key(entry: ListedVector) -> tuple[float, str]:
    return entry.meta.created, entry.content_id


def put_at(store: VectorStore, make_vector, seed: int, created: float) -> str:
    vector = make_vector(seed)
    return store.put(dataclasses.replace(vector, meta=dataclasses.replace(vector.meta, created=created)))


def test_pages_list_every_vector_once_oldest_first_and_named_ones_apart(store, make_vector):
    # Ties on `created` are ordered by content id, across page boundaries too.
    ids = [put_at(store, make_vector, seed, created=1000.0 + seed // 3) for seed in range(17)]
    named = sorted(ids[::4])
    for i, content_id in enumerate(named):
        store.set_name(f"team{i % 2}.v{i}", content_id)
    store.set_name("also", named[0])
    expected = sorted(store.listing(), key=sort_key)
    assert [e.content_id for e in expected] == sorted(ids, key=lambda c: (1000.0 + ids.index(c) // 3, c))
    for limit in (1, 2, 3, 16, 17, 1000):
        assert walk(store, limit) == expected
        assert walk(store, limit, named_only=True) == [e for e in expected if e.names]
    assert {e.content_id: e.names for e in expected}[named[0]] == ["also", "team0.v0"]
    first = store.listing_page(17)
    assert first.next_cursor is None and len(first.entries) == 17  # exactly full: no empty page after it
    assert store.listing_page(16).next_cursor == order_key(*sort_key(expected[15]))


def test_an_empty_store_lists_one_empty_last_page(store):
    assert store.listing_page(10) == ([], None)
    assert store.listing_page(10, named_only=True) == ([], None)


def test_cursors_survive_the_deletion_of_their_vector_and_later_writes(store, make_vector):
    ids = [put_at(store, make_vector, seed, created=2000.0 + seed) for seed in range(6)]
    page = store.listing_page(3)
    assert [e.content_id for e in page.entries] == ids[:3]
    store.delete(ids[2])  # the cursor's own vector
    older = put_at(store, make_vector, 50, created=1.0)  # sorts before the cursor: not on later pages
    newer = put_at(store, make_vector, 51, created=9999.0)
    rest = store.listing_page(10, page.next_cursor)
    assert [e.content_id for e in rest.entries] == [*ids[3:], newer]
    assert older not in [e.content_id for e in rest.entries]
    assert store.listing_page(10, page.next_cursor) == rest  # a cursor is reusable


def test_named_pages_follow_names_moving_and_going(store, make_vector):
    a, b = (put_at(store, make_vector, seed, created=3000.0 + seed) for seed in range(2))
    named = lambda: [(e.content_id, e.names) for e in walk(store, 1, named_only=True)]  # noqa: E731
    assert named() == []
    store.set_name("x", a)
    store.set_name("y", a)
    assert named() == [(a, ["x", "y"])]
    store.set_name("x", b)  # re-pointed: a keeps "y"
    assert named() == [(a, ["y"]), (b, ["x"])]
    store.set_name("y", b)  # a's last name moved away
    assert named() == [(b, ["x", "y"])]
    assert store.names_of(a) == [] and store.names_of(b) == ["x", "y"]
    store.delete_name("x")
    assert named() == [(b, ["y"])]
    store.delete(b)  # its names go with it
    assert named() == [] and store.names_of(b) == [] and store.name_target("y") is None
    assert [e.content_id for e in walk(store, 5)] == [a]


def test_names_of_and_the_reverse_indexes_follow_deletes(store, make_vector):
    a = store.put(make_vector(1))
    b = store.put(make_vector(2))
    store.set_name("n2", a)
    store.set_name("n1", a)
    key = computation_key("fp", 3, [[1, 2]], [1.0], "actadd", None)
    store.remember_computation(key, a)
    assert store.names_of(a) == ["n1", "n2"]
    store.remember_computation(key, b)  # moved: deleting a must leave it
    store.delete(a)
    assert store.names_of(a) == [] and store.name_target("n1") is None
    assert store.cached_computation(key) == b
    store.delete(b)
    assert store.cached_computation(key) is None
    with pytest.raises(VectorNotFound, match="not a content id"):
        store.names_of("not-an-id")


@pytest.mark.parametrize("limit", [0, -1, True, 2.5, "3", None])
def test_a_page_holds_at_least_one_vector(store, limit):
    with pytest.raises(VectorStoreError, match=r"a page holds at least 1 vector, got limit"):
        store.listing_page(limit)


@pytest.mark.parametrize("cursor", ["", "garbage", "v-" + "a" * 40, "0" * 16 + ":v-" + "A" * 40,
                                    "fff8000000000000:v-" + "a" * 40,  # NaN
                                    "8000000000000000:v-" + "a" * 40 + "x", "x" * 10_000])
def test_a_cursor_this_store_did_not_give_is_refused(store, cursor):
    with pytest.raises(VectorStoreError, match=r"not a listing cursor: .* \(pass a next_cursor back unchanged\)"):
        store.listing_page(5, cursor)


def test_order_keys_sort_as_created_then_id():
    values = [-1e300, -2.5, -0.0, 5e-324, 1.0, 1764900000.123456, 1764900000.1234562, 1e300]
    ids = ["v-" + c * 40 for c in "0af"]
    pairs = [(v, c) for v in values for c in ids]
    keys = [order_key(v, c) for v, c in pairs]
    assert sorted(keys) == keys  # pairs were made in (created, id) order
    assert [parse_order_key(k) for k in keys] == pairs  # exact: no float rounded through text


def test_pages_cover_every_vector_once_while_others_are_written(store, make_vector):
    """Vectors stored throughout a walk are listed exactly once, in order, while another thread
    puts, names and deletes others between the pages."""
    steady = {store.put(make_vector(seed)) for seed in range(40)}
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        rng = random.Random(0)
        seed = 1000
        transient: list[str] = []
        try:
            while not stop.is_set():
                seed += 1
                transient.append(store.put(make_vector(seed)))
                store.set_name(f"churn-{seed}", transient[-1])
                if len(transient) > 3:
                    store.delete(transient.pop(rng.randrange(len(transient))))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for named_only in (False, True):
            for limit in (1, 4, 7):
                listed = walk(store, limit, named_only=named_only)
                ids = [e.content_id for e in listed]
                assert len(ids) == len(set(ids))
                assert [sort_key(e) for e in listed] == sorted(sort_key(e) for e in listed)
                if not named_only:
                    assert steady <= set(ids)
    finally:
        stop.set()
        writer.join()
    assert not errors


# --- stores written by the previous release: no indexes; every vector must still list

# The previous release's SQLite index (before name_count, its triggers and the listing indexes).
_OLD_SQLITE_SCHEMA = """
CREATE TABLE vectors (content_id TEXT PRIMARY KEY, meta TEXT NOT NULL, created REAL NOT NULL,
                      blob TEXT NOT NULL, blob_sha256 TEXT NOT NULL, shapes TEXT);
CREATE TABLE names (name TEXT PRIMARY KEY,
                    content_id TEXT NOT NULL REFERENCES vectors(content_id) ON DELETE CASCADE);
CREATE TABLE computations (key TEXT PRIMARY KEY,
                           content_id TEXT NOT NULL REFERENCES vectors(content_id) ON DELETE CASCADE);
CREATE TABLE calibrations (content_id TEXT PRIMARY KEY REFERENCES vectors(content_id) ON DELETE CASCADE,
                           version INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX names_by_content_id ON names(content_id);
CREATE INDEX computations_by_content_id ON computations(content_id);
"""


def write_old_layout(store: VectorStore, vectors, names: dict[str, str], computations: dict[str, str]) -> None:
    """What the previous release's writes left in ``store``'s location, written directly."""
    entries = [codec.encode(vector) for vector in vectors]
    if isinstance(store, SqliteVectorStore):
        (store.data_dir / "blobs").mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(store.index_path) as connection:
            connection.executescript(_OLD_SQLITE_SCHEMA)
            for entry in entries:
                (store.data_dir / "blobs" / f"{entry.content_id}.safetensors").write_bytes(entry.tensor_bytes)
                connection.execute("INSERT INTO vectors VALUES (?, ?, ?, ?, ?, ?)",
                                   (entry.content_id, entry.meta_json, entry.created, f"{entry.content_id}.safetensors",
                                    entry.tensor_sha256, entry.shapes_json))
            connection.executemany("INSERT INTO names VALUES (?, ?)", names.items())
            connection.executemany("INSERT INTO computations VALUES (?, ?)", computations.items())
        return
    client = redis.Redis.from_url(store.url)
    for entry in entries:
        client.hset(f"{store.prefix}vector:{entry.content_id}",
                    mapping={"meta": entry.meta_json, "tensors": entry.tensor_bytes, "sha256": entry.tensor_sha256,
                             "shapes": entry.shapes_json})
        client.sadd(f"{store.prefix}ids", entry.content_id)
    if names:
        client.hset(f"{store.prefix}names", mapping=names)
    if computations:
        client.hset(f"{store.prefix}computations", mapping=computations)


def reopen(store: VectorStore) -> VectorStore:
    if isinstance(store, SqliteVectorStore):
        return SqliteVectorStore(store.data_dir)
    return RedisVectorStore(store.url, prefix=store.prefix)


@pytest.fixture
def old_location(request, tmp_path) -> VectorStore:
    """A store object whose location nothing has been written to yet (a SQLite store object
    creates its index on open, so the old layout goes to a directory it has not opened)."""
    if request.param == "sqlite":
        return _unopened_sqlite(tmp_path / "old")
    return RedisVectorStore(request.getfixturevalue("redis_server"), prefix=f"old-{uuid.uuid4().hex}:")


def _unopened_sqlite(data_dir: Path) -> SqliteVectorStore:
    store = SqliteVectorStore.__new__(SqliteVectorStore)
    store.data_dir, store.index_path = data_dir, data_dir / "index.sqlite3"
    data_dir.mkdir(parents=True)
    return store


@pytest.mark.parametrize("old_location", ["sqlite", "redis"], indirect=True)
def test_a_store_written_by_the_previous_release_lists_every_vector(old_location, make_vector):
    vectors = [make_vector(seed) for seed in range(30)]
    vectors = [dataclasses.replace(v, meta=dataclasses.replace(v.meta, created=5000.0 + i // 2))
               for i, v in enumerate(vectors)]
    ids = [v.content_id for v in vectors]
    names = {f"team{i % 3}.v{i}": ids[i] for i in range(0, 30, 2)} | {"second": ids[0]}
    key = computation_key("fp", 3, [[7]], [1.0], "actadd", None)
    write_old_layout(old_location, vectors, names, {key: ids[5]})

    # Several replicas open it at once: each builds the indexes or finds them built; all agree.
    firsts: list[str] = []
    threads = [threading.Thread(target=lambda: firsts.append(reopen(old_location).listing_page(1).entries[0].content_id))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(firsts) == 4 and len(set(firsts)) == 1
    store = reopen(old_location)
    listed = walk(store, 7)
    assert [e.content_id for e in listed] == sorted(ids, key=lambda c: (5000.0 + ids.index(c) // 2, c))
    by_id = {e.content_id: e.names for e in listed}
    assert by_id[ids[0]] == ["second", "team0.v0"] and by_id[ids[1]] == []
    assert [e.content_id for e in walk(store, 4, named_only=True)] == [c for c in by_id if by_id[c]]
    assert store.names_of(ids[2]) == ["team2.v2"]
    # Writes through the upgraded store keep the indexes right.
    store.delete(ids[0])
    assert store.name_target("second") is None and store.names_of(ids[0]) == []
    store.set_name("moved", ids[1])
    store.delete(ids[5])
    assert store.cached_computation(key) is None
    assert ids[1] in [e.content_id for e in walk(store, 3, named_only=True)]
    assert len(walk(reopen(old_location), 1000)) == 28


def test_a_store_opened_while_the_previous_release_writes_waits_for_that_write(tmp_path, make_vector):
    # The earlier release's index is in rollback-journal mode; a replica of this release
    # opening it mid-write must wait for the write (SQLite refuses the WAL switch at once).
    old = _unopened_sqlite(tmp_path / "old")
    vector = make_vector(1)
    write_old_layout(old, [make_vector(0)], {}, {})
    entry = codec.encode(vector)
    (old.data_dir / "blobs" / f"{entry.content_id}.safetensors").write_bytes(entry.tensor_bytes)
    writer = sqlite3.connect(old.index_path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO vectors VALUES (?, ?, ?, ?, ?, ?)",
                   (entry.content_id, entry.meta_json, entry.created, f"{entry.content_id}.safetensors",
                    entry.tensor_sha256, entry.shapes_json))
    committer = threading.Timer(0.5, writer.execute, ("COMMIT",))
    committer.start()
    try:
        store = SqliteVectorStore(old.data_dir)
    finally:
        committer.join()
        writer.close()
    assert {e.content_id for e in walk(store, 10)} == {make_vector(0).content_id, entry.content_id}


def test_a_store_still_locked_after_the_busy_timeout_is_a_store_error(tmp_path, make_vector):
    old = _unopened_sqlite(tmp_path / "old")
    write_old_layout(old, [make_vector(0)], {}, {})
    writer = sqlite3.connect(old.index_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(VectorStoreError, match="cannot open the vector store index: database is locked"):
            SqliteVectorStore(old.data_dir, timeout_s=0.3)
    finally:
        writer.close()


# --- O(page), not O(store): proved by what the store asks of its engine, not by timing

def _traced_sqlite(store: SqliteVectorStore, statements: list[str]) -> None:
    connect = store._connect

    def traced():
        context = connect()
        connection = context.__enter__()
        connection.set_trace_callback(statements.append)

        class Traced:
            def __enter__(self):
                return connection

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Traced()

    store._connect = traced


def test_sqlite_pages_and_names_are_index_searches(tmp_path, make_vector):
    store = SqliteVectorStore(tmp_path / "vectors")
    ids = [store.put(make_vector(seed)) for seed in range(60)]
    for content_id in ids[::10]:
        store.set_name(f"n-{content_id[-6:]}", content_id)
    statements: list[str] = []
    _traced_sqlite(store, statements)
    cursor = store.listing_page(5).next_cursor
    store.listing_page(5, cursor)
    store.listing_page(5, named_only=True)
    store.listing_page(5, cursor, named_only=True)
    store.names_of(ids[0])
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 9
    with sqlite3.connect(store.index_path) as connection:
        for sql in selects:
            plan = [row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + sql, (0,) * sql.count("?"))]
            # Every table is reached through an index, and the tenant's references in index order
            # (no sort of the store): a first page walks the index from its start and stops at LIMIT.
            for step in plan:
                assert step.startswith(("SEARCH", "USE TEMP B-TREE FOR ORDER BY")), (sql, plan)
                if "SEARCH refs" in step:
                    assert "INDEX refs_by_created" in step or "INDEX named_refs_by_created" in step, plan
                    assert ("named_refs_by_created" in step) == ("name_count > 0" in sql), (sql, plan)
                if "SEARCH vectors" in step:  # one row per listed reference, by its id
                    assert "(content_id=?)" in step, plan
                if "SEARCH names" in step:  # the names of the page's vectors, not all the tenant's
                    assert "content_id=?" in step, plan
            if "FROM refs" in sql:
                assert "TEMP B-TREE" not in " ".join(plan) and "LIMIT" in sql, (sql, plan)


class _Recording(redis.Connection):
    """Records every command sent on it, pipelined or not."""

    sent: list[tuple] = []

    def send_command(self, *args, **kwargs):
        self.sent.append(tuple(a.decode() if isinstance(a, bytes) else str(a) for a in args))
        return super().send_command(*args, **kwargs)

    def pack_commands(self, commands):
        for command in commands:
            self.sent.append(tuple(a.decode() if isinstance(a, bytes) else str(a) for a in command))
        return super().pack_commands(commands)


def test_redis_pages_and_names_touch_only_the_page(redis_server, make_vector):
    store = RedisVectorStore(redis_server, prefix=f"scale-{uuid.uuid4().hex}:")
    ids = [store.put(make_vector(seed)) for seed in range(60)]
    for content_id in ids[::10]:
        store.set_name(f"n-{content_id[-6:]}", content_id)
    store.listing_page(1)  # the indexes are built (or seen built) once per process, not per page
    store._redis = redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_server, connection_class=_Recording))
    _Recording.sent = []
    prefix = store.prefix
    whole = {f"{prefix}{key}" for key in ("ids", "names", "computations", "order", "named", "order-of")}

    cursor = store.listing_page(5).next_cursor
    store.listing_page(5, cursor, named_only=True)
    store.names_of(ids[3])
    sent = [c for c in _Recording.sent if c[0].upper() not in ("MULTI", "EXEC", "CLIENT", "HELLO")]
    zranges = [c for c in sent if c[0].upper() == "ZRANGE"]
    assert [(c[1], c[2][0], c[4:]) for c in zranges] == [
        (f"{prefix}order", "-", ("BYLEX", "LIMIT", "0", "6")),
        (f"{prefix}named", "(", ("BYLEX", "LIMIT", "0", "6")),
    ]
    for command in sent:  # nothing else reads a key that grows with the store
        assert command[0].upper() == "ZRANGE" or command[1] not in whole, command
    per_vector = [c for c in sent if c[0].upper() in ("HMGET", "SMEMBERS")]
    assert len(per_vector) == len(sent) - 2 <= 2 * (5 + 5) + 1  # two per listed vector, one for names_of
    assert all(c[1].startswith((f"{prefix}vector:", f"{prefix}names-of:")) for c in per_vector)

    _Recording.sent = []
    store.delete(ids[0])
    store.set_name("moved", ids[1])
    store.delete_name("moved")
    for command in _Recording.sent:  # writes read no whole hash or set either
        assert command[0].upper() not in ("HGETALL", "SMEMBERS", "HKEYS", "HVALS", "SSCAN", "HSCAN", "SCAN", "KEYS") \
            or command[1] not in whole, command
