"""Resolved additions -> per-layer plans: what one request adds at each layer.

All additions of a request on one layer collapse into one plan: rows for absolute
positions 0..k-1 (ActAdd sequences, plus constant vectors that apply to the prompt),
one row for the remaining prompt positions and one for generated positions. Rows are
stored divided by a common scale (the first coefficient in canonical order), and the
scale travels per token: requests that differ only by an overall coefficient (ActAdd's
+c/−c with another c) share the same rows.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from steer_vllm.spec import EngineAddition, EngineSteering


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    key: str  # identical keys mean identical rows
    scale: float
    front: torch.Tensor | None  # float32 [k, hidden], positions 0..k-1
    prompt_rest: torch.Tensor | None  # float32 [hidden], prompt positions >= k
    generated: torch.Tensor | None  # float32 [hidden], positions >= prompt length

    @property
    def num_rows(self) -> int:
        front = 0 if self.front is None else self.front.shape[0]
        return front + (self.prompt_rest is not None) + (self.generated is not None)


def _order(addition: EngineAddition) -> tuple:
    return (addition.vector, addition.direction_layer, addition.mode, addition.positions, addition.coeff)


def plan_layers(
    steering: EngineSteering,
    direction_of: Callable[[EngineAddition], torch.Tensor],
) -> list[LayerPlan]:
    """One plan per steered layer. ``direction_of`` returns float32 ``[k, hidden]``."""
    by_layer: dict[int, list[EngineAddition]] = {}
    for addition in steering.additions:
        if addition.coeff != 0.0:
            by_layer.setdefault(addition.layer, []).append(addition)
    return [_plan_layer(layer, sorted(adds, key=_order), direction_of) for layer, adds in sorted(by_layer.items())]


def _plan_layer(
    layer: int,
    additions: list[EngineAddition],
    direction_of: Callable[[EngineAddition], torch.Tensor],
) -> LayerPlan:
    scale = additions[0].coeff
    key = hashlib.sha256()
    key.update(str(layer).encode())
    front_len = max((direction_of(a).shape[0] for a in additions if a.mode == "actadd"), default=0)
    front = prompt_rest = generated = None
    for addition in additions:
        ratio = addition.coeff / scale
        key.update(f"|{addition.vector}|{addition.direction_layer}|{addition.mode}|{addition.positions}|{ratio!r}".encode())
        direction = direction_of(addition).to(torch.float32)
        if addition.mode == "actadd":
            front = _accumulate(front, front_len, direction, ratio)
            continue
        vector = direction.reshape(-1)
        if addition.positions in ("all", "prompt"):
            prompt_rest = vector * ratio if prompt_rest is None else prompt_rest + vector * ratio
            if front_len:
                front = _accumulate(front, front_len, vector.expand(front_len, -1), ratio)
        if addition.positions in ("all", "generated"):
            generated = vector * ratio if generated is None else generated + vector * ratio
    return LayerPlan(layer, key.hexdigest(), scale, front, prompt_rest, generated)


def _accumulate(front: torch.Tensor | None, front_len: int, rows: torch.Tensor, ratio: float) -> torch.Tensor:
    if front is None:
        front = torch.zeros(front_len, rows.shape[-1], dtype=torch.float32)
    front[: rows.shape[0]] += rows * ratio
    return front
