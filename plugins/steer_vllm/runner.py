"""Hooks into vLLM's V1 model runner (GPU and CPU) and its workers.

- after ``load_model``: wrap the blocks and allocate the table and buffers;
- ``_update_states``: requests that finished give their rows back, new ones take rows;
- ``_model_forward`` (runs right before the model, inside the forward context, for every
  real step): refill the per-token buffers from *this* step's batch; steps holding a
  capture request run eagerly so the recorder sees the stream;
- ``execute_model`` / ``sample_tokens``: the step's output names the requests whose
  steering could not be placed, so the scheduler ends them with an error.

``steer_status`` (a worker RPC) reports, per hook, whether the runner class vLLM built
resolves to our wrapper and how often it ran; the frontend refuses to start otherwise.
"""
from __future__ import annotations

import functools
import logging

from steer_vllm.admission import FAILED_REQUESTS_ATTR
from steer_vllm.capture import TAKE_CAPTURE_RPC
from steer_vllm.hooks import is_hooked, patch
from steer_vllm.limits import table_rows_for_config
from steer_vllm.manager import SteeringManager
from steer_vllm.receipts import TAKE_RECEIPT_RPC
from steer_vllm.settings import load_engine_settings
from steer_vllm.vllm_internals import RUNNER_HOOKS

logger = logging.getLogger("steer_vllm")

STATUS_RPC = "steer_status"


def _calls(runner) -> dict[str, int]:
    calls = runner.__dict__.get("_steer_calls")
    if calls is None:
        calls = runner._steer_calls = dict.fromkeys(RUNNER_HOOKS, 0)
    return calls


def _after_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _calls(self)["load_model"] += 1
        settings = load_engine_settings()
        self._steering = SteeringManager(
            self.get_model(),
            table_rows=table_rows_for_config(self.vllm_config, settings),
            hidden_size=self.model_config.get_hidden_size(),
            dtype=self.dtype,
            device=self.device,
            max_tokens=self.max_num_tokens,
            max_reqs=self.max_num_reqs,
            allowed_architectures=settings.allow_architectures,
        )
        logger.info("steer-server: steering installed on %s (%s)", type(self.get_model()).__name__, self._steering.status())
        return result

    return load_model


def _prompt_len(new_request) -> int:
    if new_request.prompt_token_ids is not None:
        return len(new_request.prompt_token_ids)
    embeds = new_request.prompt_embeds
    return 0 if embeds is None else int(embeds.shape[0])


def _update_states(original):
    @functools.wraps(original)
    def update_states(self, scheduler_output):
        _calls(self)["_update_states"] += 1
        manager: SteeringManager = self._steering
        for req_id in scheduler_output.finished_req_ids:
            manager.finish_request(req_id)
        result = original(self, scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            if params is not None and params.extra_args:
                manager.add_request(new.req_id, params.extra_args, _prompt_len(new))
        self._steer_num_scheduled = scheduler_output.total_num_scheduled_tokens
        return result

    return update_states


def _model_forward(original):
    @functools.wraps(original)
    def model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        _calls(self)["_model_forward"] += 1
        manager: SteeringManager = self._steering
        req_ids = self.input_batch.req_ids
        num_tokens = positions.shape[-1]
        manager.batch.fill(manager.rows_in_batch(req_ids), self.req_indices.gpu[:num_tokens], positions)
        # Captures and receipts record in steps forced to run eagerly.
        token_requests = self.req_indices.np[: self._steer_num_scheduled]
        capturing = manager.recorder.has_jobs() and manager.recorder.begin_step(req_ids, token_requests, positions)
        receipting = manager.receipts.has_jobs() and manager.receipts.begin_step(req_ids, token_requests, positions)
        recording = capturing or receipting
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
            if capturing:
                manager.recorder.end_step()
            if receipting:
                manager.receipts.end_step()

    return model_forward


def _report_failures(name: str):
    def make(original):
        @functools.wraps(original)
        def method(self, *args, **kwargs):
            from vllm.v1.outputs import ModelRunnerOutput

            _calls(self)[name] += 1
            output = original(self, *args, **kwargs)
            manager: SteeringManager | None = getattr(self, "_steering", None)
            if manager is not None and manager.failed and isinstance(output, ModelRunnerOutput):
                setattr(output, FAILED_REQUESTS_ATTR, manager.take_failed())
            return output

        return method

    return make


def _worker_status(worker) -> dict:
    runner = getattr(worker, "model_runner", None)
    cls = type(runner)
    manager = getattr(runner, "_steering", None)
    status = {
        "runner": f"{cls.__module__}.{cls.__qualname__}",
        "installed": manager is not None,
        "hooked": {name: is_hooked(cls, name) for name in RUNNER_HOOKS},
        "hook_calls": dict(_calls(runner)) if runner is not None else {},
    }
    if manager is not None:
        status.update(manager.status())
    return status


def _worker_take_capture(worker, capture_id: str):
    return worker.model_runner._steering.recorder.take(capture_id)


def _worker_take_receipt(worker, receipt_id: str):
    return worker.model_runner._steering.receipts.take(receipt_id)


def install_runner_hooks() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    for cls in (GPUModelRunner, CPUModelRunner):
        patch(cls, "load_model", _after_load_model)
    patch(GPUModelRunner, "_update_states", _update_states)
    patch(GPUModelRunner, "_model_forward", _model_forward)
    for name in ("execute_model", "sample_tokens"):
        patch(GPUModelRunner, name, _report_failures(name))
    setattr(WorkerBase, STATUS_RPC, _worker_status)
    setattr(WorkerBase, TAKE_CAPTURE_RPC, _worker_take_capture)
    setattr(WorkerBase, TAKE_RECEIPT_RPC, _worker_take_receipt)
