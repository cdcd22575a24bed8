"""The vector table and who holds which of its rows.

Row 0 is all zeros: unsteered tokens point at it. Every other row belongs to one layer
plan, shared by all requests whose plan has the same key, and goes back to the free
list when the last of them finishes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from steer_vllm.plans import LayerPlan

ZERO_ROW = 0


class RowsExhausted(RuntimeError):
    pass


@dataclass(frozen=True)
class PlanRows:
    """Where a plan's rows sit in the table."""

    front_start: int
    front_len: int
    prompt_rest_row: int
    generated_row: int


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

    @property
    def rows_in_use(self) -> int:
        return sum(h.count for h in self._held.values())

    @property
    def num_plans(self) -> int:
        return len(self._held)

    def acquire(self, plan: LayerPlan) -> PlanRows:
        held = self._held.get(plan.key)
        if held is not None:
            held.refs += 1
            return held.rows
        start = self._take(plan.num_rows)
        rows, cursor = [], start
        front_len = 0 if plan.front is None else plan.front.shape[0]
        if plan.front is not None:
            rows.append(plan.front)
        prompt_rest_row = generated_row = ZERO_ROW
        cursor += front_len
        if plan.prompt_rest is not None:
            rows.append(plan.prompt_rest[None])
            prompt_rest_row, cursor = cursor, cursor + 1
        if plan.generated is not None:
            rows.append(plan.generated[None])
            generated_row = cursor
        if rows:
            block = torch.cat(rows).to(self.vector_table.dtype)
            self.vector_table[start : start + plan.num_rows].copy_(block, non_blocking=True)
        placed = PlanRows(start, front_len, prompt_rest_row, generated_row)
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
        for i, (start, free) in enumerate(self._free):
            if free >= count:
                if free == count:
                    del self._free[i]
                else:
                    self._free[i] = (start + count, free - count)
                return start
        raise RowsExhausted(
            f"steering vector table is full ({self.vector_table.shape[0] - 1} rows, "
            f"{self.rows_in_use} in use, {count} needed); raise --steering-table-rows"
        )

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
