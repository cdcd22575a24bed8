"""Positions as symbolic bounds, and the segments a layer's positions are cut into.

An operation's positions are an interval ``[lo, hi)`` between bounds that a plan can name
before any prompt exists: the prompt's start, the anchor, the end of the ActAdd rows,
the prompt's end plus an offset, or no end. A request's prompt length and anchor turn
them into absolute positions when it is placed (``batch.RequestRows``). Importable with
the standard library alone, like ``batch`` and ``ops``.
"""
from __future__ import annotations

from dataclasses import dataclass

# Bound origins, in the order their positions always have: 0 <= anchor <= anchor + k <= prompt_len.
START, ANCHOR, FRONT_END, PROMPT_END, NO_END = range(5)
Bound = tuple[int, int]  # (origin, offset); the tuple order is the order of the positions
# Segments of one request at one layer that the per-token fill looks through.
MAX_SEGMENTS = 8

_NAMED = {
    "all": ((START, 0), (NO_END, 0)),
    "prompt": ((START, 0), (PROMPT_END, 0)),
    "generated": ((PROMPT_END, 0), (NO_END, 0)),
    "after_anchor": ((ANCHOR, 0), (NO_END, 0)),
}


def interval_of(positions) -> tuple[Bound, Bound]:
    """The ``[lo, hi)`` bounds of a named schedule or a window ``{start, end}`` over
    generated tokens (``spec.PositionWindow``; ``end`` None: no end)."""
    if isinstance(positions, str):
        return _NAMED[positions]
    end = (PROMPT_END, positions.end) if positions.end is not None else (NO_END, 0)
    return (PROMPT_END, positions.start), end


def covers(positions, lo: Bound, hi: Bound) -> bool:
    start, end = interval_of(positions)
    return start <= lo and hi <= end


@dataclass(frozen=True)
class Segment:
    """Positions ``[lo, hi)`` and what acts there: ``row`` (relative to the plan's first row,
    None for none) advancing by ``stride`` per position (1 on the ActAdd rows), and whether
    the projection applies."""

    lo: Bound
    hi: Bound
    row: int | None
    stride: int
    project: bool
