"""The store's data model and the interface both backends implement.

A stored vector holds one direction tensor per layer, each shaped ``[k, hidden]``:
k = 1 for a constant vector, k = token length of the steering prompt for an ActAdd
sequence. Layer L is the residual stream *entering* decoder block L (Hugging Face's
``hidden_states[L]``). Its content id hashes the tensors and the metadata that
defines them, so the same content always has the same id and an id never changes
meaning.
"""
from __future__ import annotations

import abc
import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch


def shown(value: object, limit: int = 64) -> str:
    """``repr`` of a client's value for an error message, cut short: a 10k-character name
    is not echoed back whole."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


def layer_outside(layer: int, num_layers: int) -> str | None:
    """None if ``layer`` is a stream of a model with ``num_layers`` blocks (0 = the
    embeddings .. num_layers = after the last block), else why not ("L is outside 0..N"),
    for the caller's own error. The one range check of the server, the engine plugin and
    the vector computer."""
    if 0 <= layer <= num_layers:
        return None
    return f"{layer} is outside 0..{num_layers}"


class VectorStoreError(ValueError):
    """Bad input to the store; the message names what is wrong."""


class StoredDataDamaged(VectorStoreError):
    """The store holds an entry whose bytes are missing or no longer match its id: a fault
    of the store, not of the request that asked for it."""


class StoreUnavailable(RuntimeError):
    """The store did not answer (connection refused or lost, timeout, locked database)."""


class VectorNotFound(KeyError):
    """No vector with that name or content id (in the caller's tenant: another tenant's
    vector is not found, whether or not it exists)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "vector not found"


@dataclass(frozen=True)
class VectorMeta:
    """What a vector is for and where it came from (hashed into the content id,
    except ``created`` and ``stats``)."""

    model_fingerprint: str
    hidden_size: int
    kind: str  # "actadd" (a per-position sequence) or "constant" (k = 1)
    # how it was made: actadd | last_token_diff | mean_diff | pca_diff | pca_center | upload | gguf
    method: str = "upload"
    source: dict = field(default_factory=dict)  # prompts, coefficients, pad token, ...
    created: float = 0.0
    # Per layer ("12"), what a vector made from examples measured on them: "norm", "separation",
    # "midpoint" and, for the PCA methods, "explained_variance" (vector_store.compute.LayerStats).
    stats: dict = field(default_factory=dict)

    def hashed_fields(self) -> dict:
        """The fields that define the content. ``stats`` is left out: it describes the tensors,
        computed from the same examples the source names, so hashing it would only have
        changed the id of every vector stored before it existed."""
        fields = asdict(self)
        fields.pop("created")
        fields.pop("stats")
        return fields


@dataclass(frozen=True)
class StoredVector:
    meta: VectorMeta
    directions: dict[int, torch.Tensor]  # layer -> float32 [k, hidden]

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def content_id(self) -> str:
        return content_id_of(self.meta, self.directions)


def content_id_of(meta: VectorMeta, directions: dict[int, torch.Tensor]) -> str:
    """sha256 over the canonical metadata and each layer's float32 bytes, in layer order."""
    digest = hashlib.sha256()
    digest.update(json.dumps(meta.hashed_fields(), sort_keys=True).encode())
    for layer in sorted(directions):
        tensor = directions[layer].detach().to(torch.float32).contiguous().cpu()
        digest.update(f"|{layer}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return "v-" + digest.hexdigest()[:40]


DEFAULT_TENANT = "default"
TENANT_RULE = "1-64 characters of A-Z a-z 0-9 . _ -"
_TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_tenant(tenant: object) -> str:
    """A tenant's name as keys files and stores hold it; VectorStoreError naming the rule if not one."""
    if not isinstance(tenant, str) or not _TENANT_PATTERN.fullmatch(tenant):
        raise VectorStoreError(f"bad tenant {shown(tenant)}: a tenant is {TENANT_RULE}")
    return tenant


class TenantUsage(NamedTuple):
    """What one tenant holds: the vectors it references and their tensors' stored bytes
    (content shared with other tenants counts for each of them)."""

    vectors: int
    bytes: int


class QuotaExceeded(Exception):
    """A tenant is at one of its quotas; ``quota`` names it, ``limit`` is its value, and
    ``retry_after_s`` says when a rate frees up (None: waiting does not help)."""

    def __init__(self, quota: str, limit: int, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.quota, self.limit, self.retry_after_s = quota, limit, retry_after_s


class StoreLimits(NamedTuple):
    """A tenant's ceilings on what it stores (None: no limit), checked in the same write that
    would pass them."""

    vectors: int | None = None
    bytes: int | None = None

    def check(self, usage: TenantUsage, adding_bytes: int) -> None:
        """QuotaExceeded if one more vector of ``adding_bytes`` would pass a ceiling."""
        if self.vectors is not None and usage.vectors + 1 > self.vectors:
            raise QuotaExceeded("vectors", self.vectors, f"quota 'vectors': the tenant stores {usage.vectors} "
                                f"vectors, its limit is {self.vectors}; delete some to store more")
        if self.bytes is not None and usage.bytes + adding_bytes > self.bytes:
            raise QuotaExceeded("bytes", self.bytes, f"quota 'bytes': the tenant stores {usage.bytes} bytes and this "
                                f"vector is {adding_bytes} more, over its limit of {self.bytes}")


class ListedVector(NamedTuple):
    """One vector as a listing shows it, read without its tensors."""

    content_id: str
    meta: VectorMeta
    names: list[str]
    shapes: dict[int, list[int]] | None  # layer -> [k, hidden]; None: stored before shapes were kept


class ListingPage(NamedTuple):
    """One page of a listing, oldest first; ``next_cursor``: pass it as ``after`` for the next
    page, None when this page is the last."""

    entries: list[ListedVector]
    next_cursor: str | None


_ORDER_KEY = re.compile(r"^([0-9a-f]{16}):(v-[0-9a-f]{40})$")


def order_key(created: float, content_id: str) -> str:
    """A string that sorts as (created, content id) does: ``created``'s IEEE-754 bits made
    order-preserving (sign flipped, negatives inverted) in hex, then the id. Listings are
    ordered by it and a page's cursor is its last entry's key (so a cursor is exact: no
    float is rounded through text)."""
    (bits,) = struct.unpack(">Q", struct.pack(">d", created))
    bits = bits ^ 0xFFFF_FFFF_FFFF_FFFF if bits >> 63 else bits | 1 << 63
    return f"{bits:016x}:{content_id}"


def parse_order_key(key: object) -> tuple[float, str]:
    """A cursor -> (created, content id); VectorStoreError if it is not one this store gave."""
    match = _ORDER_KEY.match(key) if isinstance(key, str) else None
    if match is None:
        raise VectorStoreError(f"not a listing cursor: {str(key)[:80]!r} (pass a next_cursor back unchanged)")
    bits = int(match[1], 16)
    bits = bits & ~(1 << 63) if bits >> 63 else bits ^ 0xFFFF_FFFF_FFFF_FFFF
    (created,) = struct.unpack(">d", struct.pack(">Q", bits))
    if created != created:  # NaN: no vector's key
        raise VectorStoreError(f"not a listing cursor: {key[:80]!r} (pass a next_cursor back unchanged)")
    return created, match[2]


def check_page_limit(limit: object) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise VectorStoreError(f"a page holds at least 1 vector, got limit {limit!r}")
    return limit


class VectorStore(abc.ABC):
    """Content-addressed vectors, the tenants that reference them, each tenant's names, a
    cache of computed contrast pairs, and each tenant's calibrated default per vector
    (``steer_server.serving.calibration``).

    Content is stored once, whoever stores it (same tensors and metadata, same id); a tenant
    sees only the vectors it references: those it stored, imported or computed (a computation
    cache hit adds the reference). Every method that takes ``tenant`` answers as if the other
    tenants' vectors did not exist. Content no tenant references any longer is collected.
    ``get`` alone reads by content id without a tenant: for the engine and tools, after the
    request's tenant was checked (``resolve``, ``has``). Writes are atomic: a reader sees a
    whole entry or none."""

    @abc.abstractmethod
    def put(self, vector: StoredVector, *, tenant: str = DEFAULT_TENANT, limits: StoreLimits | None = None) -> str:
        """Store (idempotent), add the tenant's reference, and return the content id;
        QuotaExceeded (nothing written) if a new reference would pass ``limits``."""

    @abc.abstractmethod
    def add_reference(self, content_id: str, *, tenant: str = DEFAULT_TENANT, limits: StoreLimits | None = None) -> None:
        """Make a stored vector the tenant's too (idempotent); VectorNotFound if not stored,
        QuotaExceeded if a new reference would pass ``limits``."""

    @abc.abstractmethod
    def get(self, content_id: str) -> StoredVector:
        """Raise VectorNotFound if absent, VectorStoreError if the bytes no longer
        match the id. Checks no tenant: callers check the reference first."""

    @abc.abstractmethod
    def has(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> bool:
        """Whether the tenant references a stored vector with this content id (no tensors are read)."""

    @abc.abstractmethod
    def delete(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Remove the tenant's reference, its names pointing at the vector and its calibration
        of it; the content goes once no tenant references it. VectorNotFound if the tenant
        does not reference it."""

    @abc.abstractmethod
    def listing_page(self, limit: int, after: str | None = None, named_only: bool = False, *,
                     tenant: str = DEFAULT_TENANT) -> ListingPage:
        """Up to ``limit`` of the vectors the tenant references, with their metadata, the
        tenant's names and shapes (no tensors are read), oldest first (by created, then content
        id), from just after the cursor ``after`` (None: the first page); ``named_only``: only
        vectors some name of the tenant points at. Costs O(limit), whatever the size of the
        store. Walking the pages from None to the last lists every vector referenced throughout
        the walk exactly once, whatever is written meanwhile."""

    @abc.abstractmethod
    def names_of(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> list[str]:
        """The tenant's names pointing at a content id, sorted ([] if none, or no such vector;
        VectorNotFound for a string that is no content id)."""

    @abc.abstractmethod
    def usage(self, *, tenant: str = DEFAULT_TENANT) -> TenantUsage:
        """How many vectors the tenant references and their stored bytes, in O(1)."""

    def listing(self, page_size: int = 1000, *, tenant: str = DEFAULT_TENANT) -> list[ListedVector]:
        """Every vector of the tenant, oldest first (the pages, followed): for tools and tests
        that want the whole store, never a request's path."""
        entries: list[ListedVector] = []
        after = None
        while True:
            page = self.listing_page(page_size, after, tenant=tenant)
            entries += page.entries
            if page.next_cursor is None:
                return entries
            after = page.next_cursor

    def list(self, *, tenant: str = DEFAULT_TENANT) -> list[tuple[str, VectorMeta, list[str]]]:
        """(content id, metadata, names) for every vector of the tenant."""
        return [(entry.content_id, entry.meta, entry.names) for entry in self.listing(tenant=tenant)]

    @abc.abstractmethod
    def set_name(self, name: str, content_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Point the tenant's name at a content id it references (re-pointing is allowed);
        VectorNotFound if it references no such vector."""

    @abc.abstractmethod
    def name_target(self, name: str, *, tenant: str = DEFAULT_TENANT) -> str | None:
        """The content id the tenant's name points at, or None."""

    @abc.abstractmethod
    def delete_name(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Remove the tenant's name (the vector stays referenced); VectorNotFound if it has none such."""

    @abc.abstractmethod
    def cached_computation(self, key: str) -> str | None:
        """Content id computed earlier for this computation key, if still stored (of any
        tenant: the key hashes every input, so whoever asks would compute this very content;
        callers add the asking tenant's reference before using it)."""

    @abc.abstractmethod
    def remember_computation(self, key: str, content_id: str) -> None: ...

    @abc.abstractmethod
    def put_calibration(self, content_id: str, calibration: dict, *, tenant: str = DEFAULT_TENANT) -> dict:
        """Store the tenant's calibrated default (plain JSON) of a vector as the next version
        of it, in one atomic write; returns it with ``version`` set. VectorNotFound if the
        tenant does not reference the vector."""

    @abc.abstractmethod
    def calibration(self, content_id: str, *, tenant: str = DEFAULT_TENANT) -> dict | None:
        """The tenant's latest calibration of the vector (with ``version``), or None."""

    # -- counters every process of a deployment shares (quotas on rates and concurrency)

    @abc.abstractmethod
    def charge(self, tenant: str, quota: str, amount: int, limit: int, window_s: float) -> float | None:
        """Count ``amount`` against the tenant's ``limit`` per ``window_s`` (fixed windows):
        None if it fits (and is counted), else the seconds until the window ends (nothing counted)."""

    @abc.abstractmethod
    def acquire(self, tenant: str, quota: str, token: str, limit: int, lease_s: float) -> bool:
        """Take one of the tenant's ``limit`` slots for ``token`` until ``release`` (or, if its
        process dies, until ``lease_s`` has passed); False if all are taken."""

    @abc.abstractmethod
    def release(self, tenant: str, quota: str, token: str) -> None: ...

    def resolve(self, name_or_id: str, *, tenant: str = DEFAULT_TENANT) -> str:
        """The tenant's name or a content id it references -> content id; VectorNotFound if neither."""
        target = self.name_target(name_or_id, tenant=tenant)
        if target is not None:
            return target
        if name_or_id.startswith("v-") and self.has(name_or_id, tenant=tenant):
            return name_or_id
        raise VectorNotFound(f"no vector named or with id {shown(name_or_id)}")
