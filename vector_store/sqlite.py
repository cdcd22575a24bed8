"""The embedded default backend: an SQLite index beside one safetensors blob per vector.

Layout under ``data_dir``: ``index.sqlite3`` (WAL) and ``blobs/<content id>.safetensors``.
The index holds each vector once (``vectors``), the tenants referencing it (``refs``, which
listings walk), each tenant's names and calibrations (keyed by tenant, and removed with the
tenant's reference by cascade) and each tenant's usage (kept by triggers). Quota counters,
shared by the server's processes on this host, live apart in ``quotas.sqlite3``.
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
import time
from collections.abc import Iterator
from pathlib import Path

from vector_store import codec
from vector_store.base import (
    DEFAULT_TENANT,
    ListedVector,
    ListingPage,
    StoredDataDamaged,
    StoreLimits,
    StoredVector,
    TenantUsage,
    VectorNotFound,
    VectorStore,
    VectorStoreError,
    check_page_limit,
    check_tenant,
    order_key,
    parse_order_key,
)

_BUSY_TIMEOUT_S = 30.0
# PRAGMA user_version of an index in this release's layout (0: created by an earlier release,
# whose one namespace becomes the default tenant's on first open).
LAYOUT = 2
_TABLES = (
    """CREATE TABLE vectors (
        content_id  TEXT PRIMARY KEY,
        meta        TEXT NOT NULL,
        created     REAL NOT NULL,
        blob        TEXT NOT NULL,
        blob_sha256 TEXT NOT NULL,
        shapes      TEXT,  -- JSON {"<layer>": [k, hidden]}; NULL in rows written before it was kept
        nbytes      INTEGER NOT NULL  -- the blob's size, counted in its tenants' usage
    )""",
    # A tenant's vectors. created and nbytes are the vector's, copied so listings walk one index
    # and usage is kept without reading the vector row (gone by the time a cascade would run).
    """CREATE TABLE refs (
        tenant     TEXT NOT NULL,
        content_id TEXT NOT NULL REFERENCES vectors(content_id) ON DELETE CASCADE,
        created    REAL NOT NULL,
        nbytes     INTEGER NOT NULL,
        name_count INTEGER NOT NULL DEFAULT 0,  -- the tenant's names pointing at it; kept by triggers
        PRIMARY KEY (tenant, content_id)
    )""",
    # A name points only at a vector its tenant references, and goes with the reference.
    """CREATE TABLE names (
        tenant     TEXT NOT NULL,
        name       TEXT NOT NULL,
        content_id TEXT NOT NULL,
        PRIMARY KEY (tenant, name),
        FOREIGN KEY (tenant, content_id) REFERENCES refs(tenant, content_id) ON DELETE CASCADE
    )""",
    """CREATE TABLE computations (
        key        TEXT PRIMARY KEY,
        content_id TEXT NOT NULL REFERENCES vectors(content_id) ON DELETE CASCADE
    )""",
    """CREATE TABLE calibrations (
        tenant     TEXT NOT NULL,
        content_id TEXT NOT NULL,
        version    INTEGER NOT NULL,
        body       TEXT NOT NULL,  -- JSON, steer_server.serving.calibration.Calibration
        PRIMARY KEY (tenant, content_id),
        FOREIGN KEY (tenant, content_id) REFERENCES refs(tenant, content_id) ON DELETE CASCADE
    )""",
    "CREATE TABLE usage (tenant TEXT PRIMARY KEY, vectors INTEGER NOT NULL, bytes INTEGER NOT NULL)",
)
_COUNTER_TABLES = (
    """CREATE TABLE IF NOT EXISTS rates (
        tenant TEXT NOT NULL, quota TEXT NOT NULL,
        period INTEGER NOT NULL,  -- which fixed window (time // window_s) `used` counts in
        used   INTEGER NOT NULL,
        PRIMARY KEY (tenant, quota)
    )""",
    """CREATE TABLE IF NOT EXISTS slots (
        tenant TEXT NOT NULL, quota TEXT NOT NULL, token TEXT NOT NULL,
        expires REAL NOT NULL,  -- a slot its process never released is free again after its lease
        PRIMARY KEY (tenant, quota, token)
    )""",
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS refs_by_content_id ON refs(content_id)",
    "CREATE INDEX IF NOT EXISTS names_by_content_id ON names(tenant, content_id)",
    "CREATE INDEX IF NOT EXISTS computations_by_content_id ON computations(content_id)",
    # Listing pages walk these in order from the cursor: O(page), and named-only pages skip
    # no unnamed vectors.
    "CREATE INDEX IF NOT EXISTS refs_by_created ON refs(tenant, created, content_id)",
    "CREATE INDEX IF NOT EXISTS named_refs_by_created ON refs(tenant, created, content_id) WHERE name_count > 0",
    # name_count and usage follow names and refs in the same transaction as every write to them.
    """CREATE TRIGGER IF NOT EXISTS name_added AFTER INSERT ON names BEGIN
        UPDATE refs SET name_count = name_count + 1 WHERE tenant = NEW.tenant AND content_id = NEW.content_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS name_removed AFTER DELETE ON names BEGIN
        UPDATE refs SET name_count = name_count - 1 WHERE tenant = OLD.tenant AND content_id = OLD.content_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS name_moved AFTER UPDATE OF content_id ON names BEGIN
        UPDATE refs SET name_count = name_count - 1 WHERE tenant = OLD.tenant AND content_id = OLD.content_id;
        UPDATE refs SET name_count = name_count + 1 WHERE tenant = NEW.tenant AND content_id = NEW.content_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS ref_added AFTER INSERT ON refs BEGIN
        INSERT INTO usage (tenant, vectors, bytes) VALUES (NEW.tenant, 1, NEW.nbytes)
            ON CONFLICT (tenant) DO UPDATE SET vectors = vectors + 1, bytes = bytes + excluded.bytes;
    END""",
    """CREATE TRIGGER IF NOT EXISTS ref_removed AFTER DELETE ON refs BEGIN
        UPDATE usage SET vectors = vectors - 1, bytes = bytes - OLD.nbytes WHERE tenant = OLD.tenant;
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
        self._counters_made = False
        with self._connect() as connection:
            _use_wal(connection, self.timeout_s)
            _upgrade(connection, self.blob_dir)

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

    def put(self, vector: StoredVector, *, tenant: str = DEFAULT_TENANT, limits: StoreLimits | None = None) -> str:
        check_tenant(tenant)
        entry = codec.encode(vector)
        blob_path = self._blob_path(entry.content_id)
        with self._connect() as connection, _write_transaction(connection):
            referenced = _referenced(connection, tenant, entry.content_id)
            if limits is not None and not referenced:  # before any byte is written
                limits.check(_usage(connection, tenant), len(entry.tensor_bytes))
            known = connection.execute("SELECT 1 FROM vectors WHERE content_id = ?", (entry.content_id,)).fetchone()
            if not known or _read_or_none(blob_path) != entry.tensor_bytes:
                # New, or its blob was lost or damaged: (re)write the blob; a row already there keeps its meta.
                _write_atomically(blob_path, entry.tensor_bytes)
                connection.execute(
                    "INSERT INTO vectors (content_id, meta, created, blob, blob_sha256, shapes, nbytes)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (content_id) DO UPDATE"
                    " SET blob_sha256 = excluded.blob_sha256, shapes = excluded.shapes",
                    (entry.content_id, entry.meta_json, entry.created, blob_path.name, entry.tensor_sha256,
                     entry.shapes_json, len(entry.tensor_bytes)),
                )
            if not referenced:
                _reference(connection, tenant, entry.content_id)
        return entry.content_id

    def add_reference(self, content_id: str, *, tenant: str = DEFAULT_TENANT, limits: StoreLimits | None = None) -> None:
        check_tenant(tenant)
        codec.check_content_id(content_id)
        with self._connect() as connection, _write_transaction(connection):
            if _referenced(connection, tenant, content_id):
                return
            row = connection.execute("SELECT nbytes FROM vectors WHERE content_id = ?", (content_id,)).fetchone()
            if row is None:
                raise VectorNotFound(f"no vector with id {content_id}")
            if limits is not None:
                limits.check(_usage(connection, tenant), row[0])
            _reference(connection, tenant, content_id)

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

    def has(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> bool:
        check_tenant(tenant)
        codec.check_content_id(content_id)
        with self._connect() as connection:
            return _referenced(connection, tenant, content_id)

    def delete(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        check_tenant(tenant)
        codec.check_content_id(content_id)
        with self._connect() as connection, _write_transaction(connection):
            # The tenant's names and calibration go with its reference (cascade).
            if not connection.execute("DELETE FROM refs WHERE tenant = ? AND content_id = ?",
                                      (tenant, content_id)).rowcount:
                raise VectorNotFound(f"no vector with id {content_id}")
            collected = connection.execute(
                "DELETE FROM vectors WHERE content_id = ? AND NOT EXISTS (SELECT 1 FROM refs WHERE content_id = ?)",
                (content_id, content_id)).rowcount
            if collected:  # still inside the write lock, so no put of the same vector can interleave
                self._blob_path(content_id).unlink(missing_ok=True)

    def listing_page(self, limit: int, after: str | None = None, named_only: bool = False, *,
                     tenant: str = DEFAULT_TENANT) -> ListingPage:
        check_tenant(tenant)
        check_page_limit(limit)
        conditions, params = ["refs.tenant = ?"], [tenant]
        if named_only:
            conditions.append("refs.name_count > 0")  # spelled as the partial index is, so the planner takes it
        if after is not None:
            conditions.append("(refs.created, refs.content_id) > (?, ?)")
            params += parse_order_key(after)
        with self._connect() as connection:
            connection.execute("BEGIN")  # one snapshot for the page and its names
            try:
                rows = connection.execute(
                    "SELECT refs.content_id, meta, shapes, refs.created FROM refs JOIN vectors USING (content_id)"
                    f" WHERE {' AND '.join(conditions)} ORDER BY refs.created, refs.content_id LIMIT ?",
                    (*params, limit + 1),
                ).fetchall()
                page = rows[:limit]
                names: dict[str, list[str]] = {}
                ids = [row[0] for row in page]
                # Sorted here, not by SQL: an ORDER BY name makes SQLite walk the tenant's whole
                # (tenant, name) key rather than search names_by_content_id.
                for content_id, name in connection.execute(
                    f"SELECT content_id, name FROM names WHERE tenant = ? AND content_id IN ({','.join('?' * len(ids))})",
                    (tenant, *ids)
                ):
                    names.setdefault(content_id, []).append(name)
            finally:
                connection.execute("COMMIT")
        entries = [
            ListedVector(content_id, codec.decode_meta(content_id, meta_json), sorted(names.get(content_id, [])),
                         codec.decode_shapes(content_id, shapes_json))
            for content_id, meta_json, shapes_json, _ in page
        ]
        more = len(rows) > limit
        return ListingPage(entries, order_key(page[-1][3], page[-1][0]) if more else None)

    def names_of(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> list[str]:
        check_tenant(tenant)
        codec.check_content_id(content_id)
        with self._connect() as connection:
            return sorted(row[0] for row in connection.execute(  # (sorted here: see listing_page)
                "SELECT name FROM names WHERE tenant = ? AND content_id = ?", (tenant, content_id)))

    def usage(self, *, tenant: str = DEFAULT_TENANT) -> TenantUsage:
        check_tenant(tenant)
        with self._connect() as connection:
            return _usage(connection, tenant)

    # -- quota counters: a file of their own, written often and worthless after a crash, so
    # never fsynced (synchronous=OFF) and never contending with vector writes for the index's lock.

    @contextlib.contextmanager
    def _counters(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the counters' file (its tables made by this process's first use)."""
        connection = sqlite3.connect(self.data_dir / "quotas.sqlite3", timeout=self.timeout_s, isolation_level=None)
        try:
            if not self._counters_made:
                _use_wal(connection, self.timeout_s)  # kept by the file
                with _write_transaction(connection):
                    for statement in _COUNTER_TABLES:
                        connection.execute(statement)
                self._counters_made = True
            connection.execute("PRAGMA synchronous=OFF")
            with _write_transaction(connection):
                yield connection
        finally:
            connection.close()

    def charge(self, tenant: str, quota: str, amount: int, limit: int, window_s: float) -> float | None:
        now = time.time()
        window = int(now // window_s)
        with self._counters() as connection:
            row = connection.execute("SELECT period, used FROM rates WHERE tenant = ? AND quota = ?",
                                     (tenant, quota)).fetchone()
            used = row[1] if row and row[0] == window else 0
            if used + amount > limit:
                return (window + 1) * window_s - now
            connection.execute("INSERT INTO rates (tenant, quota, period, used) VALUES (?, ?, ?, ?) ON CONFLICT"
                               " (tenant, quota) DO UPDATE SET period = excluded.period, used = excluded.used",
                               (tenant, quota, window, used + amount))
        return None

    def acquire(self, tenant: str, quota: str, token: str, limit: int, lease_s: float) -> bool:
        now = time.time()
        with self._counters() as connection:
            connection.execute("DELETE FROM slots WHERE tenant = ? AND quota = ? AND expires < ?", (tenant, quota, now))
            (taken,) = connection.execute("SELECT count(*) FROM slots WHERE tenant = ? AND quota = ?",
                                          (tenant, quota)).fetchone()
            if taken >= limit:
                return False
            connection.execute("INSERT INTO slots (tenant, quota, token, expires) VALUES (?, ?, ?, ?)",
                               (tenant, quota, token, now + lease_s))
        return True

    def release(self, tenant: str, quota: str, token: str) -> None:
        with self._counters() as connection:
            connection.execute("DELETE FROM slots WHERE tenant = ? AND quota = ? AND token = ?", (tenant, quota, token))

    def set_name(self, name: str, content_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        check_tenant(tenant)
        codec.check_name(name)
        codec.check_content_id(content_id)
        with self._connect() as connection, _write_transaction(connection):
            if not _referenced(connection, tenant, content_id):
                raise VectorNotFound(f"no vector with id {content_id}")
            connection.execute(
                "INSERT INTO names (tenant, name, content_id) VALUES (?, ?, ?)"
                " ON CONFLICT (tenant, name) DO UPDATE SET content_id = excluded.content_id",
                (tenant, name, content_id),
            )

    def name_target(self, name: str, *, tenant: str = DEFAULT_TENANT) -> str | None:
        check_tenant(tenant)
        if not codec.is_valid_name(name):
            return None  # no such name can have been stored
        with self._connect() as connection:
            row = connection.execute("SELECT content_id FROM names WHERE tenant = ? AND name = ?",
                                     (tenant, name)).fetchone()
        return row[0] if row else None

    def delete_name(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        check_tenant(tenant)
        codec.check_name(name)
        with self._connect() as connection:
            if not connection.execute("DELETE FROM names WHERE tenant = ? AND name = ?", (tenant, name)).rowcount:
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
            if connection.execute("SELECT 1 FROM vectors WHERE content_id = ?", (content_id,)).fetchone() is None:
                raise VectorNotFound(f"no vector with id {content_id}")
            connection.execute(
                "INSERT INTO computations (key, content_id) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET content_id = excluded.content_id",
                (key, content_id),
            )

    def put_calibration(self, content_id: str, calibration: dict, *, tenant: str = DEFAULT_TENANT) -> dict:
        check_tenant(tenant)
        codec.check_content_id(content_id)
        with self._connect() as connection, _write_transaction(connection):
            if not _referenced(connection, tenant, content_id):
                raise VectorNotFound(f"no vector with id {content_id}")
            row = connection.execute("SELECT version FROM calibrations WHERE tenant = ? AND content_id = ?",
                                     (tenant, content_id)).fetchone()
            stored = {**calibration, "version": (row[0] if row else 0) + 1}
            connection.execute(
                "INSERT INTO calibrations (tenant, content_id, version, body) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (tenant, content_id) DO UPDATE SET version = excluded.version, body = excluded.body",
                (tenant, content_id, stored["version"], codec.encode_calibration(stored)),
            )
        return stored

    def calibration(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> dict | None:
        check_tenant(tenant)
        codec.check_content_id(content_id)
        with self._connect() as connection:
            row = connection.execute("SELECT body FROM calibrations WHERE tenant = ? AND content_id = ?",
                                     (tenant, content_id)).fetchone()
        return codec.decode_calibration(content_id, row[0]) if row else None


def _usage(connection: sqlite3.Connection, tenant: str) -> TenantUsage:
    row = connection.execute("SELECT vectors, bytes FROM usage WHERE tenant = ?", (tenant,)).fetchone()
    return TenantUsage(*row) if row else TenantUsage(0, 0)


def _referenced(connection: sqlite3.Connection, tenant: str, content_id: str) -> bool:
    return connection.execute("SELECT 1 FROM refs WHERE tenant = ? AND content_id = ?",
                              (tenant, content_id)).fetchone() is not None


def _reference(connection: sqlite3.Connection, tenant: str, content_id: str) -> bool:
    """Add the tenant's reference to a stored vector (inside a write transaction); False if no such vector."""
    connection.execute(
        "INSERT OR IGNORE INTO refs (tenant, content_id, created, nbytes)"
        " SELECT ?, content_id, created, nbytes FROM vectors WHERE content_id = ?", (tenant, content_id))
    return _referenced(connection, tenant, content_id)


def _use_wal(connection: sqlite3.Connection, timeout_s: float) -> None:
    """Switch a file to WAL, so readers never wait for the writer. On an index still in
    rollback mode (an earlier release's) while another process writes it, SQLite answers
    BUSY at once rather than calling its busy handler (the switch could deadlock), so the
    wait for that writer is done here, up to the same busy timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise VectorStoreError(f"cannot open the vector store index: {error}") from None
            time.sleep(0.02)


def _upgrade(connection: sqlite3.Connection, blob_dir: Path) -> None:
    """Create the tables, or bring an index written by an earlier release up to this layout.
    One write transaction, so processes opening the store together see all of it or none,
    and the later ones find nothing left to do."""
    with _write_transaction(connection):
        if connection.execute("PRAGMA user_version").fetchone()[0] == LAYOUT:
            return
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "vectors" in tables:
            _into_default_tenant(connection, blob_dir)
        else:
            for statement in _TABLES:
                connection.execute(statement)
        for statement in _INDEXES:
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {LAYOUT}")


def _into_default_tenant(connection: sqlite3.Connection, blob_dir: Path) -> None:
    """An earlier release's index (one namespace; its vectors may lack shapes and name
    counts): every vector, name and calibration becomes the default tenant's, bytes counted
    from the blobs. Tables whose keys gain the tenant are rebuilt (SQLite cannot change a
    primary key in place)."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(vectors)")}
    if "shapes" not in columns:
        connection.execute("ALTER TABLE vectors ADD COLUMN shapes TEXT")
    # The earlier release's listing indexes and name counts, replaced by the per-tenant ones on refs.
    # Its vectors.name_count column stays, unused and defaulted (SQLite 3.40's DROP COLUMN fails
    # on that release's CREATE TABLE, whose last column carries a comment).
    for old in ("name_added", "name_removed", "name_moved"):
        connection.execute(f"DROP TRIGGER IF EXISTS {old}")
    for old in ("vectors_by_created", "named_vectors_by_created", "names_by_content_id"):
        connection.execute(f"DROP INDEX IF EXISTS {old}")
    connection.execute("ALTER TABLE vectors ADD COLUMN nbytes INTEGER NOT NULL DEFAULT 0")
    for content_id, blob in connection.execute("SELECT content_id, blob FROM vectors").fetchall():
        try:
            size = (blob_dir / blob).stat().st_size
        except OSError:
            continue  # a lost blob counts nothing; reading the vector reports it damaged
        connection.execute("UPDATE vectors SET nbytes = ? WHERE content_id = ?", (size, content_id))
    tables = dict(zip(("vectors", "refs", "names", "computations", "calibrations", "usage"), _TABLES))
    connection.execute(tables["refs"])
    connection.execute("INSERT INTO refs (tenant, content_id, created, nbytes) SELECT ?, content_id, created, nbytes"
                       " FROM vectors", (DEFAULT_TENANT,))
    existing = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "computations" not in existing:
        connection.execute(tables["computations"])
    for table, columns_copied in (("names", "name, content_id"), ("calibrations", "content_id, version, body")):
        if table not in existing:  # written before the release that added it
            connection.execute(tables[table])
            continue
        connection.execute(f"ALTER TABLE {table} RENAME TO {table}_before_tenants")
        connection.execute(tables[table])
        connection.execute(f"INSERT INTO {table} (tenant, {columns_copied}) SELECT ?, {columns_copied}"
                           f" FROM {table}_before_tenants", (DEFAULT_TENANT,))
        connection.execute(f"DROP TABLE {table}_before_tenants")
    connection.execute("UPDATE refs SET name_count ="
                       " (SELECT count(*) FROM names WHERE names.content_id = refs.content_id)")
    connection.execute(tables["usage"])
    connection.execute("INSERT INTO usage (tenant, vectors, bytes) SELECT tenant, count(*), sum(nbytes) FROM refs"
                       " GROUP BY tenant")


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
