"""The shared backend: replicas that point at one Redis see the same vectors.

Layout "3" (per-tenant namespaces). Keys under ``prefix`` (default ``steer:``) are global:
  ``<prefix>vector:<content id>``  hash {meta: JSON, tensors: safetensors bytes, sha256,
                                   shapes: JSON layer -> [k, hidden] (absent in older entries)}
  ``<prefix>ids``                  set of stored content ids
  ``<prefix>order-of``             hash content id -> its order key (``base.order_key``:
                                   created, then id)
  ``<prefix>refs-of:<id>``         hash tenant -> the bytes that vector counts in the tenant's
                                   usage: the tenants referencing it (content goes with the last)
  ``<prefix>computations``         hash computation key -> content id
  ``<prefix>computations-of:<id>`` set of the computation keys pointing at it
  ``<prefix>layout``               "3"
and each tenant's keys are under its own prefix: ``<prefix>`` itself for the default tenant
(so the keys of layout 2 already are the default tenant's), ``<prefix>tenant:<tenant>:`` for
the others (a tenant holds no ':', so no tenant's key is another's or a global one):
  ``<tenant prefix>names``         hash name -> content id
  ``<tenant prefix>order``         sorted set, all scores 0 so it is ordered by member: the
                                   order key of every vector the tenant references; a listing
                                   page is one ZRANGE BYLEX ... LIMIT
  ``<tenant prefix>named``         the same, for the vectors some name of the tenant points at
  ``<tenant prefix>names-of:<id>`` set of the tenant's names pointing at that vector
  ``<tenant prefix>calibrations``  hash content id -> the tenant's calibration JSON
  ``<tenant prefix>usage``         hash {vectors, bytes}: counters kept with the references
  ``<tenant prefix>quota:<quota>:<window>``  a rate quota's count in one fixed window (expires)
  ``<tenant prefix>quota:<quota>`` sorted set token -> lease end: a concurrency quota's slots
Every write is one MULTI/EXEC under WATCH of what it checked, indexes included, so concurrent
writers of one vector leave exactly one entry (the first), a name, a reference or a cached
computation never points at a vector that a concurrent delete removed, and the indexes and
usage counters always say what the hashes say. A put of a vector whose stored tensors were
damaged writes it afresh.

Upgrades: the first process of this release to open a store of layout 2 (indexes, no
tenants) or of a release before the indexes (no ``layout`` key) makes every vector, name and
calibration the default tenant's, building the indexes as needed, in one transaction.
Replicas of those releases must be stopped first: they know no tenants, so a vector of any
tenant would be theirs, and one that finds no layout "2" would index the store anew.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import redis

from vector_store import codec
from vector_store.base import (
    DEFAULT_TENANT,
    ListedVector,
    ListingPage,
    StoreLimits,
    StoredDataDamaged,
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

LAYOUT = b"3"
# KEYS[1]: one fixed window's count; ARGV: amount, limit, ms the count outlives its window by.
_CHARGE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# KEYS[1]: sorted set token -> lease end; ARGV: token, limit, now, lease end, ms the set outlives a lease by.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


class _TenantKeys(NamedTuple):
    """One tenant's keys (see the module docstring)."""

    tenant: str
    prefix: str

    @property
    def names(self) -> str:
        return f"{self.prefix}names"

    @property
    def order(self) -> str:
        return f"{self.prefix}order"

    @property
    def named(self) -> str:
        return f"{self.prefix}named"

    @property
    def calibrations(self) -> str:
        return f"{self.prefix}calibrations"

    @property
    def usage(self) -> str:
        return f"{self.prefix}usage"

    def names_of(self, content_id: str) -> str:
        return f"{self.prefix}names-of:{content_id}"


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
        self._computations_key = f"{prefix}computations"
        self._order_of_key = f"{prefix}order-of"
        self._layout_key = f"{prefix}layout"
        self._upgraded = False  # this process has seen the store at LAYOUT

    def __repr__(self) -> str:
        return f"RedisVectorStore({self.url!r}, prefix={self.prefix!r})"

    def _tenant(self, tenant: str) -> _TenantKeys:
        check_tenant(tenant)
        return _TenantKeys(tenant, self.prefix if tenant == DEFAULT_TENANT else f"{self.prefix}tenant:{tenant}:")

    def _vector_key(self, content_id: str) -> str:
        return f"{self.prefix}vector:{content_id}"

    def _refs_key(self, content_id: str) -> str:
        return f"{self.prefix}refs-of:{content_id}"

    def _computations_of_key(self, content_id: str) -> str:
        return f"{self.prefix}computations-of:{content_id}"

    # -- a store written by an earlier release

    def _ensure_layout(self) -> None:
        """Upgrade the store once (the first process to look does it; one GET per process after that)."""
        if self._upgraded:
            return
        if self._redis.get(self._layout_key) != LAYOUT:
            self._redis.transaction(self._upgrade, self._layout_key, self._ids_key, f"{self.prefix}names",
                                    self._computations_key)
        self._upgraded = True

    def _upgrade(self, pipe: redis.client.Pipeline) -> None:
        """Make every vector, name and calibration the default tenant's and index them, in one
        MULTI/EXEC under WATCH of the layout, ids, names and computations: an earlier release's
        every write changes one of the last three (so a write made meanwhile makes it start
        again, and it never indexes an entry that is gone), and another replica finishing the
        upgrade changes the layout, after which this one must write nothing (writes of layout 3
        may have followed). Idempotent besides, so replicas that upgrade at once agree."""
        if pipe.get(self._layout_key) == LAYOUT:
            return
        default = self._tenant(DEFAULT_TENANT)
        content_ids = sorted(member.decode() for member in pipe.smembers(self._ids_key))
        name_targets = pipe.hgetall(default.names)
        computation_targets = pipe.hgetall(self._computations_key)
        with self._redis.pipeline(transaction=False) as reads:  # reads on another connection leave the WATCH be
            for content_id in content_ids:
                reads.hmget(self._vector_key(content_id), "meta", "calibration")
                reads.hstrlen(self._vector_key(content_id), "tensors")
            replies = reads.execute(raise_on_error=False)
        orders, sizes, calibrations = {}, {}, {}
        for content_id, stored, size in zip(content_ids, replies[0::2], replies[1::2]):
            meta_json, calibration = (None, None) if isinstance(stored, redis.ResponseError) else stored
            try:  # an entry whose meta cannot be read is listed first, where reading it says it is damaged
                created = codec.decode_meta(content_id, meta_json).created
            except (VectorStoreError, TypeError, AttributeError):
                created = 0.0
            orders[content_id] = order_key(created, content_id)
            sizes[content_id] = 0 if isinstance(size, redis.ResponseError) else size
            if calibration is not None:
                calibrations[content_id] = calibration
        pipe.multi()
        if orders:
            pipe.zadd(default.order, dict.fromkeys(orders.values(), 0))
            pipe.hset(self._order_of_key, mapping=orders)
        for content_id, size in sizes.items():
            pipe.hset(self._refs_key(content_id), DEFAULT_TENANT, size)
        if calibrations:  # a calibration was a field of the vector; now each tenant has its own
            pipe.hset(default.calibrations, mapping=calibrations)
            for content_id in calibrations:
                pipe.hdel(self._vector_key(content_id), "calibration")
        pipe.hset(default.usage, mapping={"vectors": len(sizes), "bytes": sum(sizes.values())})
        for targets, reverse, named in ((name_targets, default.names_of, True),
                                        (computation_targets, self._computations_of_key, False)):
            fields: dict[str, list[bytes]] = {}
            for field, target in targets.items():
                if target.decode() in orders:
                    fields.setdefault(target.decode(), []).append(field)
            for content_id, pointing in fields.items():
                pipe.sadd(reverse(content_id), *pointing)
            if named and fields:
                pipe.zadd(default.named, {orders[content_id]: 0 for content_id in fields})
        pipe.set(self._layout_key, LAYOUT)

    # -- vectors and references

    def put(self, vector: StoredVector, *, tenant: str = DEFAULT_TENANT, limits: StoreLimits | None = None) -> str:
        keys = self._tenant(tenant)
        entry = codec.encode(vector)
        key, refs = self._vector_key(entry.content_id), self._refs_key(entry.content_id)
        order = order_key(entry.created, entry.content_id)
        self._ensure_layout()

        def write(pipe: redis.client.Pipeline) -> None:
            try:
                stored_tensors = pipe.hget(key, "tensors")
            except redis.ResponseError:  # overwritten with another type: replace it
                stored_tensors = None
            referenced = pipe.hexists(refs, tenant)
            if limits is not None and not referenced:
                limits.check(self._usage(pipe, keys), len(entry.tensor_bytes))
            if stored_tensors == entry.tensor_bytes:  # already stored whole; the first writer's `created` stays
                if not referenced:
                    stored_order = pipe.hget(self._order_of_key, entry.content_id)
                    pipe.multi()
                    self._add_reference(pipe, keys, entry.content_id, stored_order, len(entry.tensor_bytes))
                return
            # New, or damaged: write the entry afresh, moving it to its new place in the listing
            # of every tenant that references it.
            previous = pipe.hget(self._order_of_key, entry.content_id)
            referencing = [self._tenant(t.decode()) for t in pipe.hkeys(refs)] if previous is not None else []
            if referencing:  # their named indexes follow these
                pipe.watch(*(t.names_of(entry.content_id) for t in referencing))
            named = [t for t in referencing if pipe.exists(t.names_of(entry.content_id))]
            pipe.multi()
            pipe.delete(key)
            pipe.hset(
                key, mapping={"meta": entry.meta_json, "tensors": entry.tensor_bytes, "sha256": entry.tensor_sha256,
                              "shapes": entry.shapes_json},
            )
            pipe.sadd(self._ids_key, entry.content_id)
            pipe.hset(self._order_of_key, entry.content_id, order)
            for referrer in referencing:
                pipe.zrem(referrer.order, previous)
                pipe.zadd(referrer.order, {order: 0})
            for referrer in named:
                pipe.zrem(referrer.named, previous)
                pipe.zadd(referrer.named, {order: 0})
            if not referenced:
                self._add_reference(pipe, keys, entry.content_id, order, len(entry.tensor_bytes))

        # The order key of this id changes only with its entry; who references it, with its refs;
        # the usage a limit was checked against, with the tenant's usage.
        self._redis.transaction(write, key, refs, keys.usage)
        return entry.content_id

    def add_reference(self, content_id: str, *, tenant: str = DEFAULT_TENANT, limits: StoreLimits | None = None) -> None:
        keys = self._tenant(tenant)
        codec.check_content_id(content_id)
        key, refs = self._vector_key(content_id), self._refs_key(content_id)
        self._ensure_layout()

        def write(pipe: redis.client.Pipeline) -> None:
            if pipe.hexists(refs, tenant):
                return
            try:
                size = pipe.hstrlen(key, "tensors")
            except redis.ResponseError as error:  # the key was overwritten with another type
                raise StoredDataDamaged(f"stored vector {content_id} is corrupted: {error}") from None
            if not size:
                raise VectorNotFound(f"no vector with id {content_id}")
            if limits is not None:
                limits.check(self._usage(pipe, keys), size)
            stored_order = pipe.hget(self._order_of_key, content_id)
            pipe.multi()
            self._add_reference(pipe, keys, content_id, stored_order, size)

        self._redis.transaction(write, key, refs, keys.usage)

    def _add_reference(self, pipe: redis.client.Pipeline, keys: _TenantKeys, content_id: str,
                       order: str | bytes | None, size: int) -> None:
        """Queue the tenant's reference to a stored vector, counting ``size`` bytes in its usage."""
        pipe.hset(self._refs_key(content_id), keys.tenant, size)
        if order is not None:
            pipe.zadd(keys.order, {order: 0})
        pipe.hincrby(keys.usage, "vectors", 1)
        pipe.hincrby(keys.usage, "bytes", size)

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

    def has(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> bool:
        check_tenant(tenant)
        codec.check_content_id(content_id)
        self._ensure_layout()
        return bool(self._redis.hexists(self._refs_key(content_id), tenant))

    def delete(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        keys = self._tenant(tenant)
        codec.check_content_id(content_id)
        refs, names_of = self._refs_key(content_id), keys.names_of(content_id)
        computations_of = self._computations_of_key(content_id)
        self._ensure_layout()

        def remove(pipe: redis.client.Pipeline) -> None:
            counted = pipe.hget(refs, tenant)
            if counted is None:
                raise VectorNotFound(f"no vector with id {content_id}")
            last = pipe.hlen(refs) == 1
            names = pipe.smembers(names_of)
            computations = pipe.smembers(computations_of) if last else set()
            order = pipe.hget(self._order_of_key, content_id)
            pipe.multi()
            pipe.hdel(refs, tenant)
            pipe.delete(names_of)
            if names:
                pipe.hdel(keys.names, *names)
            if order is not None:
                pipe.zrem(keys.order, order)
                pipe.zrem(keys.named, order)
            pipe.hdel(keys.calibrations, content_id)
            pipe.hincrby(keys.usage, "vectors", -1)
            pipe.hincrby(keys.usage, "bytes", -int(counted))
            if last:  # no tenant references the content any longer: collect it
                pipe.delete(self._vector_key(content_id), computations_of)
                pipe.srem(self._ids_key, content_id)
                pipe.hdel(self._order_of_key, content_id)
                if computations:
                    pipe.hdel(self._computations_key, *computations)

        # A reference, a name or a computation comes or goes only by changing one of these; the
        # order key, only by rewriting the entry.
        self._redis.transaction(remove, refs, names_of, computations_of, self._vector_key(content_id))

    def listing_page(self, limit: int, after: str | None = None, named_only: bool = False, *,
                     tenant: str = DEFAULT_TENANT) -> ListingPage:
        keys = self._tenant(tenant)
        check_page_limit(limit)
        if after is not None:
            parse_order_key(after)
        self._ensure_layout()
        index = keys.named if named_only else keys.order
        page_keys = [key.decode() for key in self._redis.zrange(index, "-" if after is None else f"({after}", "+",
                                                                   bylex=True, offset=0, num=limit + 1)]
        page = [parse_order_key(key)[1] for key in page_keys[:limit]]
        with self._redis.pipeline(transaction=True) as pipe:  # each entry and its names as of one instant
            for content_id in page:
                pipe.hmget(self._vector_key(content_id), "meta", "shapes")
                pipe.smembers(keys.names_of(content_id))
            replies = pipe.execute(raise_on_error=False)
        entries = []
        for content_id, stored, names in zip(page, replies[0::2], replies[1::2]):
            if isinstance(stored, redis.ResponseError):
                raise StoredDataDamaged(f"stored vector {content_id} is corrupted ({stored}); delete it")
            meta_json, shapes_json = stored
            if meta_json is not None:  # else collected since the page was read
                entries.append(ListedVector(content_id, codec.decode_meta(content_id, meta_json),
                                            sorted(name.decode() for name in names),
                                            codec.decode_shapes(content_id, shapes_json)))
        return ListingPage(entries, page_keys[limit - 1] if len(page_keys) > limit else None)

    def names_of(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> list[str]:
        keys = self._tenant(tenant)
        codec.check_content_id(content_id)
        self._ensure_layout()
        return sorted(name.decode() for name in self._redis.smembers(keys.names_of(content_id)))

    def usage(self, *, tenant: str = DEFAULT_TENANT) -> TenantUsage:
        keys = self._tenant(tenant)
        self._ensure_layout()
        return self._usage(self._redis, keys)

    @staticmethod
    def _usage(client: redis.Redis | redis.client.Pipeline, keys: _TenantKeys) -> TenantUsage:
        vectors, size = client.hmget(keys.usage, "vectors", "bytes")
        return TenantUsage(int(vectors or 0), int(size or 0))

    # -- quota counters, shared by every replica on this Redis (each one script: atomic)

    def _counter_key(self, tenant: str, quota: str) -> str:
        return f"{self._tenant(tenant).prefix}quota:{quota}"

    def charge(self, tenant: str, quota: str, amount: int, limit: int, window_s: float) -> float | None:
        now = time.time()
        window = int(now // window_s)
        counted = self._redis.eval(_CHARGE, 1, f"{self._counter_key(tenant, quota)}:{window}", amount, limit,
                                   int(window_s * 2000))
        return None if counted else (window + 1) * window_s - now

    def acquire(self, tenant: str, quota: str, token: str, limit: int, lease_s: float) -> bool:
        now = time.time()
        return bool(self._redis.eval(_ACQUIRE, 1, self._counter_key(tenant, quota), token, limit, now, now + lease_s,
                                     int(lease_s * 1000)))

    def release(self, tenant: str, quota: str, token: str) -> None:
        self._redis.zrem(self._counter_key(tenant, quota), token)

    # -- names and computations

    def set_name(self, name: str, content_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        keys = self._tenant(tenant)
        codec.check_name(name)
        codec.check_content_id(content_id)
        refs = self._refs_key(content_id)
        self._ensure_layout()

        def write(pipe: redis.client.Pipeline) -> None:
            if not pipe.hexists(refs, tenant):
                raise VectorNotFound(f"no vector with id {content_id}")
            unlink = self._watch_link(pipe, keys.names, keys.names_of, name, named=keys.named, unless=content_id)
            order = pipe.hget(self._order_of_key, content_id)
            pipe.multi()
            pipe.hset(keys.names, name, content_id)
            pipe.sadd(keys.names_of(content_id), name)
            if order is not None:
                pipe.zadd(keys.named, {order: 0})
            if unlink is not None:
                unlink()

        # The order key changes only by rewriting the entry.
        self._redis.transaction(write, refs, self._vector_key(content_id))

    def name_target(self, name: str, *, tenant: str = DEFAULT_TENANT) -> str | None:
        keys = self._tenant(tenant)
        if not codec.is_valid_name(name):
            return None  # no such name can have been stored
        target = self._redis.hget(keys.names, name)
        return target.decode() if target is not None else None

    def delete_name(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        keys = self._tenant(tenant)
        codec.check_name(name)
        self._ensure_layout()

        def remove(pipe: redis.client.Pipeline) -> None:
            unlink = self._watch_link(pipe, keys.names, keys.names_of, name, named=keys.named)
            if unlink is None:
                raise VectorNotFound(f"no vector named {name!r}")
            pipe.multi()
            pipe.hdel(keys.names, name)
            unlink()

        self._redis.transaction(remove, keys.names)  # (a watch first: the pipeline reads at once)

    def cached_computation(self, key: str) -> str | None:
        codec.check_computation_key(key)
        target = self._redis.hget(self._computations_key, key)
        return target.decode() if target is not None else None

    def remember_computation(self, key: str, content_id: str) -> None:
        codec.check_computation_key(key)
        codec.check_content_id(content_id)
        vector_key = self._vector_key(content_id)
        self._ensure_layout()

        def write(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(vector_key):
                raise VectorNotFound(f"no vector with id {content_id}")
            unlink = self._watch_link(pipe, self._computations_key, self._computations_of_key, key, unless=content_id)
            pipe.multi()
            pipe.hset(self._computations_key, key, content_id)
            pipe.sadd(self._computations_of_key(content_id), key)
            if unlink is not None:
                unlink()

        self._redis.transaction(write, vector_key)

    def put_calibration(self, content_id: str, calibration: dict, *, tenant: str = DEFAULT_TENANT) -> dict:
        keys = self._tenant(tenant)
        codec.check_content_id(content_id)
        refs = self._refs_key(content_id)
        self._ensure_layout()
        stored: dict = {}

        def write(pipe: redis.client.Pipeline) -> None:
            if not pipe.hexists(refs, tenant):
                raise VectorNotFound(f"no vector with id {content_id}")
            previous = pipe.hget(keys.calibrations, content_id)
            version = codec.decode_calibration(content_id, previous)["version"] if previous is not None else 0
            stored.update(calibration, version=version + 1)
            body = codec.encode_calibration(stored)
            pipe.multi()
            pipe.hset(keys.calibrations, content_id, body)

        # The reference goes with a delete, the previous version with any calibration write.
        self._redis.transaction(write, refs, keys.calibrations)
        return stored

    def calibration(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> dict | None:
        keys = self._tenant(tenant)
        codec.check_content_id(content_id)
        self._ensure_layout()
        try:
            body = self._redis.hget(keys.calibrations, content_id)
        except redis.ResponseError as error:  # the key was overwritten with another type
            raise StoredDataDamaged(f"stored calibrations of tenant {tenant} are corrupted: {error}") from None
        return None if body is None else codec.decode_calibration(content_id, body)

    def _watch_link(self, pipe: redis.client.Pipeline, hash_key: str, reverse: Callable[[str], str], field: str, *,
                    named: str | None = None, unless: str | None = None) -> Callable[[], None] | None:
        """Where ``hash_key[field]`` points now, watched until the transaction commits; returns
        what queues its removal from that vector's reverse index (and, for the last field of a
        vector, the vector's removal from the index ``named``), or None if it points nowhere
        (or at ``unless``)."""
        target = pipe.hget(hash_key, field)
        if target is None or target.decode() == unless:
            return None
        previous = target.decode()
        # Any change of the field away from `previous`, a delete of `previous` included, changes
        # previous's reverse index; its order key changes only with its entry.
        pipe.watch(reverse(previous), self._vector_key(previous))
        if pipe.hget(hash_key, field) != target:
            pipe.reset()  # drop the watches; transaction() starts again
            raise redis.WatchError("moved before it was watched")
        order = None
        if named is not None and pipe.scard(reverse(previous)) <= 1:
            order = pipe.hget(self._order_of_key, previous)

        def unlink() -> None:
            pipe.srem(reverse(previous), field)
            if order is not None:
                pipe.zrem(named, order)

        return unlink
