"""Contrast prompts -> steering vectors, through the serving engine's residual capture.

ActAdd (Turner et al. 2023): each addition prompt's residual stream entering layer L,
one row per token, is stored as its own vector; the engine weights the vectors by
their coefficients and sums them per position at request time. Storing prompts
separately means a new coefficient never recomputes or stores anything. Padding:
the prompts of one layer are right-padded with ``pad_token_id`` to equal length (the
paper pads with the single-space token); ``pad_token_id=None`` pads with nothing, so a
shorter prompt simply contributes nothing past its end.

Constant vectors from contrast pairs, one ``[1, hidden]`` direction per layer, each example
read at one position of its stream (``last`` token, or the ``mean`` over its tokens after the
first, whose massive activation would otherwise swamp the mean):

- ``mean_diff`` (contrastive activation addition, CAA): the mean over pairs of
  positive − negative;
- ``pca_diff`` (repeng): the first principal component of the per-pair differences (centred
  on their mean, as PCA does);
- ``pca_center`` (repeng): each pair's two streams centred on the pair's mean, then the first
  principal component of those 2n points.

A principal component has no sign or length of its own: it is turned so that the positives
project higher than the negatives on average, and scaled to that gap (mean positive minus
mean negative projection), so it is the mean difference's component along that direction
and a coefficient means about the same for every method. ``contrast_direction`` says per
layer how well the direction separates the examples (``LayerStats``).

BOS: prompts are used exactly as tokenized by the caller, with the same rule as the
user's prompt (vLLM's tokenizer defaults), so position 0 cancels when coefficients sum
to 0. SmolLM2's tokenizer adds no BOS; write ``<|endoftext|>`` at the start of both the
prompt and the addition prompts to get one.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import torch

from vector_store.async_access import AsyncStore
from vector_store.base import StoredVector, VectorMeta, VectorNotFound, VectorStoreError, layer_outside
from vector_store.keys import computation_key

# (token id lists, layers) -> per prompt {layer: float32 [len, hidden]}
CaptureFn = Callable[[list[list[int]], list[int]], Awaitable[list[dict[int, torch.Tensor]]]]
ChargeFn = Callable[[str, int, str], Awaitable[None]]  # (tenant, tokens, what for); raises QuotaExceeded

METHODS = ("mean_diff", "pca_diff", "pca_center")
PCA_METHODS = ("pca_diff", "pca_center")
POSITIONS = ("last", "mean")
# A dataset's captures are asked for this many bytes at a time: well under what a worker keeps
# of finished captures not yet collected (256 MiB, steer_vllm/capture.py), so none of a large
# dataset's is dropped before it is read, even beside other captures.
CAPTURE_BATCH_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LayerStats:
    """How a direction fits the examples it was made from, at one layer."""

    norm: float  # of the stored direction
    separation: float  # share of examples on their own side of the midpoint
    # Between the positives' and the negatives' mean projection on the unit direction: a stream
    # that projects past it reads as positive (None where there is no direction).
    midpoint: float | None
    # PCA methods: the first component's share of the variance (None where the examples do not vary)
    explained_variance: float | None = None

    def as_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def contrast_direction(positive: torch.Tensor, negative: torch.Tensor, method: str) -> tuple[torch.Tensor, LayerStats]:
    """One layer's direction ``[hidden]`` (float32) from the pairs' streams ``[n, hidden]``
    (row i of each is pair i), by ``method`` (see the module's docstring), and its stats."""
    pos, neg = positive.double(), negative.double()
    explained = None
    if method == "mean_diff":
        direction = (positive - negative).mean(dim=0).double()  # float32, as it always was computed
    else:
        if method == "pca_diff":
            points = pos - neg
        else:
            center = (pos + neg) / 2
            points = torch.cat([pos - center, neg - center])
        unit, explained = _first_component(points)
        # Times the projection gap: the sign that puts the positives higher, and the length of
        # the mean difference along the component.
        direction = unit * ((pos.mean(dim=0) - neg.mean(dim=0)) @ unit)
    norm = float(direction.norm())
    unit = direction / norm if norm > 0 else direction
    on_pos, on_neg = pos @ unit, neg @ unit
    midpoint = (on_pos.mean() + on_neg.mean()) / 2
    correct = int((on_pos > midpoint).sum()) + int((on_neg < midpoint).sum())
    stats = LayerStats(norm, correct / (2 * len(pos)), float(midpoint) if norm > 0 else None, explained)
    return direction.float(), stats


def _first_component(points: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """The unit first principal component of ``points`` [m, hidden] (centred first, as PCA
    does) and its share of the total variance. Points that do not vary have none: a zero
    direction, as mean_diff gives for identical examples (at layer 0 a chat template's last
    token is the same token in every example)."""
    _, singular, right = torch.linalg.svd(points - points.mean(dim=0), full_matrices=False)
    variance = singular.square()
    total = float(variance.sum())
    if total <= 0:
        return torch.zeros_like(right[0]), None
    return right[0], float(variance[0]) / total


def _at_position(stream: torch.Tensor, position: str) -> torch.Tensor:
    """A prompt's stream ``[len, hidden]`` at ``position``: its last token, or the mean over its
    tokens but the first (a one-token prompt: that token). The first position is an attention
    sink with massive activations on many models (SmolLM2's stream there is an outlier in norm
    whatever the token): in the mean it would swamp every other token's, and no generated token
    looks like it."""
    if position == "last":
        return stream[-1]
    return stream[1:].mean(dim=0) if len(stream) > 1 else stream[0]


@dataclass(frozen=True)
class ModelInfo:
    fingerprint: str
    hidden_size: int
    num_layers: int


class VectorComputer:
    """Computes vectors once per (model, layer, tokens, method, padding) and caches them."""

    def __init__(self, store: AsyncStore, capture: CaptureFn, model: ModelInfo, max_prompt_tokens: int = 64,
                 charge: ChargeFn | None = None):
        self.store = store
        self.model = model
        self.max_prompt_tokens = max_prompt_tokens
        self._capture = capture
        self._charge = charge  # a tenant's tokens counted before its captures (its quota), if any
        self.captures = 0  # prompts sent through the engine
        self.capture_seconds = 0.0

    def check_prompt(self, token_ids: list[int], where: str) -> None:
        if not token_ids:
            raise VectorStoreError(f"{where}: the prompt is empty")
        if len(token_ids) > self.max_prompt_tokens:
            raise VectorStoreError(
                f"{where}: the prompt has {len(token_ids)} tokens, over the limit of {self.max_prompt_tokens}"
            )

    def check_layer(self, layer: int, where: str) -> None:
        outside = layer_outside(layer, self.model.num_layers)
        if outside:
            raise VectorStoreError(f"{where}: layer {outside}")

    async def streams(self, prompts: list[list[int]], layers: list[int]) -> list[dict[int, torch.Tensor]]:
        """The engine's capture of ``prompts`` at ``layers``, timed and counted."""
        started = time.perf_counter()
        streams = await self._capture(prompts, layers)
        self.capture_seconds += time.perf_counter() - started
        self.captures += len(prompts)
        return streams

    def _meta(self, kind: str, method: str, source: dict, stats: dict | None = None) -> VectorMeta:
        return VectorMeta(self.model.fingerprint, self.model.hidden_size, kind, method, source, time.time(),
                          stats or {})

    async def _charged(self, tenant: str, tokens: int, what: str) -> None:
        if self._charge is not None:
            await self._charge(tenant, tokens, what)

    async def _cached(self, key: str, tenant: str) -> str | None:
        """A computation made before (by any tenant), now the tenant's too; None if not cached
        or collected since."""
        content_id = await self.store.cached_computation(key)
        if content_id is None:
            return None
        try:
            await self.store.add_reference(content_id, tenant=tenant)
        except VectorNotFound:  # collected after its last tenant deleted it: compute it again
            return None
        return content_id

    async def actadd(self, prompts: list[list[int]], layer: int, pad_token_id: int | None, *,
                     tenant: str) -> list[str]:
        """One ``[k, hidden]`` vector per prompt (k = padded length), the tenant's; returns content ids."""
        self.check_layer(layer, "layer")
        for i, ids in enumerate(prompts):
            self.check_prompt(ids, f"prompts[{i}]")
        length = max(len(ids) for ids in prompts)
        padded = [ids + [pad_token_id] * (length - len(ids)) if pad_token_id is not None else ids for ids in prompts]
        keys = [computation_key(self.model.fingerprint, layer, [ids], [1.0], "actadd", pad_token_id) for ids in padded]
        found = [await self._cached(key, tenant) for key in keys]
        missing = sorted({tuple(ids) for ids, cid in zip(padded, found) if cid is None})
        if missing:
            await self._charged(tenant, sum(map(len, missing)), "capturing the steering prompts")
            streams = await self.streams([list(ids) for ids in missing], [layer])
            computed = {}
            for ids, stream in zip(missing, streams):
                vector = StoredVector(
                    self._meta("actadd", "actadd", {"token_ids": list(ids), "pad_token_id": pad_token_id}),
                    {layer: stream[layer]},
                )
                computed[ids] = await self.store.put(vector, tenant=tenant)
            for i, ids in enumerate(padded):
                if found[i] is None:
                    found[i] = computed[tuple(ids)]
                    await self.store.remember_computation(keys[i], found[i])
        return found  # type: ignore[return-value]

    async def constant(self, pairs: list[tuple[list[int], list[int]]], layer: int, *, tenant: str) -> str:
        """Mean over pairs of last-token(positive) - last-token(negative), ``[1, hidden]``."""
        return await self.from_pairs(pairs, [layer], tenant=tenant)

    async def from_pairs(
        self,
        pairs: list[tuple[list[int], list[int]]],
        layers: list[int],
        method: str = "mean_diff",
        position: str = "last",
        template: str | None = None,
        *,
        tenant: str,
    ) -> str:
        """The tenant's constant vector, one ``[1, hidden]`` direction per layer, made by ``method`` from
        the pairs' streams at ``position``, with its ``LayerStats`` in ``meta.stats``.
        ``template`` names how the caller rendered the token ids (recorded, not applied)."""
        for layer in layers:
            self.check_layer(layer, "layer")
        if method not in METHODS:
            raise VectorStoreError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        if position not in POSITIONS:
            raise VectorStoreError(f"position: expected one of {', '.join(POSITIONS)}, got {position!r}")
        if not pairs:
            raise VectorStoreError("pairs: at least one (positive, negative) pair is needed")
        if method in PCA_METHODS and len(pairs) < 2:
            raise VectorStoreError(f"pairs: {method} needs at least 2 pairs (a principal component of one pair "
                                   "is not defined), got 1; mean_diff takes one")
        for i, (positive, negative) in enumerate(pairs):
            self.check_prompt(positive, f"pairs[{i}].positive")
            self.check_prompt(negative, f"pairs[{i}].negative")
        layers = sorted(set(layers))
        # Only choices other than the defaults enter the key and the source, so today's
        # one-layer last-token mean_diff keeps the key and metadata it always had: it finds the
        # vectors computed before and makes the same ids.
        choices = {key: value for key, value in (("position", position), ("template", template))
                   if value not in ("last", None)}
        name = "last_token_diff" if method == "mean_diff" and len(pairs) == 1 and not choices else method
        flat = [ids for pair in pairs for ids in pair]
        # "mean" has left the first token out since it was measured to swamp the mean (EVALUATION.md):
        # the key says so, so a store's vectors from the mean over every token are not found for it.
        keyed = {**choices, "mean_of": "tokens after the first"} if position == "mean" else choices
        key = computation_key(self.model.fingerprint, layers[0] if len(layers) == 1 else layers, flat, [], name, None,
                              keyed or None)
        cached = await self._cached(key, tenant)
        if cached is not None:
            return cached
        await self._charged(tenant, sum(map(len, flat)), "capturing the pairs")
        read = await self._read(flat, layers, position)  # [2 * pairs, layers, hidden]
        directions, stats = {}, {}
        for i, layer in enumerate(layers):
            direction, layer_stats = contrast_direction(read[0::2, i], read[1::2, i], method)
            directions[layer] = direction.unsqueeze(0)
            stats[str(layer)] = layer_stats.as_json()
        meta = self._meta("constant", name, {"pairs": [list(p) for p in pairs], **choices}, stats)
        content_id = await self.store.put(StoredVector(meta, directions), tenant=tenant)
        await self.store.remember_computation(key, content_id)
        return content_id

    async def _read(self, prompts: list[list[int]], layers: list[int], position: str) -> torch.Tensor:
        """Each prompt's stream at ``position`` at every layer, ``[prompts, layers, hidden]``.
        The engine captures whole streams: they are asked for in batches of at most
        ``CAPTURE_BATCH_BYTES`` and reduced to one row per layer as each batch arrives."""
        per_token = len(layers) * self.model.hidden_size * 4
        batches: list[list[list[int]]] = [[]]
        size = 0
        for ids in prompts:
            if batches[-1] and size + len(ids) * per_token > CAPTURE_BATCH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(ids)
            size += len(ids) * per_token
        read = []
        for batch in batches:
            for streams in await self.streams(batch, layers):
                read.append(torch.stack([_at_position(streams[layer], position) for layer in layers]))
        return torch.stack(read)

    async def combine(self, parts: list[tuple[str, float]], source: dict, *, tenant: str) -> str:
        """One stored vector of the tenant from weighted stored vectors (same layers, the
        tenant's), summed per position front-aligned: a named ActAdd vector made from a contrast pair."""
        vectors = [(await self.store.get(cid), coeff) for cid, coeff in parts]
        layers = sorted({layer for vector, _ in vectors for layer in vector.layers})
        directions = {}
        for layer in layers:
            length = max(v.directions[layer].shape[0] for v, _ in vectors if layer in v.directions)
            total = torch.zeros(length, self.model.hidden_size)
            for vector, coeff in vectors:
                if layer in vector.directions:
                    rows = vector.directions[layer]
                    total[: rows.shape[0]] += coeff * rows
            directions[layer] = total
        kind = "constant" if all(d.shape[0] == 1 for d in directions.values()) and all(
            v.meta.kind == "constant" for v, _ in vectors
        ) else "actadd"
        return await self.store.put(StoredVector(self._meta(kind, "combined", source), directions), tenant=tenant)
