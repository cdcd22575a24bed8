"""Per step: the runner's current batch -> per-token row indices and operation values.

Buffers are allocated once, sized to the runner's limits, and refilled in place before
every forward, so compiled graphs and CUDA graphs read the same addresses each step.
The fill runs on the device from the runner's own per-token request indices and
absolute positions, so it is exact under chunked prefill, preemption and padding.

Per point and token the op reads: the row to add and its scale (a coefficient, or a dose
the op multiplies by the token's stream norm), the row of the unit direction to project
on, the projection's weight (1 where an ablate or clamp covers the token, else 0) and
target (the clamp value, 0 for ablate), and whether to restore the stream's norm. A
token's row comes from the segment of its request's plan that holds its position
(``segments.Segment``, made absolute when the request is placed). Unsteered tokens, and
positions no segment covers, read the zero row and zeros everywhere, which leaves them
unchanged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from steer_vllm.segments import ANCHOR, FRONT_END, MAX_SEGMENTS, NO_END, PROMPT_END, START, Bound

if TYPE_CHECKING:
    from steer_vllm.plans import LayerPlan

# Columns of a request's segments at one point.
LO, HI, BASE, STRIDE, PROJECT = range(5)
# Columns of a request's per-point values.
SCALE, DOSE, TARGET, PRESERVE = range(4)
_NO_END = 1 << 62


class RequestRows:
    """One request's segments and values at every stream point 0..num_layers (none where
    unsteered). ActAdd row 0 falls on absolute position ``anchor``."""

    def __init__(self, num_points: int, prompt_len: int, anchor: int = 0):
        self.segments = np.zeros((num_points, MAX_SEGMENTS, 5), dtype=np.int64)
        self.direction_rows = np.zeros(num_points, dtype=np.int64)
        self.values = np.zeros((num_points, 4), dtype=np.float32)
        self.num_segments = 0  # the most any point uses
        self.prompt_len = prompt_len
        self.anchor = anchor

    def _position(self, bound: Bound, front_len: int) -> int:
        origin, offset = bound
        return {START: 0, ANCHOR: self.anchor, FRONT_END: self.anchor + front_len,
                PROMPT_END: self.prompt_len, NO_END: _NO_END}[origin] + offset

    def set_layer(self, plan: LayerPlan, start: int) -> None:
        """The plan's segments at absolute positions; ``start``: its first table row."""
        layer = plan.layer
        self.segments[layer] = 0
        for i, segment in enumerate(plan.segments):
            base = 0 if segment.row is None else start + segment.row
            self.segments[layer, i] = (self._position(segment.lo, plan.front_len), self._position(segment.hi, plan.front_len),
                                       base, segment.stride, segment.project)
        self.num_segments = max(self.num_segments, len(plan.segments))
        projection = plan.projection
        self.direction_rows[layer] = 0 if projection is None else start + plan.direction_row
        target = projection.value if projection is not None and projection.op == "clamp" else 0.0
        self.values[layer] = (0.0 if plan.relative else plan.scale, plan.scale if plan.relative else 0.0, target,
                              float(plan.preserve_norm))


class SteeringBatch:
    """Owns the per-token buffers, each ``[num_layers + 1, max_tokens]``."""

    def __init__(self, num_points: int, max_tokens: int, max_reqs: int, dtype: torch.dtype, device: torch.device):
        self.num_points = num_points

        def per_token(kind: torch.dtype) -> torch.Tensor:
            return torch.zeros(num_points, max_tokens, dtype=kind, device=device)

        self.row_of_token = per_token(torch.int64)
        self.scale_of_token = per_token(dtype)
        self.dose_of_token = per_token(torch.float32)
        self.direction_row_of_token = per_token(torch.int64)
        self.projection_of_token = per_token(torch.float32)
        self.target_of_token = per_token(torch.float32)
        self.preserve_of_token = per_token(torch.float32)
        self._buffers = (self.row_of_token, self.scale_of_token, self.dose_of_token, self.direction_row_of_token,
                         self.projection_of_token, self.target_of_token, self.preserve_of_token)
        self._segments_of_req = torch.zeros(max_reqs, num_points, MAX_SEGMENTS, 5, dtype=torch.int64, device=device)
        self._direction_row_of_req = torch.zeros(max_reqs, num_points, dtype=torch.int64, device=device)
        self._values_of_req = torch.zeros(max_reqs, num_points, 4, dtype=torch.float32, device=device)
        self._host_segments = np.zeros((max_reqs, num_points, MAX_SEGMENTS, 5), dtype=np.int64)
        self._host_direction_rows = np.zeros((max_reqs, num_points), dtype=np.int64)
        self._host_values = np.zeros((max_reqs, num_points, 4), dtype=np.float32)
        self._clean = True  # buffers hold only zeros
        self.points_in_use = np.zeros(num_points, dtype=bool)  # points the last fill steers
        self.projections_in_use = np.zeros(num_points, dtype=bool)  # ... where something projects or rescales
        self.doses_in_use = np.zeros(num_points, dtype=bool)  # ... where an addition is a dose
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
                for in_use in (self.points_in_use, self.projections_in_use, self.doses_in_use, self._written):
                    in_use[:] = False
                self._clean = True
            return
        self._clean = False
        num_reqs = len(rows_in_batch)
        self._host_segments[:num_reqs] = 0
        self._host_direction_rows[:num_reqs] = 0
        self._host_values[:num_reqs] = 0
        num_segments = 1
        for slot, request in enumerate(rows_in_batch):
            if request is not None:
                self._host_segments[slot] = request.segments
                self._host_direction_rows[slot] = request.direction_rows
                self._host_values[slot] = request.values
                num_segments = max(num_segments, request.num_segments)
        values = self._host_values[:num_reqs]
        projects = np.any(self._host_segments[:num_reqs, :, :, PROJECT] != 0, axis=(0, 2))
        np.logical_or(projects, np.any(values[..., PRESERVE] != 0, axis=0), out=self.projections_in_use)
        np.any(values[..., DOSE] != 0, axis=0, out=self.doses_in_use)
        np.any(values[..., SCALE] != 0, axis=0, out=self.points_in_use)
        self.points_in_use |= self.projections_in_use | self.doses_in_use
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
        for device_copy, host in ((self._segments_of_req, self._host_segments),
                                  (self._direction_row_of_req, self._host_direction_rows),
                                  (self._values_of_req, self._host_values)):
            device_copy[:num_reqs].copy_(torch.from_numpy(host[:num_reqs]), non_blocking=True)

        points = torch.from_numpy(active).to(self.row_of_token.device)
        num_tokens = req_index_of_token.shape[0]
        # Padded tokens (CUDA graphs) may carry stale request indices: clamp a copy.
        req = req_index_of_token.to(torch.int64).clamp(max=num_reqs - 1)
        pos = position_of_token.to(torch.int64)[:, None, None]  # [tokens, 1, 1]
        segments = self._segments_of_req[:num_reqs, points, :num_segments][req]  # [tokens, active points, segments, 5]
        inside = (pos >= segments[..., LO]) & (pos < segments[..., HI])  # at most one segment per token and point
        row = torch.where(inside, segments[..., BASE] + segments[..., STRIDE] * (pos - segments[..., LO]), 0).sum(-1)
        project = (inside & (segments[..., PROJECT] != 0)).any(-1).float()  # [tokens, active points]
        acted = inside.any(-1).float()
        token_values = self._values_of_req[:num_reqs, points][req]  # [tokens, active points, 4]
        self.row_of_token[points, :num_tokens] = row.T
        self.direction_row_of_token[points, :num_tokens] = self._direction_row_of_req[:num_reqs, points][req].T
        self.scale_of_token[points, :num_tokens] = (token_values[..., SCALE] * acted).T.to(self.scale_of_token.dtype)
        self.dose_of_token[points, :num_tokens] = (token_values[..., DOSE] * acted).T
        self.projection_of_token[points, :num_tokens] = project.T
        self.target_of_token[points, :num_tokens] = (token_values[..., TARGET] * project).T
        self.preserve_of_token[points, :num_tokens] = (token_values[..., PRESERVE] * acted).T
