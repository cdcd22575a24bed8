"""The embedded default backend: an SQLite index beside one safetensors blob per vector.

Layout under ``data_dir``: ``index.sqlite3`` (WAL) and ``blobs/<content id>.safetensors``.
A write takes SQLite's write lock first (``BEGIN IMMEDIATE``), so writers in any thread
or process run one at a time; inside it the blob is written to a temp file, fsynced and
renamed into place, and only then indexed; the commit is durable (``synchronous=FULL``)
before the write returns. A crash before the commit leaves at most a blob without an index
row, which nothing reads and the next put of that vector overwrites.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vector_store import codec
from vector_store.base import (
    ListedVector,
    ListingPage,
    StoredDataDamaged,
    StoredVector,
    VectorNotFound,
    VectorStore,
    VectorStoreError,
    check_page_limit,
    order_key,
    parse_order_key,
)

_BUSY_TIMEOUT_S = 30.0
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS vectors (
        content_id  TEXT PRIMARY KEY,
        meta        TEXT NOT NULL,
        created     REAL NOT NULL,
        blob        TEXT NOT NULL,
        blob_sha256 TEXT NOT NULL,
        shapes      TEXT,  -- JSON {"<layer>": [k, hidden]}; NULL in rows written before it was kept
        name_count  INTEGER NOT NULL DEFAULT 0  -- kept by the triggers below
    )""",
    """CREATE TABLE IF NOT EXISTS names (
        name       TEXT PRIMARY KEY,
        content_id TEXT NOT NULL REFERENCES vectors(content_id) ON DELETE CASCADE
    )""",
    """CREATE TABLE IF NOT EXISTS computations (
        key        TEXT PRIMARY KEY,
        content_id TEXT NOT NULL REFERENCES vectors(content_id) ON DELETE CASCADE
    )""",
    """CREATE TABLE IF NOT EXISTS calibrations (
        content_id TEXT PRIMARY KEY REFERENCES vectors(content_id) ON DELETE CASCADE,
        version    INTEGER NOT NULL,
        body       TEXT NOT NULL  -- JSON, steer_server.calibration.Calibration
    )""",
)
# Created after any column an older index lacks has been added (``_upgrade``).
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS names_by_content_id ON names(content_id)",
    "CREATE INDEX IF NOT EXISTS computations_by_content_id ON computations(content_id)",
    # Listing pages walk these in order from the cursor: O(page), and named-only pages skip
    # no unnamed vectors.
    "CREATE INDEX IF NOT EXISTS vectors_by_created ON vectors(created, content_id)",
    "CREATE INDEX IF NOT EXISTS named_vectors_by_created ON vectors(created, content_id) WHERE name_count > 0",
    # name_count follows the names table in the same transaction as every write to it,
    # whichever release's code (or sqlite3 shell) makes the write.
    """CREATE TRIGGER IF NOT EXISTS name_added AFTER INSERT ON names BEGIN
        UPDATE vectors SET name_count = name_count + 1 WHERE content_id = NEW.content_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS name_removed AFTER DELETE ON names BEGIN
        UPDATE vectors SET name_count = name_count - 1 WHERE content_id = OLD.content_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS name_moved AFTER UPDATE OF content_id ON names BEGIN
        UPDATE vectors SET name_count = name_count - 1 WHERE content_id = OLD.content_id;
        UPDATE vectors SET name_count = name_count + 1 WHERE content_id = NEW.content_id;
    END""",
)


class SqliteVectorStore(VectorStore):
    def __init__(self, data_dir: str | os.PathLike[str], timeout_s: float = _BUSY_TIMEOUT_S) -> None:
        self.data_dir = Path(data_dir)
        self.timeout_s = timeout_s
        self.blob_dir = self.data_dir / "blobs"
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise VectorStoreError(f"cannot create the vector store directory {self.blob_dir}: {error}") from None
        self.index_path = self.data_dir / "index.sqlite3"
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            _upgrade(connection)

    def __repr__(self) -> str:
        return f"SqliteVectorStore({str(self.data_dir)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe across threads and after fork.
        # timeout is SQLite's busy timeout: how long to wait for another writer's lock.
        connection = sqlite3.connect(self.index_path, timeout=self.timeout_s, isolation_level=None)
        try:
            connection.execute("PRAGMA foreign_keys=ON")  # deletes cascade to names and computations
            # A commit returns once the WAL is fsynced: an acknowledged write survives a crash
            # of the machine, not only of the process (WAL's NORMAL would not promise that).
            connection.execute("PRAGMA synchronous=FULL")
            yield connection
        finally:
            connection.close()

    def _blob_path(self, content_id: str) -> Path:
        return self.blob_dir / f"{content_id}.safetensors"

    def put(self, vector: StoredVector) -> str:
        entry = codec.encode(vector)
        blob_path = self._blob_path(entry.content_id)
        with self._connect() as connection, _write_transaction(connection):
            known = connection.execute("SELECT 1 FROM vectors WHERE content_id = ?", (entry.content_id,)).fetchone()
            if known and _read_or_none(blob_path) == entry.tensor_bytes:
                return entry.content_id
            # New, or its blob was lost or damaged: (re)write the blob; a row already there keeps its meta.
            _write_atomically(blob_path, entry.tensor_bytes)
            connection.execute(
                "INSERT INTO vectors (content_id, meta, created, blob, blob_sha256, shapes) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (content_id) DO UPDATE SET blob_sha256 = excluded.blob_sha256, shapes = excluded.shapes",
                (entry.content_id, entry.meta_json, entry.created, blob_path.name, entry.tensor_sha256, entry.shapes_json),
            )
        return entry.content_id

    def get(self, content_id: str) -> StoredVector:
        codec.check_content_id(content_id)
        with self._connect() as connection:
            row = connection.execute(
                "SELECT meta, blob, blob_sha256 FROM vectors WHERE content_id = ?", (content_id,)
            ).fetchone()
        if row is None:
            raise VectorNotFound(f"no vector with id {content_id}")
        meta_json, blob_name, blob_sha256 = row
        try:
            tensor_bytes = (self.blob_dir / blob_name).read_bytes()
        except OSError as error:
            raise StoredDataDamaged(f"stored tensors of {content_id} are missing: {error}") from None
        return codec.decode(content_id, meta_json, tensor_bytes, blob_sha256)

    def has(self, content_id: str) -> bool:
        codec.check_content_id(content_id)
        with self._connect() as connection:
            return connection.execute("SELECT 1 FROM vectors WHERE content_id = ?", (content_id,)).fetchone() is not None

    def delete(self, content_id: str) -> None:
        codec.check_content_id(content_id)
        with self._connect() as connection, _write_transaction(connection):
            deleted = connection.execute("DELETE FROM vectors WHERE content_id = ?", (content_id,)).rowcount
            if not deleted:
                raise VectorNotFound(f"no vector with id {content_id}")
            # Still inside the write lock, so no put of the same vector can interleave.
            self._blob_path(content_id).unlink(missing_ok=True)

    def listing_page(self, limit: int, after: str | None = None, named_only: bool = False) -> ListingPage:
        check_page_limit(limit)
        conditions, params = [], []
        if named_only:
            conditions.append("name_count > 0")  # spelled as the partial index is, so the planner takes it
        if after is not None:
            conditions.append("(created, content_id) > (?, ?)")
            params += parse_order_key(after)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._connect() as connection:
            connection.execute("BEGIN")  # one snapshot for the page and its names
            try:
                rows = connection.execute(
                    f"SELECT content_id, meta, shapes, created FROM vectors {where} ORDER BY created, content_id LIMIT ?",
                    (*params, limit + 1),
                ).fetchall()
                page = rows[:limit]
                names: dict[str, list[str]] = {}
                ids = [row[0] for row in page]
                for content_id, name in connection.execute(
                    f"SELECT content_id, name FROM names WHERE content_id IN ({','.join('?' * len(ids))}) ORDER BY name", ids
                ):
                    names.setdefault(content_id, []).append(name)
            finally:
                connection.execute("COMMIT")
        entries = [
            ListedVector(content_id, codec.decode_meta(content_id, meta_json), names.get(content_id, []),
                         codec.decode_shapes(content_id, shapes_json))
            for content_id, meta_json, shapes_json, _ in page
        ]
        more = len(rows) > limit
        return ListingPage(entries, order_key(page[-1][3], page[-1][0]) if more else None)

    def names_of(self, content_id: str) -> list[str]:
        codec.check_content_id(content_id)
        with self._connect() as connection:
            return [row[0] for row in connection.execute(
                "SELECT name FROM names WHERE content_id = ? ORDER BY name", (content_id,))]

    def set_name(self, name: str, content_id: str) -> None:
        codec.check_name(name)
        codec.check_content_id(content_id)
        with self._connect() as connection, _write_transaction(connection):
            self._require(connection, content_id)
            connection.execute(
                "INSERT INTO names (name, content_id) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET content_id = excluded.content_id",
                (name, content_id),
            )

    def name_target(self, name: str) -> str | None:
        if not codec.is_valid_name(name):
            return None  # no such name can have been stored
        with self._connect() as connection:
            row = connection.execute("SELECT content_id FROM names WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def delete_name(self, name: str) -> None:
        codec.check_name(name)
        with self._connect() as connection:
            if not connection.execute("DELETE FROM names WHERE name = ?", (name,)).rowcount:
                raise VectorNotFound(f"no vector named {name!r}")

    def cached_computation(self, key: str) -> str | None:
        codec.check_computation_key(key)
        with self._connect() as connection:
            row = connection.execute("SELECT content_id FROM computations WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def remember_computation(self, key: str, content_id: str) -> None:
        codec.check_computation_key(key)
        codec.check_content_id(content_id)
        with self._connect() as connection, _write_transaction(connection):
            self._require(connection, content_id)
            connection.execute(
                "INSERT INTO computations (key, content_id) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET content_id = excluded.content_id",
                (key, content_id),
            )

    def put_calibration(self, content_id: str, calibration: dict) -> dict:
        codec.check_content_id(content_id)
        with self._connect() as connection, _write_transaction(connection):
            self._require(connection, content_id)
            row = connection.execute("SELECT version FROM calibrations WHERE content_id = ?", (content_id,)).fetchone()
            stored = {**calibration, "version": (row[0] if row else 0) + 1}
            connection.execute(
                "INSERT INTO calibrations (content_id, version, body) VALUES (?, ?, ?)"
                " ON CONFLICT (content_id) DO UPDATE SET version = excluded.version, body = excluded.body",
                (content_id, stored["version"], codec.encode_calibration(stored)),
            )
        return stored

    def calibration(self, content_id: str) -> dict | None:
        codec.check_content_id(content_id)
        with self._connect() as connection:
            row = connection.execute("SELECT body FROM calibrations WHERE content_id = ?", (content_id,)).fetchone()
        return codec.decode_calibration(content_id, row[0]) if row else None

    @staticmethod
    def _require(connection: sqlite3.Connection, content_id: str) -> None:
        if connection.execute("SELECT 1 FROM vectors WHERE content_id = ?", (content_id,)).fetchone() is None:
            raise VectorNotFound(f"no vector with id {content_id}")


def _upgrade(connection: sqlite3.Connection) -> None:
    """Create the tables, or bring an index written by an earlier release up to this one:
    add the columns it lacks (shapes stay NULL in its rows; name_count is counted from its
    names), then the indexes and triggers. One write transaction, so processes opening the
    store together see all of it or none, and the later ones find nothing left to do."""
    with _write_transaction(connection):
        for statement in _SCHEMA:
            connection.execute(statement)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(vectors)")}
        if "shapes" not in columns:
            connection.execute("ALTER TABLE vectors ADD COLUMN shapes TEXT")
        if "name_count" not in columns:
            connection.execute("ALTER TABLE vectors ADD COLUMN name_count INTEGER NOT NULL DEFAULT 0")
            connection.execute("UPDATE vectors SET name_count ="
                               " (SELECT count(*) FROM names WHERE names.content_id = vectors.content_id)")
        for statement in _INDEXES:
            connection.execute(statement)


@contextlib.contextmanager
def _write_transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """Take the write lock up front (waiting up to the busy timeout), so the checks a
    write makes still hold when it commits; roll back on any error."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename, fsync the directory: the path holds the old bytes or
    all of the new ones, even across a crash."""
    fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        Path(tmp_path).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
