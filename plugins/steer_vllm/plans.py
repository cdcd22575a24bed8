"""A request's steering -> per-layer plans: what it adds at each layer, and how many
table rows that takes.

All additions of a request on one layer collapse into one plan: rows for absolute
positions 0..k-1 (ActAdd sequences, plus constant vectors that apply to the prompt),
one row for the remaining prompt positions and one for generated positions. Rows are
stored divided by a common scale (the first coefficient in canonical order), and the
scale travels per token: requests that differ only by an overall coefficient (ActAdd's
+c/−c with another c) share the same rows.

A plan's key and row count come from the steering and the vectors' lengths alone, so
the scheduler can count rows before any tensor exists, and a worker builds the rows only
for a key the table does not hold yet.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from steer_vllm.spec import EngineAddition, EngineSteering

# An addition -> its stored direction, float32 [k, hidden] (k = 1 for constant vectors).
DirectionOf = Callable[[EngineAddition], torch.Tensor]


@dataclass(frozen=True)
class LayerRows:
    front: torch.Tensor | None  # float32 [front_len, hidden], positions 0..front_len-1
    prompt_rest: torch.Tensor | None  # float32 [hidden], prompt positions >= front_len
    generated: torch.Tensor | None  # float32 [hidden], positions >= prompt length


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    key: str  # identical keys mean identical rows
    scale: float
    additions: tuple[EngineAddition, ...]  # this layer's, in canonical order
    front_len: int
    has_prompt_rest: bool
    has_generated: bool

    @property
    def num_rows(self) -> int:
        return self.front_len + self.has_prompt_rest + self.has_generated

    def build_rows(self, direction_of: DirectionOf) -> LayerRows:
        front = prompt_rest = generated = None
        for addition in self.additions:
            ratio = addition.coeff / self.scale
            direction = direction_of(addition).to(torch.float32)
            if addition.mode == "actadd":
                front = _accumulate(front, self.front_len, direction, ratio)
                continue
            vector = direction.reshape(-1)
            if addition.positions in ("all", "prompt"):
                prompt_rest = vector * ratio if prompt_rest is None else prompt_rest + vector * ratio
                if self.front_len:
                    front = _accumulate(front, self.front_len, vector.expand(self.front_len, -1), ratio)
            if addition.positions in ("all", "generated"):
                generated = vector * ratio if generated is None else generated + vector * ratio
        return LayerRows(front, prompt_rest, generated)


def _order(addition: EngineAddition) -> tuple:
    return (addition.vector, addition.direction_layer, addition.mode, addition.positions, addition.coeff)


def plan_layers(steering: EngineSteering, length_of: Callable[[EngineAddition], int]) -> list[LayerPlan]:
    """One plan per steered layer; ``length_of`` gives an addition's k (rows of its direction)."""
    by_layer: dict[int, list[EngineAddition]] = {}
    for addition in steering.additions:
        if addition.coeff != 0.0:
            by_layer.setdefault(addition.layer, []).append(addition)
    return [_plan_layer(layer, sorted(adds, key=_order), length_of) for layer, adds in sorted(by_layer.items())]


def _plan_layer(layer: int, additions: list[EngineAddition], length_of: Callable[[EngineAddition], int]) -> LayerPlan:
    scale = additions[0].coeff
    key = hashlib.sha256()
    key.update(str(layer).encode())
    for addition in additions:
        ratio = addition.coeff / scale
        key.update(f"|{addition.vector}|{addition.direction_layer}|{addition.mode}|{addition.positions}|{ratio!r}".encode())
    constant = [a for a in additions if a.mode == "constant"]
    return LayerPlan(
        layer=layer,
        key=key.hexdigest(),
        scale=scale,
        additions=tuple(additions),
        front_len=max((length_of(a) for a in additions if a.mode == "actadd"), default=0),
        has_prompt_rest=any(a.positions in ("all", "prompt") for a in constant),
        has_generated=any(a.positions in ("all", "generated") for a in constant),
    )


def _accumulate(front: torch.Tensor | None, front_len: int, rows: torch.Tensor, ratio: float) -> torch.Tensor:
    if front is None:
        front = torch.zeros(front_len, rows.shape[-1], dtype=torch.float32)
    front[: rows.shape[0]] += rows * ratio
    return front
