"""The shared backend: replicas that point at one Redis see the same vectors.

Keys, all under ``prefix`` (default ``steer:``):
  ``<prefix>vector:<content id>``  hash {meta: JSON, tensors: safetensors bytes, sha256,
                                   shapes: JSON layer -> [k, hidden] (absent in older entries),
                                   calibration: JSON (absent until the vector is calibrated)}
  ``<prefix>ids``                  set of stored content ids
  ``<prefix>names``                hash name -> content id
  ``<prefix>computations``         hash computation key -> content id
and the indexes that keep listing and name lookups O(page) / O(names of one vector):
  ``<prefix>order``                sorted set, all scores 0 so it is ordered by member: the
                                   order key (``base.order_key``: created, then id) of every
                                   stored vector; a listing page is one ZRANGE BYLEX ... LIMIT
  ``<prefix>named``                the same, for the vectors some name points at
  ``<prefix>order-of``             hash content id -> its order key
  ``<prefix>names-of:<id>``        set of the names pointing at that vector
  ``<prefix>computations-of:<id>`` set of the computation keys pointing at it
  ``<prefix>layout``               "2" once those indexes cover every entry (a store written by
                                   an earlier release has none: the first use builds them, so
                                   replicas of that release should not write to it afterwards)
Every write is one MULTI/EXEC under WATCH of what it checked, indexes included, so concurrent
writers of one vector leave exactly one entry (the first), a name or a cached computation
never points at a vector that a concurrent delete removed, and the indexes always say what
the hashes say. A put of a vector whose stored tensors were damaged writes it afresh.
"""
from __future__ import annotations

from collections.abc import Callable

import redis

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

LAYOUT = b"2"


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
        self._order_key = f"{prefix}order"
        self._named_key = f"{prefix}named"
        self._order_of_key = f"{prefix}order-of"
        self._layout_key = f"{prefix}layout"
        self._indexed = False  # this process has seen the indexes built

    def __repr__(self) -> str:
        return f"RedisVectorStore({self.url!r}, prefix={self.prefix!r})"

    def _vector_key(self, content_id: str) -> str:
        return f"{self.prefix}vector:{content_id}"

    def _names_of_key(self, content_id: str) -> str:
        return f"{self.prefix}names-of:{content_id}"

    def _computations_of_key(self, content_id: str) -> str:
        return f"{self.prefix}computations-of:{content_id}"

    # -- the indexes of a store written by an earlier release

    def _ensure_indexed(self) -> None:
        """Build the indexes once per store (the first process to look builds them; one GET
        per process after that)."""
        if self._indexed:
            return
        if self._redis.get(self._layout_key) != LAYOUT:
            self._redis.transaction(self._build_indexes, self._ids_key, self._names_key, self._computations_key)
        self._indexed = True

    def _build_indexes(self, pipe: redis.client.Pipeline) -> None:
        """Index every vector, name and computation in one MULTI/EXEC under WATCH of the ids,
        names and computations: every write changes one of them, so a write made meanwhile
        makes it start again, and it never indexes an entry that is gone. Idempotent, so
        replicas that build at once agree."""
        content_ids = sorted(member.decode() for member in pipe.smembers(self._ids_key))
        name_targets = pipe.hgetall(self._names_key)
        computation_targets = pipe.hgetall(self._computations_key)
        with self._redis.pipeline(transaction=False) as reads:  # reads on another connection leave the WATCH be
            for content_id in content_ids:
                reads.hget(self._vector_key(content_id), "meta")
            metas = reads.execute(raise_on_error=False)
        orders = {}
        for content_id, meta_json in zip(content_ids, metas):
            try:  # an entry whose meta cannot be read is listed first, where reading it says it is damaged
                created = codec.decode_meta(content_id, meta_json).created
            except (redis.ResponseError, VectorStoreError, TypeError, AttributeError):
                created = 0.0
            orders[content_id] = order_key(created, content_id)
        pipe.multi()
        if orders:
            pipe.zadd(self._order_key, dict.fromkeys(orders.values(), 0))
            pipe.hset(self._order_of_key, mapping=orders)
        for targets, reverse, named in ((name_targets, self._names_of_key, True),
                                        (computation_targets, self._computations_of_key, False)):
            fields: dict[str, list[bytes]] = {}
            for field, target in targets.items():
                if target.decode() in orders:
                    fields.setdefault(target.decode(), []).append(field)
            for content_id, pointing in fields.items():
                pipe.sadd(reverse(content_id), *pointing)
            if named and fields:
                pipe.zadd(self._named_key, {orders[content_id]: 0 for content_id in fields})
        pipe.set(self._layout_key, LAYOUT)

    # -- vectors

    def put(self, vector: StoredVector) -> str:
        entry = codec.encode(vector)
        key = self._vector_key(entry.content_id)
        names_of = self._names_of_key(entry.content_id)
        order = order_key(entry.created, entry.content_id)
        self._ensure_indexed()

        def write(pipe: redis.client.Pipeline) -> None:
            try:
                stored_tensors = pipe.hget(key, "tensors")
            except redis.ResponseError:  # overwritten with another type: replace it
                stored_tensors = None
            if stored_tensors == entry.tensor_bytes:
                return  # already stored whole; the first writer's `created` stays
            previous = pipe.hget(self._order_of_key, entry.content_id)  # a damaged entry's place in the listing
            named = pipe.exists(names_of)
            pipe.multi()
            pipe.delete(key)  # new, or damaged: write the entry afresh
            pipe.hset(
                key, mapping={"meta": entry.meta_json, "tensors": entry.tensor_bytes, "sha256": entry.tensor_sha256,
                              "shapes": entry.shapes_json},
            )
            pipe.sadd(self._ids_key, entry.content_id)
            if previous is not None:
                pipe.zrem(self._order_key, previous)
                pipe.zrem(self._named_key, previous)
            pipe.hset(self._order_of_key, entry.content_id, order)
            pipe.zadd(self._order_key, {order: 0})
            if named:
                pipe.zadd(self._named_key, {order: 0})

        # The order key and the named index of this id change only with its entry or its names.
        self._redis.transaction(write, key, names_of)
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
        names_of, computations_of = self._names_of_key(content_id), self._computations_of_key(content_id)
        self._ensure_indexed()

        def remove(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(key):
                raise VectorNotFound(f"no vector with id {content_id}")
            names = pipe.smembers(names_of)
            computations = pipe.smembers(computations_of)
            order = pipe.hget(self._order_of_key, content_id)
            pipe.multi()
            pipe.delete(key, names_of, computations_of)
            pipe.srem(self._ids_key, content_id)
            pipe.hdel(self._order_of_key, content_id)
            if order is not None:
                pipe.zrem(self._order_key, order)
                pipe.zrem(self._named_key, order)
            if names:
                pipe.hdel(self._names_key, *names)
            if computations:
                pipe.hdel(self._computations_key, *computations)

        # A name or computation moves to or from this vector only by changing its reverse index.
        self._redis.transaction(remove, key, names_of, computations_of)

    def listing_page(self, limit: int, after: str | None = None, named_only: bool = False) -> ListingPage:
        check_page_limit(limit)
        if after is not None:
            parse_order_key(after)
        self._ensure_indexed()
        index = self._named_key if named_only else self._order_key
        keys = [key.decode() for key in self._redis.zrange(index, "-" if after is None else f"({after}", "+",
                                                              bylex=True, offset=0, num=limit + 1)]
        page = [parse_order_key(key)[1] for key in keys[:limit]]
        with self._redis.pipeline(transaction=True) as pipe:  # each entry and its names as of one instant
            for content_id in page:
                pipe.hmget(self._vector_key(content_id), "meta", "shapes")
                pipe.smembers(self._names_of_key(content_id))
            replies = pipe.execute(raise_on_error=False)
        entries = []
        for content_id, stored, names in zip(page, replies[0::2], replies[1::2]):
            if isinstance(stored, redis.ResponseError):
                raise StoredDataDamaged(f"stored vector {content_id} is corrupted ({stored}); delete it")
            meta_json, shapes_json = stored
            if meta_json is not None:  # else deleted since the page was read
                entries.append(ListedVector(content_id, codec.decode_meta(content_id, meta_json),
                                            sorted(name.decode() for name in names),
                                            codec.decode_shapes(content_id, shapes_json)))
        return ListingPage(entries, keys[limit - 1] if len(keys) > limit else None)

    def names_of(self, content_id: str) -> list[str]:
        codec.check_content_id(content_id)
        self._ensure_indexed()
        return sorted(name.decode() for name in self._redis.smembers(self._names_of_key(content_id)))

    # -- names and computations

    def set_name(self, name: str, content_id: str) -> None:
        codec.check_name(name)
        self._point_at(self._names_key, self._names_of_key, name, content_id, named=True)

    def name_target(self, name: str) -> str | None:
        if not codec.is_valid_name(name):
            return None  # no such name can have been stored
        target = self._redis.hget(self._names_key, name)
        return target.decode() if target is not None else None

    def delete_name(self, name: str) -> None:
        codec.check_name(name)
        self._ensure_indexed()

        def remove(pipe: redis.client.Pipeline) -> None:
            unlink = self._watch_link(pipe, self._names_key, self._names_of_key, name, named=True)
            if unlink is None:
                raise VectorNotFound(f"no vector named {name!r}")
            pipe.multi()
            pipe.hdel(self._names_key, name)
            unlink()

        self._redis.transaction(remove, self._names_key)  # (a watch first: the pipeline reads at once)

    def cached_computation(self, key: str) -> str | None:
        codec.check_computation_key(key)
        target = self._redis.hget(self._computations_key, key)
        return target.decode() if target is not None else None

    def remember_computation(self, key: str, content_id: str) -> None:
        codec.check_computation_key(key)
        self._point_at(self._computations_key, self._computations_of_key, key, content_id, named=False)

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

    def _point_at(self, hash_key: str, reverse: Callable[[str], str], field: str, content_id: str, *,
                  named: bool) -> None:
        """Set ``hash_key[field] = content_id`` only while that vector exists, moving ``field``
        from the reverse index of the vector it pointed at to this one's (``named``: and
        keeping the named index to the vectors some name points at)."""
        codec.check_content_id(content_id)
        vector_key = self._vector_key(content_id)
        self._ensure_indexed()

        def write(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(vector_key):
                raise VectorNotFound(f"no vector with id {content_id}")
            unlink = self._watch_link(pipe, hash_key, reverse, field, named=named, unless=content_id)
            order = pipe.hget(self._order_of_key, content_id) if named else None
            pipe.multi()
            pipe.hset(hash_key, field, content_id)
            pipe.sadd(reverse(content_id), field)
            if order is not None:
                pipe.zadd(self._named_key, {order: 0})
            if unlink is not None:
                unlink()

        self._redis.transaction(write, vector_key)

    def _watch_link(self, pipe: redis.client.Pipeline, hash_key: str, reverse: Callable[[str], str], field: str, *,
                    named: bool, unless: str | None = None) -> Callable[[], None] | None:
        """Where ``hash_key[field]`` points now, watched until the transaction commits; returns
        what queues its removal from that vector's reverse index (and, for its last name, the
        vector's removal from the named index), or None if it points nowhere (or at ``unless``)."""
        target = pipe.hget(hash_key, field)
        if target is None or target.decode() == unless:
            return None
        previous = target.decode()
        # Any change of the field away from `previous` changes previous's reverse index.
        pipe.watch(reverse(previous), self._vector_key(previous))
        if pipe.hget(hash_key, field) != target:
            pipe.reset()  # drop the watches; transaction() starts again
            raise redis.WatchError("moved before it was watched")
        order = None
        if named and pipe.scard(reverse(previous)) <= 1:
            order = pipe.hget(self._order_of_key, previous)

        def unlink() -> None:
            pipe.srem(reverse(previous), field)
            if order is not None:
                pipe.zrem(self._named_key, order)

        return unlink
