"""Worker side state: which requests are steered and which table rows they hold.

Like vLLM's LoRA model manager: this owns the slots (table rows), the batch object
owns the per-token buffers, the op only computes. Everything a request needs arrives
with it (``steer_vllm.content``), and the scheduler admitted it only with its rows
guaranteed, so placing a request does no I/O and cannot run out of rows. Should it fail
anyway, the request is reported back to the scheduler, which ends it with an error:
it never runs unsteered.
"""
from __future__ import annotations

import logging
from collections.abc import Collection

import torch

from steer_vllm.batch import RequestRows, SteeringBatch
from steer_vllm.capture import CaptureRecorder
from steer_vllm.content import ShippedVectors
from steer_vllm.models import block_list, install_steering, owns_point
from steer_vllm.plans import LayerPlan, plan_layers
from steer_vllm.points import SteeringPoints
from steer_vllm.receipts import ReceiptRecorder
from steer_vllm.slots import RowTable
from steer_vllm.spec import EngineSteering, capture_of, steering_of

logger = logging.getLogger("steer_vllm")


class _Placed:
    """A steered request's rows, and the plan whose rows it holds at each of its layers."""

    def __init__(self, rows: RequestRows):
        self.rows = rows
        self.plans: list[LayerPlan] = []


class SteeringManager:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        table_rows: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_tokens: int,
        max_reqs: int,
        allowed_architectures: Collection[str] = (),
    ):
        self.table = RowTable(table_rows, hidden_size, dtype, device)
        self.recorder = CaptureRecorder()
        self.hidden_size = hidden_size
        blocks, self.first_block, self.end_block = block_list(model, allowed_architectures)
        self.num_layers = len(blocks)
        self.batch = SteeringBatch(self.num_layers + 1, max_tokens, max_reqs, dtype, device)
        self.receipts = ReceiptRecorder(self.batch)
        self.points = SteeringPoints(self.table.vector_table, self.batch, self.recorder, self.receipts)
        install_steering(model, self.points, allowed_architectures)
        self._requests: dict[str, _Placed] = {}
        self._table_generation = self.table.generation
        self.failed: set[str] = set()  # not yet reported to the scheduler

    def status(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "owned_blocks": [self.first_block, self.end_block],
            "table_rows": self.table.vector_table.shape[0],
            "rows_in_use": self.table.rows_in_use,
            "plans": self.table.num_plans,
            "steered_requests": len(self._requests),
        }

    def add_request(self, req_id: str, extra_args: dict | None, prompt_len: int) -> None:
        if req_id in self._requests:  # resumed after preemption: keeps its rows
            return
        try:
            capture = capture_of(extra_args)
            if capture is not None:
                self.recorder.add(req_id, capture.id, capture.layers, prompt_len)
            steering = steering_of(extra_args)
            if steering is not None:
                self._requests[req_id] = self._place(steering, ShippedVectors(extra_args, steering, self.hidden_size), prompt_len)
                if steering.receipt is not None:
                    self.receipts.add(req_id, steering.receipt, prompt_len)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the engine
            logger.error("steering for request %s cannot be placed; it ends with an error: %s", req_id, exc)
            self.recorder.forget(req_id)
            self.receipts.forget(req_id)
            self.failed.add(req_id)

    def _place(self, steering: EngineSteering, vectors: ShippedVectors, prompt_len: int) -> _Placed:
        placed = _Placed(RequestRows(self.batch.num_points, prompt_len, steering.anchor))
        try:
            for plan in plan_layers(steering, vectors.length):
                if not owns_point(plan.layer, self.first_block, self.end_block):
                    continue  # another pipeline rank owns this point
                self.table.acquire(plan, vectors.direction)
                placed.plans.append(plan)
        except BaseException:
            self._release(placed)
            raise
        self._refresh_after_moves()
        self._set_rows(placed)
        return placed

    def _set_rows(self, placed: _Placed) -> None:
        for plan in placed.plans:
            placed.rows.set_layer(plan, self.table.placed(plan.key).start)

    def _refresh_after_moves(self) -> None:
        """The table closed gaps by moving plans: re-read where every request's rows sit."""
        if self.table.generation != self._table_generation:
            self._table_generation = self.table.generation
            for placed in self._requests.values():
                self._set_rows(placed)

    def _release(self, placed: _Placed) -> None:
        for plan in placed.plans:
            self.table.release(plan.key)

    def finish_request(self, req_id: str) -> None:
        self.recorder.forget(req_id)
        self.receipts.forget(req_id)
        self.failed.discard(req_id)
        placed = self._requests.pop(req_id, None)
        if placed is not None:
            self._release(placed)

    def take_failed(self) -> set[str]:
        failed, self.failed = self.failed, set()
        return failed

    def rows_in_batch(self, req_ids: list[str]) -> list[RequestRows | None]:
        requests = self._requests
        if not requests:
            return [None] * len(req_ids)
        return [requests[r].rows if r in requests else None for r in req_ids]
