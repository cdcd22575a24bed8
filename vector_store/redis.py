"""The shared backend: replicas that point at one Redis see the same vectors.

Keys, all under ``prefix`` (default ``steer:``):
  ``<prefix>vector:<content id>``  hash {meta: JSON, tensors: safetensors bytes, sha256,
                                   shapes: JSON layer -> [k, hidden] (absent in older entries),
                                   calibration: JSON (absent until the vector is calibrated)}
  ``<prefix>ids``                  set of stored content ids
  ``<prefix>names``                hash name -> content id
  ``<prefix>computations``         hash computation key -> content id
Every write is one MULTI/EXEC under WATCH of what it checked, so concurrent writers
of one vector leave exactly one entry (the first), and a name or a cached computation
never points at a vector that a concurrent delete removed. A put of a vector whose
stored tensors were damaged writes it afresh.
"""
from __future__ import annotations

import redis

from vector_store import codec
from vector_store.base import ListedVector, StoredDataDamaged, StoredVector, VectorNotFound, VectorStore, VectorStoreError


class RedisVectorStore(VectorStore):
    def __init__(self, url: str, prefix: str = "steer:", timeout_s: float | None = None) -> None:
        # redis-py waits 5 s per command by default; a server bounds every call by its own timeout.
        timeouts = {} if timeout_s is None else {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        try:
            self._redis = redis.Redis.from_url(url, **timeouts)
        except ValueError as error:
            raise VectorStoreError(f"bad Redis URL {url!r}: {error}") from None
        self.url = url
        self.prefix = prefix
        self._ids_key = f"{prefix}ids"
        self._names_key = f"{prefix}names"
        self._computations_key = f"{prefix}computations"

    def __repr__(self) -> str:
        return f"RedisVectorStore({self.url!r}, prefix={self.prefix!r})"

    def _vector_key(self, content_id: str) -> str:
        return f"{self.prefix}vector:{content_id}"

    def put(self, vector: StoredVector) -> str:
        entry = codec.encode(vector)
        key = self._vector_key(entry.content_id)

        def write(pipe: redis.client.Pipeline) -> None:
            try:
                stored_tensors = pipe.hget(key, "tensors")
            except redis.ResponseError:  # overwritten with another type: replace it
                stored_tensors = None
            if stored_tensors == entry.tensor_bytes:
                return  # already stored whole; the first writer's `created` stays
            pipe.multi()
            pipe.delete(key)  # new, or damaged: write the entry afresh
            pipe.hset(
                key, mapping={"meta": entry.meta_json, "tensors": entry.tensor_bytes, "sha256": entry.tensor_sha256,
                              "shapes": entry.shapes_json},
            )
            pipe.sadd(self._ids_key, entry.content_id)

        self._redis.transaction(write, key)
        return entry.content_id

    def get(self, content_id: str) -> StoredVector:
        codec.check_content_id(content_id)
        try:
            fields = self._redis.hgetall(self._vector_key(content_id))
        except redis.ResponseError as error:  # the key was overwritten with another type
            raise StoredDataDamaged(f"stored vector {content_id} is corrupted: {error}") from None
        if not fields:
            raise VectorNotFound(f"no vector with id {content_id}")
        try:
            meta_json, tensor_bytes, sha256 = fields[b"meta"], fields[b"tensors"], fields[b"sha256"].decode()
        except (KeyError, UnicodeDecodeError):
            raise StoredDataDamaged(f"stored vector {content_id} is corrupted: fields are missing") from None
        return codec.decode(content_id, meta_json, tensor_bytes, sha256)

    def has(self, content_id: str) -> bool:
        codec.check_content_id(content_id)
        return bool(self._redis.sismember(self._ids_key, content_id))

    def delete(self, content_id: str) -> None:
        codec.check_content_id(content_id)
        key = self._vector_key(content_id)

        def remove(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(key):
                raise VectorNotFound(f"no vector with id {content_id}")
            names = self._keys_pointing_at(pipe, self._names_key, content_id)
            computations = self._keys_pointing_at(pipe, self._computations_key, content_id)
            pipe.multi()
            pipe.delete(key)
            pipe.srem(self._ids_key, content_id)
            if names:
                pipe.hdel(self._names_key, *names)
            if computations:
                pipe.hdel(self._computations_key, *computations)

        self._redis.transaction(remove, key, self._names_key, self._computations_key)

    @staticmethod
    def _keys_pointing_at(pipe: redis.client.Pipeline, hash_key: str, content_id: str) -> list[bytes]:
        return [field for field, target in pipe.hgetall(hash_key).items() if target.decode() == content_id]

    def listing(self) -> list[ListedVector]:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.smembers(self._ids_key)
            pipe.hgetall(self._names_key)
            ids, name_targets = pipe.execute()
        content_ids = sorted(content_id.decode() for content_id in ids)
        names: dict[str, list[str]] = {}
        for name, target in sorted(name_targets.items()):
            names.setdefault(target.decode(), []).append(name.decode())
        with self._redis.pipeline(transaction=False) as pipe:
            for content_id in content_ids:
                pipe.hmget(self._vector_key(content_id), "meta", "shapes")
            fields = pipe.execute(raise_on_error=False)
        listed = []
        for content_id, stored in zip(content_ids, fields):
            if isinstance(stored, redis.ResponseError):
                raise StoredDataDamaged(f"stored vector {content_id} is corrupted ({stored}); delete it")
            meta_json, shapes_json = stored
            if meta_json is not None:  # else deleted since the ids were read
                listed.append(ListedVector(content_id, codec.decode_meta(content_id, meta_json), names.get(content_id, []),
                                           codec.decode_shapes(content_id, shapes_json)))
        return sorted(listed, key=lambda item: (item[1].created, item[0]))

    def set_name(self, name: str, content_id: str) -> None:
        codec.check_name(name)
        self._point_at(self._names_key, name, content_id)

    def name_target(self, name: str) -> str | None:
        if not codec.is_valid_name(name):
            return None  # no such name can have been stored
        target = self._redis.hget(self._names_key, name)
        return target.decode() if target is not None else None

    def delete_name(self, name: str) -> None:
        codec.check_name(name)
        if not self._redis.hdel(self._names_key, name):
            raise VectorNotFound(f"no vector named {name!r}")

    def cached_computation(self, key: str) -> str | None:
        codec.check_computation_key(key)
        target = self._redis.hget(self._computations_key, key)
        return target.decode() if target is not None else None

    def remember_computation(self, key: str, content_id: str) -> None:
        codec.check_computation_key(key)
        self._point_at(self._computations_key, key, content_id)

    def put_calibration(self, content_id: str, calibration: dict) -> dict:
        codec.check_content_id(content_id)
        key = self._vector_key(content_id)
        stored: dict = {}

        def write(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(key):
                raise VectorNotFound(f"no vector with id {content_id}")
            previous = pipe.hget(key, "calibration")
            version = codec.decode_calibration(content_id, previous)["version"] if previous is not None else 0
            stored.update(calibration, version=version + 1)
            pipe.multi()
            pipe.hset(key, "calibration", codec.encode_calibration(stored))

        self._redis.transaction(write, key)
        return stored

    def calibration(self, content_id: str) -> dict | None:
        codec.check_content_id(content_id)
        try:
            body = self._redis.hget(self._vector_key(content_id), "calibration")
        except redis.ResponseError as error:  # the key was overwritten with another type
            raise StoredDataDamaged(f"stored vector {content_id} is corrupted: {error}") from None
        return None if body is None else codec.decode_calibration(content_id, body)

    def _point_at(self, hash_key: str, field: str, content_id: str) -> None:
        """Set ``hash_key[field] = content_id`` only while that vector exists."""
        codec.check_content_id(content_id)
        vector_key = self._vector_key(content_id)

        def write(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(vector_key):
                raise VectorNotFound(f"no vector with id {content_id}")
            pipe.multi()
            pipe.hset(hash_key, field, content_id)

        self._redis.transaction(write, vector_key)
