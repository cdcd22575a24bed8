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
    """No vector with that name or content id."""

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
    """Content-addressed vectors, names that point at them, a cache of computed contrast
    pairs, and each vector's calibrated default (``steer_server.calibration``): a fact about
    the content, so it is keyed by content id and goes when the vector goes. Writes are
    atomic: a reader sees a whole entry or none."""

    @abc.abstractmethod
    def put(self, vector: StoredVector) -> str:
        """Store (idempotent) and return the content id."""

    @abc.abstractmethod
    def get(self, content_id: str) -> StoredVector:
        """Raise VectorNotFound if absent, VectorStoreError if the bytes no longer
        match the id."""

    @abc.abstractmethod
    def has(self, content_id: str) -> bool:
        """Whether a vector with this content id is stored (no tensors are read)."""

    @abc.abstractmethod
    def delete(self, content_id: str) -> None:
        """Remove the vector and every name pointing at it."""

    @abc.abstractmethod
    def listing_page(self, limit: int, after: str | None = None, named_only: bool = False) -> ListingPage:
        """Up to ``limit`` stored vectors with their metadata, names and shapes (no tensors are
        read), oldest first (by created, then content id), from just after the cursor ``after``
        (None: the first page); ``named_only``: only vectors some name points at. Costs
        O(limit), whatever the size of the store. Walking the pages from None to the last
        lists every vector stored throughout the walk exactly once, whatever is written meanwhile."""

    @abc.abstractmethod
    def names_of(self, content_id: str) -> list[str]:
        """The names pointing at a content id, sorted ([] if none, or no such vector; VectorNotFound
        for a string that is no content id)."""

    def listing(self, page_size: int = 1000) -> list[ListedVector]:
        """Every stored vector, oldest first (the pages, followed): for tools and tests that
        want the whole store, never a request's path."""
        entries: list[ListedVector] = []
        after = None
        while True:
            page = self.listing_page(page_size, after)
            entries += page.entries
            if page.next_cursor is None:
                return entries
            after = page.next_cursor

    def list(self) -> list[tuple[str, VectorMeta, list[str]]]:
        """(content id, metadata, names) for every stored vector."""
        return [(entry.content_id, entry.meta, entry.names) for entry in self.listing()]

    @abc.abstractmethod
    def set_name(self, name: str, content_id: str) -> None:
        """Point a name at a stored content id (re-pointing is allowed)."""

    @abc.abstractmethod
    def name_target(self, name: str) -> str | None:
        """The content id a name points at, or None."""

    @abc.abstractmethod
    def delete_name(self, name: str) -> None: ...

    @abc.abstractmethod
    def cached_computation(self, key: str) -> str | None:
        """Content id computed earlier for this computation key, if still stored."""

    @abc.abstractmethod
    def remember_computation(self, key: str, content_id: str) -> None: ...

    @abc.abstractmethod
    def put_calibration(self, content_id: str, calibration: dict) -> dict:
        """Store a vector's calibrated default (plain JSON) as the next version of its
        calibration, in one atomic write; returns it with ``version`` set. VectorNotFound
        if the vector is not stored."""

    @abc.abstractmethod
    def calibration(self, content_id: str) -> dict | None:
        """The vector's latest calibration (with ``version``), or None."""

    def resolve(self, name_or_id: str) -> str:
        """A name or a content id -> content id; VectorNotFound if neither."""
        target = self.name_target(name_or_id)
        if target is not None:
            return target
        if name_or_id.startswith("v-") and self.has(name_or_id):
            return name_or_id
        raise VectorNotFound(f"no vector named or with id {name_or_id!r}")
