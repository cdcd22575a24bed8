"""Steering receipts: what a request was actually given, per layer (opt-in).

A request that asks for a receipt carries a receipt id. Steps holding such a request run
eagerly (as captures do), so requests that do not ask pay nothing. At every steered
stream point, for each of the request's tokens where steering acted (a row was added or
a projection applied), the relative dose ``‖Δh‖ / ‖h‖`` of the whole stream is kept by
position: a recomputed position (after preemption) replaces its earlier value. The
frontend collects the receipt with a worker RPC once the response is complete; requests
with ``n > 1`` report the prompt once and the generated tokens of every sequence.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from steer_vllm.batch import SteeringBatch

TAKE_RECEIPT_RPC = "steer_take_receipt"
_KEEP_S = 300.0  # receipts nobody took (the client went away) are dropped after this


@dataclass
class _Job:
    receipt_id: str
    prompt_len: int
    doses: dict[int, dict[int, float]] = field(default_factory=dict)  # point -> position -> dose
    started: float = field(default_factory=time.monotonic)


class ReceiptRecorder:
    def __init__(self, batch: SteeringBatch):
        self.batch = batch
        self.active = False
        self._jobs: dict[str, _Job] = {}  # req_id -> job, while the request runs
        self._finished: OrderedDict[str, list[_Job]] = OrderedDict()  # receipt id -> jobs, until taken
        self._slices: list[tuple[_Job, int, int, int]] = []  # job, first token, end token, first position

    def add(self, req_id: str, receipt_id: str, prompt_len: int) -> None:
        self._jobs[req_id] = _Job(receipt_id, prompt_len)

    def forget(self, req_id: str) -> None:
        """The request finished (vLLM tells the workers a step later): keep its receipt
        until the frontend takes it, or it expires."""
        job = self._jobs.pop(req_id, None)
        if job is not None:
            self._finished.setdefault(job.receipt_id, []).append(job)
        self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._finished:
            receipt_id, jobs = next(iter(self._finished.items()))
            if now - jobs[0].started <= _KEEP_S:
                break
            del self._finished[receipt_id]

    def has_jobs(self) -> bool:
        return bool(self._jobs)

    def begin_step(self, req_ids: list[str], req_index_of_token: np.ndarray, position_of_token: torch.Tensor) -> bool:
        """Find this step's tokens of requests with receipts; returns whether to record."""
        self._slices = []
        positions = None
        for slot, req_id in enumerate(req_ids):
            job = self._jobs.get(req_id)
            if job is None:
                continue
            tokens = np.flatnonzero(req_index_of_token == slot)
            if tokens.size == 0:
                continue
            if positions is None:
                positions = position_of_token.cpu().numpy()
            first, end = int(tokens[0]), int(tokens[-1]) + 1
            self._slices.append((job, first, end, int(positions[first])))
        self.active = bool(self._slices)
        return self.active

    def record(self, point: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """``before`` and ``after``: the whole stream at ``point`` without and with steering."""
        batch = self.batch
        acted = (batch.row_of_token[point, : before.shape[0]] != 0) | (batch.projection_of_token[point, : before.shape[0]] != 0)
        dose = ((after.float() - before.float()).norm(dim=-1) / before.float().norm(dim=-1).clamp_min(1e-30)).cpu()
        acted = acted.cpu()
        for job, first, end, first_pos in self._slices:
            for offset in np.flatnonzero(acted[first:end].numpy()):
                job.doses.setdefault(point, {})[first_pos + int(offset)] = float(dose[first + offset])

    def end_step(self) -> None:
        self._slices = []
        self.active = False

    def take(self, receipt_id: str) -> dict[int, dict] | None:
        """Per point: prompt and generated tokens steered, dose mean and max (RPC-safe);
        the jobs are dropped. None when this worker has no such receipt."""
        running = [r for r, job in self._jobs.items() if job.receipt_id == receipt_id]
        jobs = self._finished.pop(receipt_id, []) + [self._jobs.pop(r) for r in running]
        if not jobs:
            return None
        prompt: dict[int, dict[int, float]] = {}
        generated: dict[int, list[float]] = {}
        for job in jobs:
            for point, by_position in job.doses.items():
                for position, dose in by_position.items():
                    if position < job.prompt_len:
                        prompt.setdefault(point, {})[position] = dose
                    else:
                        generated.setdefault(point, []).append(dose)
        summary = {}
        for point in sorted(set(prompt) | set(generated)):
            doses = list(prompt.get(point, {}).values()) + generated.get(point, [])
            summary[point] = {
                "prompt_tokens": len(prompt.get(point, {})),
                "generated_tokens": len(generated.get(point, [])),
                "dose_mean": sum(doses) / len(doses),
                "dose_max": max(doses),
            }
        return summary


def merge_worker_receipts(per_worker: list[dict | None]) -> dict[int, dict]:
    """Tensor-parallel ranks report the same points; pipeline ranks report their own."""
    merged: dict[int, dict] = {}
    for result in per_worker:
        for point, stats in (result or {}).items():
            merged.setdefault(int(point), stats)
    return merged
