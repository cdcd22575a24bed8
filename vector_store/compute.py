"""Contrast prompts -> steering vectors, through the serving engine's residual capture.

ActAdd (Turner et al. 2023): each addition prompt's residual stream entering layer L,
one row per token, is stored as its own vector; the engine weights the vectors by
their coefficients and sums them per position at request time. Storing prompts
separately means a new coefficient never recomputes or stores anything. Padding:
the prompts of one layer are right-padded with ``pad_token_id`` to equal length (the
paper pads with the single-space token); ``pad_token_id=None`` pads with nothing, so a
shorter prompt simply contributes nothing past its end.

Constant vectors (contrastive activation addition): the difference of the last-token
streams of a positive and a negative prompt, or its mean over a list of pairs.

BOS: prompts are used exactly as tokenized by the caller, with the same rule as the
user's prompt (vLLM's tokenizer defaults), so position 0 cancels when coefficients sum
to 0. SmolLM2's tokenizer adds no BOS; write ``<|endoftext|>`` at the start of both the
prompt and the addition prompts to get one.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from vector_store.async_access import AsyncStore
from vector_store.base import StoredVector, VectorMeta, VectorStoreError, layer_outside
from vector_store.keys import computation_key

# (token id lists, layers) -> per prompt {layer: float32 [len, hidden]}
CaptureFn = Callable[[list[list[int]], list[int]], Awaitable[list[dict[int, torch.Tensor]]]]


@dataclass(frozen=True)
class ModelInfo:
    fingerprint: str
    hidden_size: int
    num_layers: int


class VectorComputer:
    """Computes vectors once per (model, layer, tokens, method, padding) and caches them."""

    def __init__(self, store: AsyncStore, capture: CaptureFn, model: ModelInfo, max_prompt_tokens: int = 64):
        self.store = store
        self.model = model
        self.max_prompt_tokens = max_prompt_tokens
        self._capture = capture
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

    async def _streams(self, prompts: list[list[int]], layers: list[int]) -> list[dict[int, torch.Tensor]]:
        started = time.perf_counter()
        streams = await self._capture(prompts, layers)
        self.capture_seconds += time.perf_counter() - started
        self.captures += len(prompts)
        return streams

    def _meta(self, kind: str, method: str, source: dict) -> VectorMeta:
        return VectorMeta(self.model.fingerprint, self.model.hidden_size, kind, method, source, time.time())

    async def actadd(self, prompts: list[list[int]], layer: int, pad_token_id: int | None) -> list[str]:
        """One ``[k, hidden]`` vector per prompt (k = padded length); returns content ids."""
        self.check_layer(layer, "layer")
        for i, ids in enumerate(prompts):
            self.check_prompt(ids, f"prompts[{i}]")
        length = max(len(ids) for ids in prompts)
        padded = [ids + [pad_token_id] * (length - len(ids)) if pad_token_id is not None else ids for ids in prompts]
        keys = [computation_key(self.model.fingerprint, layer, [ids], [1.0], "actadd", pad_token_id) for ids in padded]
        found = [await self.store.cached_computation(key) for key in keys]
        missing = sorted({tuple(ids) for ids, cid in zip(padded, found) if cid is None})
        if missing:
            streams = await self._streams([list(ids) for ids in missing], [layer])
            computed = {}
            for ids, stream in zip(missing, streams):
                vector = StoredVector(
                    self._meta("actadd", "actadd", {"token_ids": list(ids), "pad_token_id": pad_token_id}),
                    {layer: stream[layer]},
                )
                computed[ids] = await self.store.put(vector)
            for i, ids in enumerate(padded):
                if found[i] is None:
                    found[i] = computed[tuple(ids)]
                    await self.store.remember_computation(keys[i], found[i])
        return found  # type: ignore[return-value]

    async def constant(self, pairs: list[tuple[list[int], list[int]]], layer: int) -> str:
        """Mean over pairs of last-token(positive) - last-token(negative), ``[1, hidden]``."""
        self.check_layer(layer, "layer")
        if not pairs:
            raise VectorStoreError("pairs: at least one (positive, negative) pair is needed")
        for i, (positive, negative) in enumerate(pairs):
            self.check_prompt(positive, f"pairs[{i}].positive")
            self.check_prompt(negative, f"pairs[{i}].negative")
        method = "last_token_diff" if len(pairs) == 1 else "mean_diff"
        flat = [ids for pair in pairs for ids in pair]
        key = computation_key(self.model.fingerprint, layer, flat, [], method, None)
        cached = await self.store.cached_computation(key)
        if cached is not None:
            return cached
        streams = await self._streams(flat, [layer])
        last = torch.stack([s[layer][-1] for s in streams])  # [2 * pairs, hidden]
        direction = (last[0::2] - last[1::2]).mean(dim=0, keepdim=True)
        vector = StoredVector(self._meta("constant", method, {"pairs": [list(p) for p in pairs]}), {layer: direction})
        content_id = await self.store.put(vector)
        await self.store.remember_computation(key, content_id)
        return content_id

    async def combine(self, parts: list[tuple[str, float]], source: dict) -> str:
        """One stored vector from weighted stored vectors (same layers), summed per
        position front-aligned: a named ActAdd vector made from a contrast pair."""
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
        return await self.store.put(StoredVector(self._meta(kind, "combined", source), directions))
