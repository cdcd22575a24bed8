"""steer_vllm: per-request activation addition inside vLLM's batched forward pass.

Loaded by vLLM in every process through the ``vllm.general_plugins`` entry point.
vLLM only logs a plugin that fails, so callers prove it ran with ``check_engine``.
"""
from __future__ import annotations

import os

from steer_vllm.spec import CAPTURE_KEY, STEERING_KEY, EngineAddition, EngineSteering, SteeringSpecError

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


class SteeringNotInstalled(RuntimeError):
    pass


def register() -> None:
    # The hooks cover the V1 model runner; vLLM's V2 runner would skip them.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from steer_vllm.frontend import install_frontend_hooks
    from steer_vllm.runner import install_runner_hooks

    install_runner_hooks()
    install_frontend_hooks()


def _check(statuses: list[dict]) -> list[dict]:
    missing = [s for s in statuses if not s.get("installed")]
    if missing or not statuses:
        raise SteeringNotInstalled(
            f"steering is not installed in the engine's workers ({missing or 'no workers'}); "
            "steer-server needs vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0) and the 'steer' plugin"
        )
    return statuses


def _refusal(exc: Exception) -> SteeringNotInstalled | None:
    """vLLM reports a worker without our RPC method as a plain Exception naming it."""
    from steer_vllm.runner import STATUS_RPC

    if isinstance(exc, NotImplementedError) or STATUS_RPC in str(exc):
        return SteeringNotInstalled(f"the steer plugin did not load in the workers: {exc}")
    return None


def check_engine(llm) -> list[dict]:
    """Ask every worker of an offline ``vllm.LLM`` whether steering is installed."""
    from steer_vllm.runner import STATUS_RPC

    try:
        return _check(llm.collective_rpc(STATUS_RPC))
    except Exception as exc:
        raise (_refusal(exc) or exc) from None


async def check_engine_async(engine_client) -> list[dict]:
    """The same through a running server's engine client (``AsyncLLM``)."""
    from steer_vllm.runner import STATUS_RPC

    try:
        return _check(await engine_client.collective_rpc(STATUS_RPC))
    except Exception as exc:
        raise (_refusal(exc) or exc) from None
