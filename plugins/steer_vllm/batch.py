"""Per step: the runner's current batch -> per-token row indices and scales.

Buffers are allocated once, sized to the runner's limits, and refilled in place before
every forward, so compiled graphs and CUDA graphs read the same addresses each step.
The fill runs on the device from the runner's own per-token request indices and
absolute positions, so it is exact under chunked prefill, preemption and padding.
"""
from __future__ import annotations

import numpy as np
import torch

from steer_vllm.slots import PlanRows

# Columns of a request's per-layer row plan.
FRONT_START, FRONT_LEN, PROMPT_REST_ROW, GENERATED_ROW = range(4)


class RequestRows:
    """One request's rows at every stream point 0..num_layers (zeros where unsteered)."""

    def __init__(self, num_points: int, prompt_len: int):
        self.rows = np.zeros((num_points, 4), dtype=np.int64)
        self.scales = np.zeros(num_points, dtype=np.float32)
        self.prompt_len = prompt_len

    def set_layer(self, layer: int, placed: PlanRows, scale: float) -> None:
        self.rows[layer] = (placed.front_start, placed.front_len, placed.prompt_rest_row, placed.generated_row)
        self.scales[layer] = scale


class SteeringBatch:
    """Owns ``row_of_token`` and ``scale_of_token``, both ``[num_layers + 1, max_tokens]``."""

    def __init__(self, num_points: int, max_tokens: int, max_reqs: int, dtype: torch.dtype, device: torch.device):
        self.num_points = num_points
        self.row_of_token = torch.zeros(num_points, max_tokens, dtype=torch.int64, device=device)
        self.scale_of_token = torch.zeros(num_points, max_tokens, dtype=dtype, device=device)
        self._rows_of_req = torch.zeros(max_reqs, num_points, 4, dtype=torch.int64, device=device)
        self._scales_of_req = torch.zeros(max_reqs, num_points, dtype=dtype, device=device)
        self._prompt_len_of_req = torch.zeros(max_reqs, dtype=torch.int64, device=device)
        self._host_rows = np.zeros((max_reqs, num_points, 4), dtype=np.int64)
        self._host_scales = np.zeros((max_reqs, num_points), dtype=np.float32)
        self._host_prompt_len = np.zeros(max_reqs, dtype=np.int64)
        self._clean = True  # buffers hold only zeros
        self.points_in_use = np.zeros(num_points, dtype=bool)  # points the last fill steers
        self._written = np.zeros(num_points, dtype=bool)  # points whose buffers may hold non-zeros

    def fill(
        self,
        rows_in_batch: list[RequestRows | None],
        req_index_of_token: torch.Tensor,
        position_of_token: torch.Tensor,
    ) -> None:
        """``rows_in_batch[i]`` is the i-th batch slot's rows (None: unsteered);
        ``req_index_of_token`` and ``position_of_token`` are ``[num_tokens]`` (the runner's
        own buffers: read, never written)."""
        if not any(r is not None for r in rows_in_batch):
            if not self._clean:
                self.row_of_token.zero_()
                self.scale_of_token.zero_()
                self.points_in_use[:] = False
                self._written[:] = False
                self._clean = True
            return
        self._clean = False
        num_reqs = len(rows_in_batch)
        self._host_rows[:num_reqs] = 0
        self._host_scales[:num_reqs] = 0
        for slot, request in enumerate(rows_in_batch):
            if request is not None:
                self._host_rows[slot] = request.rows
                self._host_scales[slot] = request.scales
                self._host_prompt_len[slot] = request.prompt_len
        np.any(self._host_scales[:num_reqs] != 0, axis=0, out=self.points_in_use)
        # Only the points this batch steers are computed; points steered before but not
        # now go back to zeros (compiled graphs add at every point).
        stale = np.flatnonzero(self._written & ~self.points_in_use)
        if stale.size:
            stale_points = torch.from_numpy(stale).to(self.row_of_token.device)
            self.row_of_token[stale_points] = 0
            self.scale_of_token[stale_points] = 0
        self._written |= self.points_in_use
        active = np.flatnonzero(self.points_in_use)
        if not active.size:
            return
        self._rows_of_req[:num_reqs].copy_(torch.from_numpy(self._host_rows[:num_reqs]), non_blocking=True)
        self._scales_of_req[:num_reqs].copy_(torch.from_numpy(self._host_scales[:num_reqs]), non_blocking=True)
        self._prompt_len_of_req[:num_reqs].copy_(torch.from_numpy(self._host_prompt_len[:num_reqs]), non_blocking=True)

        points = torch.from_numpy(active).to(self.row_of_token.device)
        num_tokens = req_index_of_token.shape[0]
        # Padded tokens (CUDA graphs) may carry stale request indices: clamp a copy.
        req = req_index_of_token.to(torch.int64).clamp(max=num_reqs - 1)
        pos = position_of_token.to(torch.int64)[:, None]  # [tokens, 1]
        plan = self._rows_of_req[:num_reqs, points][req]  # [tokens, active points, 4]
        in_front = pos < plan[..., FRONT_LEN]
        in_prompt = pos < self._prompt_len_of_req[req][:, None]
        row = torch.where(
            in_front,
            plan[..., FRONT_START] + pos,
            torch.where(in_prompt, plan[..., PROMPT_REST_ROW], plan[..., GENERATED_ROW]),
        )
        self.row_of_token[points, :num_tokens] = row.T
        self.scale_of_token[points, :num_tokens] = self._scales_of_req[:num_reqs, points][req].T
