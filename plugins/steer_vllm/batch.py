"""Per step: the runner's current batch -> per-token row indices and operation values.

Buffers are allocated once, sized to the runner's limits, and refilled in place before
every forward, so compiled graphs and CUDA graphs read the same addresses each step.
The fill runs on the device from the runner's own per-token request indices and
absolute positions, so it is exact under chunked prefill, preemption and padding.

Per point and token the op reads: the row to add and its scale, the row of the unit
direction to project on, the projection's weight (1 for ablate and clamp, else 0) and
target (the clamp value, 0 for ablate), and whether to restore the stream's norm.
Unsteered tokens read the zero row and zeros everywhere, which leaves them unchanged.
"""
from __future__ import annotations

import numpy as np
import torch

# Columns of a request's per-point rows.
FRONT_START, FRONT_LEN, PROMPT_REST_ROW, GENERATED_ROW, DIRECTION_ROW = range(5)
# Columns of a request's per-point values.
SCALE, PROJECTION, TARGET, PRESERVE = range(4)


class RequestRows:
    """One request's rows and values at every stream point 0..num_layers (zeros where
    unsteered). ActAdd row 0 falls on absolute position ``anchor``."""

    def __init__(self, num_points: int, prompt_len: int, anchor: int = 0):
        self.rows = np.zeros((num_points, 5), dtype=np.int64)
        self.values = np.zeros((num_points, 4), dtype=np.float32)
        self.prompt_len = prompt_len
        self.anchor = anchor

    def set_layer(self, layer: int, placed, scale: float, projection: float, target: float, preserve: bool) -> None:
        """``placed``: the plan's ``slots.PlanRows``."""
        self.rows[layer] = (placed.front_start, placed.front_len, placed.prompt_rest_row, placed.generated_row,
                            placed.direction_row)
        self.values[layer] = (scale, projection, target, float(preserve))


class SteeringBatch:
    """Owns the per-token buffers, each ``[num_layers + 1, max_tokens]``."""

    def __init__(self, num_points: int, max_tokens: int, max_reqs: int, dtype: torch.dtype, device: torch.device):
        self.num_points = num_points

        def per_token(kind: torch.dtype) -> torch.Tensor:
            return torch.zeros(num_points, max_tokens, dtype=kind, device=device)

        self.row_of_token = per_token(torch.int64)
        self.scale_of_token = per_token(dtype)
        self.direction_row_of_token = per_token(torch.int64)
        self.projection_of_token = per_token(torch.float32)
        self.target_of_token = per_token(torch.float32)
        self.preserve_of_token = per_token(torch.float32)
        self._buffers = (self.row_of_token, self.scale_of_token, self.direction_row_of_token,
                         self.projection_of_token, self.target_of_token, self.preserve_of_token)
        self._rows_of_req = torch.zeros(max_reqs, num_points, 5, dtype=torch.int64, device=device)
        self._values_of_req = torch.zeros(max_reqs, num_points, 4, dtype=torch.float32, device=device)
        self._prompt_len_of_req = torch.zeros(max_reqs, dtype=torch.int64, device=device)
        self._anchor_of_req = torch.zeros(max_reqs, dtype=torch.int64, device=device)
        self._host_rows = np.zeros((max_reqs, num_points, 5), dtype=np.int64)
        self._host_values = np.zeros((max_reqs, num_points, 4), dtype=np.float32)
        self._host_prompt_len = np.zeros(max_reqs, dtype=np.int64)
        self._host_anchor = np.zeros(max_reqs, dtype=np.int64)
        self._clean = True  # buffers hold only zeros
        self.points_in_use = np.zeros(num_points, dtype=bool)  # points the last fill steers
        self.projections_in_use = np.zeros(num_points, dtype=bool)  # ... where something projects or rescales
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
                for buffer in self._buffers:
                    buffer.zero_()
                self.points_in_use[:] = False
                self.projections_in_use[:] = False
                self._written[:] = False
                self._clean = True
            return
        self._clean = False
        num_reqs = len(rows_in_batch)
        self._host_rows[:num_reqs] = 0
        self._host_values[:num_reqs] = 0
        for slot, request in enumerate(rows_in_batch):
            if request is not None:
                self._host_rows[slot] = request.rows
                self._host_values[slot] = request.values
                self._host_prompt_len[slot] = request.prompt_len
                self._host_anchor[slot] = request.anchor
        values = self._host_values[:num_reqs]
        np.any(values[..., (PROJECTION, PRESERVE)] != 0, axis=(0, 2), out=self.projections_in_use)
        np.any(values[..., SCALE] != 0, axis=0, out=self.points_in_use)
        self.points_in_use |= self.projections_in_use
        # Only the points this batch steers are computed; points steered before but not
        # now go back to zeros (compiled graphs apply every point).
        stale = np.flatnonzero(self._written & ~self.points_in_use)
        if stale.size:
            stale_points = torch.from_numpy(stale).to(self.row_of_token.device)
            for buffer in self._buffers:
                buffer[stale_points] = 0
        self._written |= self.points_in_use
        active = np.flatnonzero(self.points_in_use)
        if not active.size:
            return
        for device_copy, host in ((self._rows_of_req, self._host_rows), (self._values_of_req, self._host_values),
                                  (self._prompt_len_of_req, self._host_prompt_len),
                                  (self._anchor_of_req, self._host_anchor)):
            device_copy[:num_reqs].copy_(torch.from_numpy(host[:num_reqs]), non_blocking=True)

        points = torch.from_numpy(active).to(self.row_of_token.device)
        num_tokens = req_index_of_token.shape[0]
        # Padded tokens (CUDA graphs) may carry stale request indices: clamp a copy.
        req = req_index_of_token.to(torch.int64).clamp(max=num_reqs - 1)
        pos = position_of_token.to(torch.int64)[:, None]  # [tokens, 1]
        rel = pos - self._anchor_of_req[req][:, None]  # position within the ActAdd rows
        plan = self._rows_of_req[:num_reqs, points][req]  # [tokens, active points, 5]
        in_front = (rel >= 0) & (rel < plan[..., FRONT_LEN])
        in_prompt = pos < self._prompt_len_of_req[req][:, None]
        row = torch.where(
            in_front,
            plan[..., FRONT_START] + rel,
            torch.where(in_prompt, plan[..., PROMPT_REST_ROW], plan[..., GENERATED_ROW]),
        )
        token_values = self._values_of_req[:num_reqs, points][req]  # [tokens, active points, 4]
        self.row_of_token[points, :num_tokens] = row.T
        self.direction_row_of_token[points, :num_tokens] = plan[..., DIRECTION_ROW].T
        self.scale_of_token[points, :num_tokens] = token_values[..., SCALE].T.to(self.scale_of_token.dtype)
        self.projection_of_token[points, :num_tokens] = token_values[..., PROJECTION].T
        self.target_of_token[points, :num_tokens] = token_values[..., TARGET].T
        self.preserve_of_token[points, :num_tokens] = token_values[..., PRESERVE].T
