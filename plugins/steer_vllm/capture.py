"""Residual capture through the serving engine: no second copy of the model.

A capture is an ordinary request (max_tokens=1) whose ``extra_args`` name the layers
to record. Steps that contain one run eagerly; the wrapped blocks hand the recorder
the stream at every point, and it keeps the capture requests' prompt positions. The
frontend then collects the result with a worker RPC. Captures get a unique cache salt
(see frontend.py), so prefix caching never skips a position.

Only this process can ask for one: a capture carries ``CAPTURE_TOKEN``, a secret made
at import, and the frontend hook refuses any capture without it, whatever entrypoint a
request came through. Workers keep finished captures for ``_KEEP_S`` seconds and at
most ``_MAX_UNCLAIMED_BYTES`` in all (oldest dropped first).
"""
from __future__ import annotations

import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from steer_vllm.spec import CAPTURE_KEY, STEERING_KEY

TAKE_CAPTURE_RPC = "steer_take_capture"
CAPTURE_TOKEN = secrets.token_hex(16)
_KEEP_S = 120.0
_MAX_UNCLAIMED_BYTES = 256 * 1024 * 1024


@dataclass
class _Job:
    capture_id: str
    layers: frozenset[int]
    prompt_len: int
    streams: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [prompt_len, hidden]
    filled: np.ndarray | None = None


class CaptureRecorder:
    """Worker side: which capture requests are in this step and where their tokens are."""

    def __init__(self) -> None:
        self.active = False
        self._jobs: dict[str, _Job] = {}  # req_id -> job
        self._done: OrderedDict[str, tuple[float, dict[int, torch.Tensor]]] = OrderedDict()  # id -> (finished at, streams)
        self._slices: list[tuple[_Job, int, int, int]] = []  # job, first token, end token, first position

    def add(self, req_id: str, capture_id: str, layers: list[int], prompt_len: int) -> None:
        job = _Job(capture_id, frozenset(layers), prompt_len)
        job.filled = np.zeros(prompt_len, dtype=bool)
        self._jobs[req_id] = job

    def forget(self, req_id: str) -> None:
        self._jobs.pop(req_id, None)

    def has_jobs(self) -> bool:
        return bool(self._jobs)

    def begin_step(self, req_ids: list[str], req_index_of_token: np.ndarray, position_of_token: torch.Tensor) -> bool:
        """Find this step's capture tokens; returns whether the step must record."""
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

    def record(self, point: int, stream: torch.Tensor) -> None:
        for job, first, end, first_pos in self._slices:
            if point not in job.layers:
                continue
            count = min(end - first, job.prompt_len - first_pos)
            if count <= 0:
                continue
            buffer = job.streams.get(point)
            if buffer is None:
                buffer = job.streams[point] = torch.zeros(job.prompt_len, stream.shape[-1], dtype=torch.float32)
            buffer[first_pos : first_pos + count] = stream[first : first + count].float().cpu()

    def end_step(self) -> None:
        for job, first, end, first_pos in self._slices:
            job.filled[first_pos : min(first_pos + end - first, job.prompt_len)] = True
            if job.filled.all() and job.capture_id not in self._done:
                self._done[job.capture_id] = (time.monotonic(), job.streams)
        self._drop_unclaimed()
        self._slices = []
        self.active = False

    def _drop_unclaimed(self) -> None:
        """Expire captures nobody collected, and keep the rest within the byte bound."""
        now = time.monotonic()
        kept = sum(stream.numel() * 4 for _, streams in self._done.values() for stream in streams.values())
        while self._done:
            finished, streams = next(iter(self._done.values()))
            if now - finished < _KEEP_S and kept <= _MAX_UNCLAIMED_BYTES:
                break
            kept -= sum(stream.numel() * 4 for stream in streams.values())
            self._done.popitem(last=False)

    def take(self, capture_id: str) -> dict[int, tuple[int, bytes]] | None:
        """The finished capture as ``{layer: (positions, float32 bytes)}`` (RPC-safe)."""
        done = self._done.pop(capture_id, None)
        if done is None:
            return None
        streams = done[1]
        return {layer: (stream.shape[0], stream.numpy().tobytes()) for layer, stream in streams.items()}


def capture_params(layers: list[int], steering: dict | None = None):
    """SamplingParams and id for a capture request of the given stream points (recorded
    as steered by ``steering``, the engine's spec, when given)."""
    from vllm import SamplingParams

    capture_id = uuid.uuid4().hex
    extra_args: dict = {CAPTURE_KEY: {"id": capture_id, "layers": layers, "token": CAPTURE_TOKEN}}
    if steering is not None:
        extra_args[STEERING_KEY] = steering
    params = SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra_args)
    return capture_id, params


def merge_worker_results(capture_id: str, per_worker: list[dict | None]) -> dict[int, torch.Tensor]:
    """Tensor-parallel ranks return copies; pipeline ranks return their own layers; the
    workers of other data-parallel engines return nothing."""
    merged: dict[int, torch.Tensor] = {}
    for result in per_worker:
        for layer, (positions, data) in (result or {}).items():
            stream = torch.frombuffer(bytearray(data), dtype=torch.float32)
            merged.setdefault(int(layer), stream.reshape(positions, -1))
    if not merged:
        raise RuntimeError(f"capture {capture_id}: no worker recorded it (is the steer plugin loaded?)")
    return merged


def capture_residuals(
    llm, prompts_token_ids: list[list[int]], layers: list[int], steering: dict | None = None
) -> list[dict[int, torch.Tensor]]:
    """Offline engine (``vllm.LLM``): the stream entering each layer, ``[len, hidden]`` per prompt."""
    from vllm.inputs import TokensPrompt

    jobs = [capture_params(layers, steering) for _ in prompts_token_ids]
    llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts_token_ids],
        [params for _, params in jobs],
        use_tqdm=False,
    )
    return [merge_worker_results(cid, llm.collective_rpc(TAKE_CAPTURE_RPC, args=(cid,))) for cid, _ in jobs]


async def capture_residuals_async(
    engine_client,
    prompts_token_ids: list[list[int]],
    layers: list[int],
    steering: dict | None = None,
    data_parallel_rank: int | None = None,
) -> list[dict[int, torch.Tensor]]:
    """The same through a running server's engine client (``AsyncLLM``); under data
    parallelism on the engine ``data_parallel_rank`` (vLLM's choice when None)."""
    import asyncio

    from vllm.inputs import TokensPrompt

    from steer_vllm.rpc import workers_rpc_async

    async def one(ids: list[int]) -> dict[int, torch.Tensor]:
        capture_id, params = capture_params(layers, steering)
        async for _ in engine_client.generate(TokensPrompt(prompt_token_ids=ids), params, f"steer-capture-{capture_id}",
                                              data_parallel_rank=data_parallel_rank):
            pass
        return merge_worker_results(capture_id, await workers_rpc_async(engine_client, TAKE_CAPTURE_RPC, (capture_id,)))

    return list(await asyncio.gather(*(one(ids) for ids in prompts_token_ids)))
