"""The vector table and who holds which of its rows.

Row 0 is all zeros: unsteered tokens point at it. Every other row belongs to one layer
plan, shared by all requests whose plan has the same key, and goes back to the free
list when the last of them finishes. A plan's rows are contiguous; when the free rows
suffice but no run of them is long enough, the held blocks are moved down to close the
gaps (between steps, so no forward reads the table meanwhile) and ``generation`` changes,
telling the owner to re-read where each plan now sits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from steer_vllm.plans import DirectionOf, LayerPlan

ZERO_ROW = 0


class RowsExhausted(RuntimeError):
    pass


@dataclass(frozen=True)
class PlanRows:
    """Where a plan's rows sit in the table: ``start`` + the plan's relative row."""

    start: int


@dataclass
class _Holding:
    start: int
    count: int
    rows: PlanRows
    refs: int


class RowTable:
    """Owns ``vector_table`` (``[num_rows, hidden]``, model dtype, fixed address)."""

    def __init__(self, num_rows: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.vector_table = torch.zeros(num_rows, hidden_size, dtype=dtype, device=device)
        self._free: list[tuple[int, int]] = [(1, num_rows - 1)]  # (start, count), sorted
        self._held: dict[str, _Holding] = {}
        self.generation = 0  # bumped whenever held plans move

    @property
    def capacity(self) -> int:
        return self.vector_table.shape[0] - 1

    def placed(self, key: str) -> PlanRows:
        return self._held[key].rows

    @property
    def rows_in_use(self) -> int:
        return sum(h.count for h in self._held.values())

    @property
    def num_plans(self) -> int:
        return len(self._held)

    def acquire(self, plan: LayerPlan, direction_of: DirectionOf) -> PlanRows:
        """Rows for this plan: shared if its key is held, else built and copied in."""
        held = self._held.get(plan.key)
        if held is not None:
            held.refs += 1
            return held.rows
        start = self._take(plan.num_rows)
        if plan.num_rows:
            rows = plan.build_rows(direction_of).to(self.vector_table.dtype)
            self.vector_table[start : start + plan.num_rows].copy_(rows, non_blocking=True)
        placed = PlanRows(start)
        self._held[plan.key] = _Holding(start, plan.num_rows, placed, 1)
        return placed

    def release(self, key: str) -> None:
        held = self._held[key]
        held.refs -= 1
        if held.refs == 0:
            del self._held[key]
            self._give_back(held.start, held.count)

    def _take(self, count: int) -> int:
        if count == 0:
            return ZERO_ROW
        start = self._take_run(count)
        if start is None and self.capacity - self.rows_in_use >= count:
            self._compact()
            start = self._take_run(count)
        if start is not None:
            return start
        raise RowsExhausted(
            f"steering vector table is full ({self.vector_table.shape[0] - 1} rows, "
            f"{self.rows_in_use} in use, {count} needed); raise --steering-table-rows"
        )

    def _take_run(self, count: int) -> int | None:
        for i, (start, free) in enumerate(self._free):
            if free >= count:
                if free == count:
                    del self._free[i]
                else:
                    self._free[i] = (start + count, free - count)
                return start
        return None

    def _compact(self) -> None:
        """Move every held block down to close the gaps (in order, so a block only moves
        into rows below its old start: copying row by row from the front is safe)."""
        cursor = 1
        for holding in sorted(self._held.values(), key=lambda h: h.start):
            if holding.count and holding.start != cursor:
                old = holding.start
                self.vector_table[cursor : cursor + holding.count] = self.vector_table[old : old + holding.count].clone()
                holding.start = cursor
                holding.rows = PlanRows(cursor)
            cursor += holding.count
        self._free = [(cursor, self.vector_table.shape[0] - cursor)] if cursor < self.vector_table.shape[0] else []
        self.generation += 1

    def _give_back(self, start: int, count: int) -> None:
        if count == 0:
            return
        self._free.append((start, count))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, c in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + c)
            else:
                merged.append((s, c))
        self._free = merged

