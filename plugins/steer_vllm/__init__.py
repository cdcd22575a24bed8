"""steer_vllm: per-request activation steering inside vLLM's batched forward pass.

Loaded by vLLM in every process through the ``vllm.general_plugins`` entry point.
vLLM only logs a plugin that fails, so callers prove it with ``check_engine``: every
hook in every process (the frontend's input processor, the scheduler, each worker's
model runner) is reported, and a missing one refuses the engine with its name.

Importing this package needs nothing but the standard library: the op, the per-token
buffers and their fill (``ops``, ``batch``) run with torch alone, e.g. on a GPU machine
without vLLM (``tests/plugin/test_gpu_op.py``); the wire format comes from ``spec``.
"""
from __future__ import annotations

from steer_vllm.hooks import SteeringNotInstalled

_FROM_SPEC = ("CAPTURE_KEY", "STEERING_KEY", "EngineAddition", "EngineSteering", "SteeringSpecError")


def __getattr__(name: str):
    if name in _FROM_SPEC:
        from steer_vllm import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'steer_vllm' has no attribute {name!r}")

__all__ = [
    "CAPTURE_KEY",
    "STEERING_KEY",
    "EngineAddition",
    "EngineSteering",
    "SteeringNotInstalled",
    "SteeringSpecError",
    "check_engine",
    "check_engine_async",
    "register",
]




def register() -> None:
    from steer_vllm.vllm_internals import check

    check("engine")  # every vLLM symbol the hooks need, named if an upgrade moved it
    # The hooks cover the V1 model runner; a runner the user chose is never overridden
    # (V2 is then refused with a reason, see steer_vllm.support).
    from steer_vllm.settings import select_v1_runner_unless_chosen

    select_v1_runner_unless_chosen()
    from steer_vllm.admission import install_scheduler_hooks
    from steer_vllm.frontend import install_frontend_hooks
    from steer_vllm.runner import install_runner_hooks
    from steer_vllm.support import install_configuration_checks

    install_configuration_checks()
    install_runner_hooks()
    install_scheduler_hooks()
    install_frontend_hooks()


def problems(worker_statuses: list[dict], engine_statuses: list[dict], *, ran: bool) -> list[str]:
    """What keeps steering from being exact, from the status reports; ``ran`` also asks
    that every per-step hook has run (true once a steered request went through)."""
    from vllm.config import VllmConfig
    from vllm.v1.engine.input_processor import InputProcessor

    from steer_vllm.hooks import is_hooked

    found = []
    # The configuration refusals (steer_vllm.support) run in this process too.
    for cls, name in ((InputProcessor, "process_inputs"), (InputProcessor, "__init__"),
                      (VllmConfig, "_validate_v2_model_runner")):
        if not is_hooked(cls, name):
            found.append(f"the frontend hook {cls.__name__}.{name} is not installed in this process")
    if not worker_statuses:
        found.append("no worker answered")
    for rank, status in enumerate(worker_statuses):
        where = f"worker {rank} ({status.get('runner')})"
        if not status.get("installed"):
            found.append(f"{where}: steering was not installed when the model loaded")
        for hook, hooked in status.get("hooked", {}).items():
            if not hooked:
                found.append(f"{where}: hook {hook} is not installed on the runner vLLM built")
            elif ran and hook != "load_model" and not status["hook_calls"].get(hook):
                found.append(f"{where}: hook {hook} never ran")
    for index, status in enumerate(engine_statuses):
        where = f"engine {index} ({status.get('scheduler')})"
        for hook, hooked in status.get("hooked", {}).items():
            if not hooked:
                found.append(f"{where}: scheduler hook {hook} is not installed")
            elif ran and not status["hook_calls"].get(hook):
                found.append(f"{where}: scheduler hook {hook} never ran")
    return found


def _checked(worker_statuses: list[dict], engine_statuses: list[dict], ran: bool) -> dict:
    found = problems(worker_statuses, engine_statuses, ran=ran)
    if found:
        raise SteeringNotInstalled(
            "steering is not installed exactly, so steer-server refuses to serve: " + "; ".join(found)
            + ". steer-server needs vLLM's V1 model runner and the 'steer' plugin in every vLLM process."
        )
    return {"workers": worker_statuses, "engines": engine_statuses}


def _refusal(exc: Exception) -> SteeringNotInstalled | None:
    """vLLM reports a process without our RPC or utility as a plain error naming it."""
    from steer_vllm.admission import ENGINE_STATUS_UTILITY
    from steer_vllm.runner import STATUS_RPC

    if isinstance(exc, (NotImplementedError, AttributeError)) or STATUS_RPC in str(exc) or ENGINE_STATUS_UTILITY in str(exc):
        return SteeringNotInstalled(f"the steer plugin did not load in every vLLM process: {exc}")
    return None


def check_engine(llm, *, ran: bool = False) -> dict:
    """Ask every process of an offline ``vllm.LLM`` whether steering is installed."""
    from steer_vllm.admission import ENGINE_STATUS_UTILITY
    from steer_vllm.runner import STATUS_RPC

    client = llm.llm_engine.engine_core
    try:
        workers = llm.collective_rpc(STATUS_RPC)
        if hasattr(client, "call_utility"):
            engines = [client.call_utility(ENGINE_STATUS_UTILITY)]
        else:  # in-process engine core
            engines = [getattr(client.engine_core, ENGINE_STATUS_UTILITY)()]
    except Exception as exc:
        raise (_refusal(exc) or exc) from None
    return _checked(workers, engines, ran)


async def check_engine_async(engine_client, *, ran: bool = False) -> dict:
    """The same through a running server's engine client (``AsyncLLM``)."""
    from steer_vllm.admission import ENGINE_STATUS_UTILITY
    from steer_vllm.rpc import workers_rpc_async
    from steer_vllm.runner import STATUS_RPC

    core = engine_client.engine_core
    try:
        workers = await workers_rpc_async(engine_client, STATUS_RPC)
        if hasattr(core, "call_utility_all_async"):
            engines = list(await core.call_utility_all_async(ENGINE_STATUS_UTILITY))
        else:
            engines = [await core.call_utility_async(ENGINE_STATUS_UTILITY)]
    except Exception as exc:
        raise (_refusal(exc) or exc) from None
    return _checked(workers, engines, ran)
