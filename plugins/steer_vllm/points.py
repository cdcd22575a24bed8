"""What the wrapped decoder blocks call at each stream point: the steering op, and the
recorders that runs forced to be eager (captures, receipts) feed.

Where a block splits the stream in two (``hidden_states + residual``), the additions go
into one part, and the projection and norm terms, which depend on the whole stream, are
computed on the whole stream and added back to that part as a difference: exactly zero
for tokens nobody steers, so their streams stay bit-identical.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from steer_vllm.batch import SteeringBatch
from steer_vllm.ops import add_steering, project_and_rescale


class SteeringPoints:
    def __init__(self, vector_table: torch.Tensor, batch: SteeringBatch, recorder, receipts):
        self.vector_table = vector_table
        self.batch = batch
        self.recorder = recorder  # steer_vllm.capture.CaptureRecorder
        self.receipts = receipts  # steer_vllm.receipts.ReceiptRecorder
        # Set by the runner around each real forward: which points this batch steers.
        # Only read when running eagerly (never traced), so eager steps skip work at
        # points nobody steers; compiled graphs and CUDA graphs always contain all of it.
        self.points_in_use = None

    def apply(
        self,
        stream: torch.Tensor,
        point: int,
        full_stream: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Steer point ``point`` of ``stream``. ``full_stream`` rebuilds the whole residual
        stream from the part the block passes, where the block splits it in two."""
        eager = not torch.compiler.is_compiling() and self.points_in_use is not None
        if eager and not self.points_in_use[point]:
            steered = stream
        else:
            batch = self.batch
            whole = full_stream or (lambda part: part)
            doses = not eager or batch.doses_in_use[point]
            projects = not eager or batch.projections_in_use[point]
            # The whole stream's norm before steering: what a dose is relative to, and what
            # norm preservation restores.
            norm = whole(stream).float().norm(dim=-1) if doses or projects else None
            steered = add_steering(stream, self.vector_table, batch.row_of_token[point], batch.scale_of_token[point],
                                   batch.dose_of_token[point], norm if doses else None)
            if projects:
                added = whole(steered)
                projected = project_and_rescale(
                    norm, added, self.vector_table, batch.direction_row_of_token[point],
                    batch.projection_of_token[point], batch.target_of_token[point], batch.preserve_of_token[point],
                )
                steered = projected if full_stream is None else steered + (projected - added)
        # The recorders are only active in steps the runner forces to run eagerly, so the
        # compiled graph never contains these branches.
        if self.receipts.active:
            whole = full_stream or (lambda part: part)
            self.receipts.record(point, whole(stream), whole(steered))
        if self.recorder.active:
            self.recorder.record(point, steered if full_stream is None else full_stream(steered))
        return steered
