"""Scheduler side (the EngineCore process): a request is scheduled only when the table
rows its steering needs are guaranteed, the way vLLM's scheduler admits LoRA requests
only within ``max_loras``.

The accounting mirrors the workers' row table exactly: rows are counted per plan key
(requests with the same plan share rows), reserved when a request is first admitted and
returned when it finishes, so a worker can never run out of rows for a request it is
given. A request that does not fit waits in vLLM's queue; once one steered request has
been made to wait in a step, later ones that need new rows wait too, so large requests
are not starved by small ones. Checks that can only fail here (content that does not
decode) end the request with an error before any worker sees it.

Hooks on vLLM's ``Scheduler`` (private methods, so each one is proven by the status
report ``steer_engine_status``):
- ``schedule``: starts a step of admission;
- ``_handle_blocked_waiting_request``: the per-request gate of the waiting queue;
- ``_free_request``: every finished request, whatever ended it;
- ``update_from_output``: requests a worker could not steer end with an error, and the
  tokens it computed for them are never delivered.
"""
from __future__ import annotations

import functools
import logging

from steer_vllm.content import ShippedVectors
from steer_vllm.limits import table_rows_for_config
from steer_vllm.plans import plan_layers
from steer_vllm.settings import load_engine_settings
from steer_vllm.spec import SteeringSpecError, steering_of
from steer_vllm.vllm_internals import SCHEDULER_HOOKS as HOOKED_METHODS

logger = logging.getLogger("steer_vllm")

ENGINE_STATUS_UTILITY = "steer_engine_status"
# Set by workers on their ModelRunnerOutput: request ids whose steering they could not place.
FAILED_REQUESTS_ATTR = "steer_failed_req_ids"


class SteeringAdmission:
    def __init__(self, capacity: int, hidden_size: int):
        self.capacity = capacity
        self.hidden_size = hidden_size
        self._held: dict[str, list[int]] = {}  # plan key -> [rows, requests holding it]
        self._keys_of: dict[str, list[str]] = {}  # request id -> plan keys it holds
        self.rows_in_use = 0
        self._made_to_wait = False
        self.calls = dict.fromkeys(HOOKED_METHODS, 0)
        self.waits = 0  # times a request was held back for rows
        self.errors = 0

    def begin_step(self) -> None:
        self._made_to_wait = False

    def admit(self, request) -> bool:
        """Whether the request may be scheduled now; raises SteeringSpecError for content
        that cannot be steered (the caller ends the request with an error)."""
        if request.request_id in self._keys_of:
            return True  # reserved earlier (e.g. preempted and resumed)
        params = request.sampling_params
        extra_args = params.extra_args if params is not None else None
        steering = steering_of(extra_args)
        if steering is None:
            return True
        vectors = ShippedVectors(extra_args, steering, self.hidden_size)
        footprint = {plan.key: plan.num_rows for plan in plan_layers(steering, vectors.length)}
        needed = sum(rows for key, rows in footprint.items() if key not in self._held)
        if needed > self.capacity:
            raise SteeringSpecError(
                f"steering needs {needed} table rows; the table has {self.capacity} (--steering-table-rows)"
            )
        if needed and (self._made_to_wait or self.rows_in_use + needed > self.capacity):
            self._made_to_wait = True
            self.waits += 1
            return False
        for key, rows in footprint.items():
            held = self._held.setdefault(key, [rows, 0])
            if held[1] == 0:
                self.rows_in_use += rows
            held[1] += 1
        self._keys_of[request.request_id] = list(footprint)
        return True

    def release(self, request_id: str) -> None:
        for key in self._keys_of.pop(request_id, ()):
            held = self._held[key]
            held[1] -= 1
            if held[1] == 0:
                self.rows_in_use -= held[0]
                del self._held[key]

    def status(self) -> dict:
        return {
            "capacity": self.capacity,
            "rows_in_use": self.rows_in_use,
            "requests": len(self._keys_of),
            "waits": self.waits,
            "errors": self.errors,
            "hook_calls": dict(self.calls),
        }


def _admission(scheduler) -> SteeringAdmission:
    admission = scheduler.__dict__.get("_steer_admission")
    if admission is None:
        config = scheduler.vllm_config
        rows = table_rows_for_config(config, load_engine_settings())
        admission = SteeringAdmission(rows - 1, config.model_config.get_hidden_size())
        scheduler._steer_admission = admission
    return admission


def _counted(name: str, admission: SteeringAdmission) -> None:
    admission.calls[name] += 1


def _schedule(original):
    @functools.wraps(original)
    def schedule(self, *args, **kwargs):
        admission = _admission(self)
        _counted("schedule", admission)
        admission.begin_step()
        return original(self, *args, **kwargs)

    return schedule


def _handle_blocked_waiting_request(original):
    @functools.wraps(original)
    def handle_blocked_waiting_request(self, request) -> bool:
        admission = _admission(self)
        _counted("_handle_blocked_waiting_request", admission)
        if not original(self, request):
            return False
        try:
            return admission.admit(request)
        except SteeringSpecError as exc:
            # vLLM ends these with FINISHED_ERROR in update_from_output, before any worker sees them.
            logger.error("request %s refused by steering admission: %s", request.request_id, exc)
            admission.errors += 1
            self.grammar_compile_error_reqs.add(request.request_id)
            return False

    return handle_blocked_waiting_request


def _free_request(original):
    @functools.wraps(original)
    def free_request(self, request, *args, **kwargs):
        admission = _admission(self)
        _counted("_free_request", admission)
        admission.release(request.request_id)
        return original(self, request, *args, **kwargs)

    return free_request


def _blocks_of(scheduler, req_ids) -> set[int]:
    blocks: set[int] = set()
    for req_id in req_ids:
        if req_id in scheduler.requests:
            for group in scheduler.kv_cache_manager.get_block_ids(req_id):
                blocks.update(group)
    return blocks


def _update_from_output(original):
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output):
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
        from vllm.v1.request import RequestStatus

        admission = _admission(self)
        _counted("update_from_output", admission)
        failed = getattr(model_runner_output, FAILED_REQUESTS_ATTR, None)
        # The step computed their KV unsteered under their steered cache salt, and vLLM
        # registers block hashes at allocation: drop those blocks from the prefix cache so
        # no later request with the same steering reuses them.
        stale_blocks = _blocks_of(self, failed) if failed else set()
        # Finished first, so vLLM skips the tokens computed for them in this step.
        errored = self.finish_requests(failed, RequestStatus.FINISHED_ERROR) if failed else []
        if stale_blocks:
            self.kv_cache_manager.evict_blocks(stale_blocks)
        outputs = original(self, scheduler_output, model_runner_output)
        for request in errored:
            logger.error("request %s ended: a worker could not place its steering", request.request_id)
            admission.errors += 1
            client_outputs = outputs.setdefault(request.client_index, EngineCoreOutputs())
            client_outputs.outputs.append(
                EngineCoreOutput(request.request_id, [], finish_reason=request.get_finished_reason())
            )
        return outputs

    return update_from_output


_HOOKS = {
    "schedule": _schedule,
    "_handle_blocked_waiting_request": _handle_blocked_waiting_request,
    "_free_request": _free_request,
    "update_from_output": _update_from_output,
}


def install_scheduler_hooks() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from steer_vllm.hooks import patch

    for name in HOOKED_METHODS:
        patch(Scheduler, name, _HOOKS[name])
    _install_status_utility()


def scheduler_hook_status(scheduler) -> dict:
    """Which admission hooks the engine's scheduler class runs, and how often they ran."""
    from steer_vllm.hooks import is_hooked

    cls = type(scheduler)
    status = {"scheduler": cls.__name__, "hooked": {name: is_hooked(cls, name) for name in HOOKED_METHODS}}
    status.update(_admission(scheduler).status())
    return status


def _install_status_utility() -> None:
    """``EngineCore.steer_engine_status``: called by the frontend as an engine-core utility."""
    from vllm.v1.engine.core import EngineCore

    def steer_engine_status(self) -> dict:
        return scheduler_hook_status(self.scheduler)

    EngineCore.steer_engine_status = steer_engine_status
