"""Hooks into vLLM's V1 model runner (GPU and CPU) and its workers.

- after ``load_model``: wrap the blocks and allocate the table and buffers;
- ``_update_states``: requests that finished give their rows back, new ones take rows;
- ``_model_forward`` (runs right before the model, inside the forward context, for every
  real step): refill the per-token buffers from *this* step's batch; steps holding a
  capture request run eagerly so the recorder sees the stream.
"""
from __future__ import annotations

import functools
import logging

from steer_vllm.capture import TAKE_CAPTURE_RPC
from steer_vllm.manager import SteeringManager

logger = logging.getLogger("steer_vllm")

STATUS_RPC = "steer_status"


def _after_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        config = self.model_config
        self._steering = SteeringManager(
            self.get_model(),
            hidden_size=config.get_hidden_size(),
            dtype=self.dtype,
            device=self.device,
            max_tokens=self.max_num_tokens,
            max_reqs=self.max_num_reqs,
        )
        logger.info("steer-server: steering installed on %s (%s)", type(self.get_model()).__name__, self._steering.status())
        return result

    load_model._steer_hook = True
    return load_model


def _update_states(original):
    @functools.wraps(original)
    def update_states(self, scheduler_output):
        manager: SteeringManager = self._steering
        for req_id in scheduler_output.finished_req_ids:
            manager.finish_request(req_id)
        result = original(self, scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            if params is not None and params.extra_args:
                manager.add_request(new.req_id, params.extra_args, len(new.prompt_token_ids or ()))
        self._steer_num_scheduled = scheduler_output.total_num_scheduled_tokens
        return result

    update_states._steer_hook = True
    return update_states


def _model_forward(original):
    @functools.wraps(original)
    def model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        manager: SteeringManager = self._steering
        req_ids = self.input_batch.req_ids
        num_tokens = positions.shape[-1]
        manager.batch.fill(manager.rows_in_batch(req_ids), self.req_indices.gpu[:num_tokens], positions)
        recording = manager.recorder.has_jobs() and manager.recorder.begin_step(
            req_ids, self.req_indices.np[: self._steer_num_scheduled], positions
        )
        if recording:
            from vllm.config import CUDAGraphMode
            from vllm.forward_context import get_forward_context

            context = get_forward_context()
            context.skip_compiled = True
            context.cudagraph_runtime_mode = CUDAGraphMode.NONE
        manager.points.points_in_use = manager.batch.points_in_use
        try:
            return original(self, input_ids, positions, *args, **kwargs)
        finally:
            # Outside real steps (warm-up, CUDA graph capture) every point adds.
            manager.points.points_in_use = None
            if recording:
                manager.recorder.end_step()

    model_forward._steer_hook = True
    return model_forward


def _patch(cls, name: str, make) -> None:
    current = cls.__dict__.get(name)
    if current is not None and not getattr(current, "_steer_hook", False):
        setattr(cls, name, make(current))


def _worker_status(worker) -> dict:
    runner = getattr(worker, "model_runner", None)
    manager = getattr(runner, "_steering", None)
    status = {"runner": type(runner).__name__, "installed": manager is not None}
    if manager is not None:
        status.update(manager.status())
    return status


def _worker_take_capture(worker, capture_id: str):
    return worker.model_runner._steering.recorder.take(capture_id)


def install_runner_hooks() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    for cls in (GPUModelRunner, CPUModelRunner):
        _patch(cls, "load_model", _after_load_model)
    _patch(GPUModelRunner, "_update_states", _update_states)
    _patch(GPUModelRunner, "_model_forward", _model_forward)
    setattr(WorkerBase, STATUS_RPC, _worker_status)
    setattr(WorkerBase, TAKE_CAPTURE_RPC, _worker_take_capture)
