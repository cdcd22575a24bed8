"""Configurations the plugin cannot keep exact are refused before the engine starts.

- vLLM's V2 model runner: the hooks cover the V1 runner only, and V2 cannot run on the
  CPU machines CI has (vLLM's CPU build has no Triton backend), so it cannot be tested.
  V2 is vLLM's default where Triton is present, and watermarking or HiSparse force it.
- Asynchronous scheduling (vLLM's default on GPU): never exercised in CI (vLLM's CPU
  platform turns it off), so it is refused until it is tested; ``steer-server serve``
  turns it off unless asked.
- Micro-batching / dual-batch overlap: the model runs each micro-batch on a slice of
  the batch, while the per-token buffers are indexed from the first token of the step.

The check runs where vLLM validates its configuration (``VllmConfig``'s V2 check, so
our message comes first) and again when the input processor is built (every frontend,
before any engine process starts). Both wrappers are proven in place by
``steer_vllm.problems`` (the frontend's checks), like every other hook.

One per-request refusal protects everyone else: on vLLM's CPU build a request with its own
``seed`` kills the engine as soon as its prompt is prefilled over several steps (vLLM 0.32
rewinds the request's generator with ``Generator.set_offset``, which CPU generators do not
have: ``gpu_model_runner._bookkeeping_sync``), taking every other request with it. On CPU
such a request is refused with a 400 that says so.
"""
from __future__ import annotations

import functools

from vllm.exceptions import VLLMValidationError

from steer_vllm.hooks import patch


class UnsupportedConfiguration(ValueError):
    pass


def _v2_reason(vllm_config) -> str:
    if vllm_config.attention_config.hisparse_config is not None:
        return "HiSparse attention forces it"
    if getattr(vllm_config, "watermark_config", None) is not None:
        return "watermarking forces it"
    from steer_vllm.settings import load_engine_settings

    if load_engine_settings().vllm_use_v2_model_runner == "1":
        return "VLLM_USE_V2_MODEL_RUNNER=1 asks for it"
    return "vLLM chose it for this platform"


def refusal(vllm_config) -> str | None:
    """Why steer-server cannot serve this configuration exactly, or None."""
    if vllm_config.use_v2_model_runner:
        return (
            f"vLLM's V2 model runner is in effect ({_v2_reason(vllm_config)}); steer-server steers through the V1 "
            "model runner only. Set VLLM_USE_V2_MODEL_RUNNER=0 (or leave it unset) and do not enable "
            "watermarking or HiSparse."
        )
    if vllm_config.scheduler_config.async_scheduling:
        return (
            "asynchronous scheduling is enabled; steer-server does not support it yet (it is not tested). "
            "Pass --no-async-scheduling (steer-server serve does unless you ask for it)."
        )
    if vllm_config.parallel_config.use_ubatching:
        return (
            "micro-batching (--enable-dbo / --ubatch-size) is enabled; steering's per-token buffers do not "
            "follow micro-batches yet. Turn it off."
        )
    return None


def check_supported(vllm_config) -> None:
    reason = refusal(vllm_config)
    if reason is not None:
        raise UnsupportedConfiguration(f"steer-server cannot steer this configuration: {reason}")


class UnsupportedRequest(VLLMValidationError, ValueError):
    """Answered 400 by the OpenAI server, naming the parameter."""


def check_request(params, on_cpu: bool) -> None:
    if on_cpu and getattr(params, "seed", None) is not None:
        raise UnsupportedRequest(
            "seed: a per-request seed is refused on vLLM's CPU build, whose engine fails when it rewinds a seeded "
            "request's random generator after a partial prefill (vLLM 0.32); leave seed out, or use the "
            "server's --seed",
            parameter="seed",
        )


def _validate_v2_model_runner(original):
    @functools.wraps(original)
    def validate_v2_model_runner(self):
        check_supported(self)
        return original(self)

    return validate_v2_model_runner


def _input_processor_init(original):
    @functools.wraps(original)
    def init(self, vllm_config, *args, **kwargs):
        check_supported(vllm_config)
        return original(self, vllm_config, *args, **kwargs)

    return init


def install_configuration_checks() -> None:
    from vllm.config import VllmConfig
    from vllm.v1.engine.input_processor import InputProcessor

    patch(VllmConfig, "_validate_v2_model_runner", _validate_v2_model_runner)
    patch(InputProcessor, "__init__", _input_processor_init)
