"""A request's steering -> per-layer plans: what it does at each layer, which positions
each part covers, and how many table rows that takes.

All additions and the projection of a request on one layer collapse into one plan. The
positions an operation covers are an interval between symbolic bounds (``segments``).
Cut at every bound the layer uses, the positions fall into segments, and on
each segment the same operations act: the ActAdd rows (front-aligned from the anchor,
one row per position), one row summing the constant vectors that cover it, and whether
the projection applies. Segments with the same constant vectors share a row.

Rows are stored divided by a common scale (the first coefficient, or the first dose, in
canonical order), and the scale travels per token: requests that differ only by an
overall strength (ActAdd's +c/−c with another c) share the same rows. A layer steered by
doses stores each addition's rows normalised to unit norm per position (rows under
``ZERO_ROW_RATIO`` of the direction's largest row, e.g. a BOS position where a contrast
pair cancels, stay zero): the op multiplies them by ``dose * ‖h‖`` per token.

A plan's key, rows and segments come from the steering and the vectors' lengths alone
(not from the prompt), so the scheduler can count rows before any tensor exists, a worker
builds the rows only for a key the table does not hold yet, and the prompt length and
anchor only turn the symbolic segments into absolute positions when a request is placed.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from steer_vllm.segments import ANCHOR, FRONT_END, MAX_SEGMENTS, NO_END, START, Segment, covers, interval_of
from steer_vllm.spec import EngineAddition, EngineDirection, EngineProjection, EngineSteering, SteeringSpecError

# An addition or projection -> its stored direction, float32 [k, hidden] (k = 1 for constant vectors).
DirectionOf = Callable[[EngineDirection], torch.Tensor]

# A dose layer's row whose norm is below this share of its direction's largest row is zero.
ZERO_ROW_RATIO = 1e-4


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    key: str  # identical keys mean identical rows
    scale: float  # rows are stored divided by it (0 when the layer only projects)
    relative: bool  # the scale is a dose: the op multiplies it by each token's ‖h‖
    additions: tuple[EngineAddition, ...]  # this layer's, in canonical order
    projection: EngineProjection | None
    preserve_norm: bool
    front_len: int
    row_sets: tuple[frozenset[int], ...]  # per shared row: indices into ``additions`` it sums
    segments: tuple[Segment, ...]  # where something acts, in position order

    @property
    def num_rows(self) -> int:
        return self.front_len + len(self.row_sets) + (self.projection is not None)

    @property
    def direction_row(self) -> int | None:
        """The projection's unit direction, relative to the plan's first row."""
        return None if self.projection is None else self.num_rows - 1

    def build_rows(self, direction_of: DirectionOf) -> torch.Tensor:
        """float32 ``[num_rows, hidden]``: ActAdd rows, shared constant rows, unit direction."""
        directions = [self._scaled(a, direction_of(a).to(torch.float32)) for a in self.additions]
        hidden = (directions[0] if directions else direction_of(self.projection)).shape[-1]
        rows = torch.zeros(self.num_rows, hidden, dtype=torch.float32)
        for addition, direction in zip(self.additions, directions):
            if addition.mode == "actadd":
                rows[: direction.shape[0]] += direction
            elif covers(addition.positions, (ANCHOR, 0), (FRONT_END, 0)):
                rows[: self.front_len] += direction.reshape(-1)
        for i, members in enumerate(self.row_sets):
            for index in members:
                rows[self.front_len + i] += directions[index].reshape(-1)
        if self.projection is not None:
            direction = direction_of(self.projection).to(torch.float32).reshape(-1)
            rows[-1] = direction / direction.norm()
        return rows

    def _scaled(self, addition: EngineAddition, direction: torch.Tensor) -> torch.Tensor:
        ratio = addition.strength / self.scale
        if not self.relative:
            return direction * ratio
        norms = direction.norm(dim=-1, keepdim=True)
        live = norms > ZERO_ROW_RATIO * norms.max()
        return torch.where(live, direction / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0) * ratio


def _order(addition: EngineAddition) -> tuple:
    return (addition.vector, addition.direction_layer, addition.mode, str(addition.positions), addition.strength)


def plan_layers(steering: EngineSteering, length_of: Callable[[EngineDirection], int]) -> list[LayerPlan]:
    """One plan per steered layer; ``length_of`` gives a direction's k (its rows)."""
    by_layer: dict[int, list[EngineAddition]] = {}
    for addition in steering.additions:
        if addition.strength != 0.0:
            by_layer.setdefault(addition.layer, []).append(addition)
    projections = {p.layer: p for p in steering.projections}
    layers = sorted(set(by_layer) | set(projections))
    preserve = set(steering.preserve_norm)
    return [
        _plan_layer(layer, sorted(by_layer.get(layer, []), key=_order), projections.get(layer), layer in preserve, length_of)
        for layer in layers
    ]


def _plan_layer(
    layer: int,
    additions: list[EngineAddition],
    projection: EngineProjection | None,
    preserve_norm: bool,
    length_of: Callable[[EngineDirection], int],
) -> LayerPlan:
    scale = additions[0].strength if additions else 0.0
    relative = bool(additions) and additions[0].dose is not None
    key = hashlib.sha256()
    key.update(f"{layer}|{'dose' if relative else 'coeff'}".encode())
    for addition in additions:
        ratio = addition.strength / scale
        key.update(f"|{addition.vector}|{addition.direction_layer}|{addition.mode}|{addition.positions}|{ratio!r}".encode())
    if projection is not None:  # its op, value and positions travel per request: the rows hold only u
        key.update(f"|u|{projection.vector}|{projection.direction_layer}".encode())
    front_len = max((length_of(a) for a in additions if a.mode == "actadd"), default=0)
    constant = [(i, a) for i, a in enumerate(additions) if a.mode == "constant"]

    bounds = {(START, 0), (NO_END, 0)}
    if front_len:
        bounds |= {(ANCHOR, 0), (FRONT_END, 0)}
    for positions in [a.positions for _, a in constant] + ([projection.positions] if projection else []):
        bounds |= set(interval_of(positions))
    cuts = sorted(bounds)
    row_sets: list[frozenset[int]] = []
    segments: list[Segment] = []
    for lo, hi in zip(cuts, cuts[1:]):
        project = projection is not None and covers(projection.positions, lo, hi)
        if front_len and lo == (ANCHOR, 0):
            segments.append(Segment(lo, hi, 0, 1, project))
            continue
        members = frozenset(i for i, a in constant if covers(a.positions, lo, hi))
        row = None
        if members:
            if members not in row_sets:
                row_sets.append(members)
            row = front_len + row_sets.index(members)
        if row is not None or project:
            segments.append(Segment(lo, hi, row, 0, project))
    if len(segments) > MAX_SEGMENTS:
        raise SteeringSpecError(
            f"steering: layer {layer} cuts the positions into {len(segments)} steered segments, over the engine's "
            f"limit of {MAX_SEGMENTS}; use fewer distinct position windows at one layer"
        )
    return LayerPlan(
        layer=layer,
        key=key.hexdigest(),
        scale=scale,
        relative=relative,
        additions=tuple(additions),
        projection=projection,
        preserve_norm=preserve_norm,
        front_len=front_len,
        row_sets=tuple(row_sets),
        segments=tuple(segments),
    )
