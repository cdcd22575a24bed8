"""One place that turns a store location into a backend."""
from __future__ import annotations

import os

from vector_store.base import VectorStore, VectorStoreError
from vector_store.redis import RedisVectorStore
from vector_store.sqlite import SqliteVectorStore

_REDIS_SCHEMES = ("redis://", "rediss://")
_SQLITE_SCHEME = "sqlite://"


def default_store_location(cache_home: str | os.PathLike[str]) -> str:
    """The store when none is named: ``<cache_home>/steer-server/vectors`` (``cache_home``: the
    user's cache directory, ``EngineSettings.cache_home``; the settings' ``store_location``
    prefers ``$STEER_STORE``)."""
    return os.path.join(cache_home, "steer-server", "vectors")


def open_store(url: str, timeout_s: float | None = None) -> VectorStore:
    """``redis://host:port/db`` (or ``rediss://``) -> RedisVectorStore; ``sqlite:///abs/dir``
    or a plain directory path -> SqliteVectorStore (callers pass their settings'
    ``store_location``). ``timeout_s`` bounds each call (Redis socket timeouts, SQLite's busy
    timeout)."""
    sqlite_args = {} if timeout_s is None else {"timeout_s": timeout_s}
    location = url
    if location.startswith(_REDIS_SCHEMES):
        return RedisVectorStore(location, timeout_s=timeout_s)
    if location.startswith(_SQLITE_SCHEME):
        path = location[len(_SQLITE_SCHEME):]
        if not path.startswith("/"):
            raise VectorStoreError(f"bad store URL {location!r}: expected sqlite:///absolute/directory")
        return SqliteVectorStore(path, **sqlite_args)
    if "://" in location or not location:
        raise VectorStoreError(
            f"bad store location {location!r}: expected redis://..., sqlite:///absolute/dir or a directory path"
        )
    return SqliteVectorStore(os.path.expanduser(location), **sqlite_args)
