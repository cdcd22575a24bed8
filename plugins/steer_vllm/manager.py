"""Worker side state: which requests are steered and which table rows they hold.

Like vLLM's LoRA model manager: this owns the slots (table rows), the batch object
owns the per-token buffers, the op only computes.
"""
from __future__ import annotations

import logging
import os

import torch

from steer_vllm.batch import RequestRows, SteeringBatch
from steer_vllm.capture import CaptureRecorder
from steer_vllm.models import SteeringPoints, block_list, install_steering, owns_point
from steer_vllm.plans import plan_layers
from steer_vllm.slots import RowsExhausted, RowTable
from steer_vllm.spec import EngineAddition, SteeringSpecError, capture_of, steering_of
from steer_vllm.vector_cache import VectorCache

logger = logging.getLogger("steer_vllm")

TABLE_ROWS_ENV = "STEER_TABLE_ROWS"


class SteeringManager:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_tokens: int,
        max_reqs: int,
        vectors: VectorCache | None = None,
    ):
        table_rows = int(os.environ.get(TABLE_ROWS_ENV, max(4096, 16 * max_reqs + 1)))
        self.table = RowTable(table_rows, hidden_size, dtype, device)
        self.recorder = CaptureRecorder()
        self.vectors = vectors or VectorCache()
        self.hidden_size = hidden_size
        blocks, self.first_block, self.end_block, _ = block_list(model)
        self.num_layers = len(blocks)
        self.batch = SteeringBatch(self.num_layers + 1, max_tokens, max_reqs, dtype, device)
        self.points = SteeringPoints(self.table.vector_table, self.batch.row_of_token, self.batch.scale_of_token, self.recorder)
        install_steering(model, self.points)
        self._requests: dict[str, tuple[RequestRows, list[str]]] = {}

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
                self._requests[req_id] = self._place(steering, prompt_len)
        except (SteeringSpecError, KeyError, RowsExhausted) as exc:
            # The frontend validated this request; getting here means the store changed
            # under it or the table is full. Failing the whole engine would hurt every
            # other request, so this one runs unsteered and the error is logged.
            logger.error("steering for request %s not applied: %s", req_id, exc)

    def _place(self, steering, prompt_len: int) -> tuple[RequestRows, list[str]]:
        def direction_of(addition: EngineAddition) -> torch.Tensor:
            return self.vectors.get(addition.vector).directions[addition.direction_layer]

        plans = plan_layers(steering, direction_of)
        rows = RequestRows(self.batch.num_points, prompt_len)
        keys: list[str] = []
        try:
            for plan in plans:
                if not owns_point(plan.layer, self.first_block, self.end_block):
                    continue  # another pipeline rank owns this point
                rows.set_layer(plan.layer, self.table.acquire(plan), plan.scale)
                keys.append(plan.key)
        except RowsExhausted:
            for key in keys:
                self.table.release(key)
            raise
        return rows, keys

    def finish_request(self, req_id: str) -> None:
        self.recorder.forget(req_id)
        placed = self._requests.pop(req_id, None)
        if placed is not None:
            for key in placed[1]:
                self.table.release(key)

    def rows_in_batch(self, req_ids: list[str]) -> list[RequestRows | None]:
        requests = self._requests
        if not requests:
            return [None] * len(req_ids)
        return [requests[r][0] if r in requests else None for r in req_ids]

