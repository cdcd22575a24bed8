"""Every vLLM symbol steer-server relies on, in one list, checked before anything is hooked.

vLLM's internals are private and move between releases. ``INTERNALS`` names each symbol
the project imports, patches, subclasses, calls or reads (by module and dotted attribute
path), so a vLLM upgrade that moves one is refused at start with the symbol's name
(``check``), instead of failing later inside a request or steering silently not at all.

Public top-level names (``vllm.LLM``, ``vllm.SamplingParams``) are listed too, so that the
list is complete and the test that keeps it complete needs no exceptions; ``Internal.public``
tells them apart. Only class-level attributes are listed (methods, properties, enum members,
declared fields): instance attributes cannot be checked without a running engine.

Each entry says which process needs it:
- ``engine``: ``steer_vllm.register()`` and its hooks, in every vLLM process (the frontend's
  input processor and configuration, the engine core's scheduler, the workers' model runner);
  checked at the start of ``register()``;
- ``api``: steer-server's API server process (the ``steer_api`` endpoint plugin and
  ``steer-server serve``); checked when the endpoint plugin attaches;
- ``offline``: the offline tools (``steer-server check``, ``bench``, ``vllm.LLM`` use).

The hooked method names live here (``RUNNER_HOOKS``, ``SCHEDULER_HOOKS``, ``RENDER_METHODS``)
and the modules that install and prove the hooks import them, so the list and the hooks
cannot drift apart. Importing this module needs only the standard library.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

from steer_vllm.hooks import SteeringNotInstalled

BUILT_FOR = "0.32.0"  # the vLLM version pyproject.toml pins

USES = ("patched", "called", "subclassed", "read")
WHERE = ("engine", "api", "offline")

# V1 model runner methods wrapped by steer_vllm.runner (proven per worker by its steer_status).
RUNNER_HOOKS = ("load_model", "_update_states", "_model_forward", "execute_model", "sample_tokens")
# Scheduler methods wrapped by steer_vllm.admission (proven by the engine's steer_engine_status).
SCHEDULER_HOOKS = ("schedule", "_handle_blocked_waiting_request", "_free_request", "update_from_output")
# OnlineRenderer methods wrapped by steer_server.serving.render_hook (proven at API start).
RENDER_METHODS = ("render_completion", "render_chat", "render_responses")


@dataclass(frozen=True)
class Internal:
    module: str
    path: str  # dotted attribute path inside ``module``; "" names the module itself
    use: str  # one of USES
    where: str  # one of WHERE
    why: str

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}" if self.path else self.module

    @property
    def public(self) -> bool:
        return self.module == "vllm"


_GPU_RUNNER = "vllm.v1.worker.gpu_model_runner"
_SCHEDULER = "vllm.v1.core.sched.scheduler"
_CORE_CLIENT = "vllm.v1.engine.core_client"
_BENCH = "vllm.benchmarks.serve"


def _e(module: str, path: str, use: str, where: str, why: str) -> Internal:
    return Internal(module, path, use, where, why)


INTERNALS: tuple[Internal, ...] = (
    # --- engine: configuration refusals (steer_vllm.support)
    _e("vllm.config", "VllmConfig._validate_v2_model_runner", "patched", "engine",
       "refuse configurations steering cannot keep exact, before vLLM's own V2 check"),
    _e("vllm.config", "VllmConfig.use_v2_model_runner", "read", "engine", "the hooks cover the V1 runner only"),
    _e("vllm.config", "SchedulerConfig.async_scheduling", "read", "engine", "async scheduling is refused (untested)"),
    _e("vllm.config", "ParallelConfig.use_ubatching", "read", "engine", "micro-batching is refused"),
    _e("vllm.config", "AttentionConfig.hisparse_config", "read", "engine", "names why V2 was forced"),
    _e("vllm.config", "ModelConfig.get_hidden_size", "called", "engine", "sizes the table, checks vectors"),
    _e("vllm.exceptions", "VLLMValidationError", "subclassed", "engine", "refusals answered 400 naming the field"),
    _e("vllm.exceptions", "VLLMNotFoundError", "subclassed", "engine", "unknown vectors answered 404"),
    # --- engine: frontend (steer_vllm.frontend, steer_vllm.support)
    _e("vllm.v1.engine.input_processor", "InputProcessor.__init__", "patched", "engine",
       "configuration refusal in every frontend, before any engine process starts"),
    _e("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", "patched", "engine",
       "validate steering, attach vectors, salt the prefix cache"),
    _e("vllm", "SamplingParams.extra_args", "read", "engine", "carries each request's steering to the workers"),
    # --- engine: workers (steer_vllm.runner, steer_vllm.models)
    *(_e(_GPU_RUNNER, f"GPUModelRunner.{name}", "patched", "engine", "per-step steering hook (steer_vllm.runner)")
      for name in RUNNER_HOOKS),
    _e("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", "patched", "engine",
       "the CPU runner overrides load_model: steering is installed after it"),
    _e(_GPU_RUNNER, "GPUModelRunner.get_model", "called", "engine", "the model whose blocks are wrapped"),
    _e("vllm.v1.worker.worker_base", "WorkerBase", "patched", "engine",
       "gains the steer_status, capture and receipt RPCs"),
    _e("vllm.v1.outputs", "ModelRunnerOutput", "read", "engine", "a step's output carries unsteerable request ids"),
    _e("vllm.forward_context", "get_forward_context", "called", "engine", "recording steps run eagerly"),
    _e("vllm.forward_context", "ForwardContext.skip_compiled", "read", "engine", "set so recording steps run eagerly"),
    _e("vllm.forward_context", "ForwardContext.cudagraph_runtime_mode", "read", "engine",
       "set so recording steps skip CUDA graphs"),
    _e("vllm.config", "CUDAGraphMode.NONE", "read", "engine", "the mode of recording steps"),
    _e("vllm.model_executor.models.utils", "PPMissingLayer", "read", "engine",
       "blocks another pipeline rank owns are not wrapped"),
    _e("vllm.model_executor.models.transformers", "", "read", "engine",
       "models under this module run on the Transformers backend"),
    # --- engine: scheduler (steer_vllm.admission)
    *(_e(_SCHEDULER, f"Scheduler.{name}", "patched", "engine", "steering admission hook (steer_vllm.admission)")
      for name in SCHEDULER_HOOKS),
    _e(_SCHEDULER, "Scheduler.finish_requests", "called", "engine", "ends requests a worker could not steer"),
    _e("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_block_ids", "called", "engine",
       "finds unsteered KV computed under a steered salt"),
    _e("vllm.v1.core.kv_cache_manager", "KVCacheManager.evict_blocks", "called", "engine",
       "drops that KV from the prefix cache"),
    _e("vllm.v1.request", "RequestStatus.FINISHED_ERROR", "read", "engine", "how unsteerable requests end"),
    _e("vllm.v1.request", "Request.get_finished_reason", "called", "engine", "their finish reason for the client"),
    _e("vllm.v1.engine", "EngineCoreOutput", "called", "engine", "the error output of an ended request"),
    _e("vllm.v1.engine", "EngineCoreOutputs", "called", "engine", "holds it for its client"),
    _e("vllm.v1.engine.core", "EngineCore", "patched", "engine", "gains the steer_engine_status utility"),
    # --- api: the endpoint plugin (steer_server.serving.api, render_hook, access)
    _e("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.attach_router", "subclassed", "api",
       "SteerApiPlugin wires routes and middleware here"),
    _e("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.init_state", "subclassed", "api",
       "SteerApiPlugin proves the engine here"),
    *(_e("vllm.renderers.online_renderer", f"OnlineRenderer.{name}", "patched", "api",
         "ActAdd checks on the prompt as vLLM renders it (steer_server.serving.render_hook)")
      for name in RENDER_METHODS),
    # --- api: the steered routes (steer_server.serving.steered_routes) replace vLLM's three
    *(_e(module, f"{cls}.{method}", "called", "api", f"the steered route serves {cls} through it")
      for module, cls, method in (
          ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion", "create_completion"),
          ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat", "create_chat_completion"),
          ("vllm.entrypoints.openai.responses.serving", "OpenAIServingResponses", "create_responses"))),
    *(_e(module, cls, "subclassed", "api", "the steered route's typed request adds the steering field")
      for module, cls in (("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
                          ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
                          ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest"))),
    *(_e("vllm.entrypoints.serve.utils.api_utils", name, "called", "api", "what vLLM's own routes wrap themselves in")
      for name in ("with_cancellation", "load_aware_call", "validate_json_request")),
    _e("vllm.entrypoints.serve.utils.orca_metrics", "metrics_header", "called", "api", "load-metrics response header"),
    _e("vllm.entrypoints.serve.utils.sse_keep_alive", "with_sse_keep_alive", "called", "api", "stream keep-alives"),
    _e("vllm.entrypoints.serve.engine.protocol", "ErrorResponse", "called", "api", "render-hook refusals"),
    _e("vllm.entrypoints.serve.engine.protocol", "ErrorInfo", "called", "api", "render-hook refusals"),
    _e("vllm.entrypoints.serve.middleware.register", "init_entrypoints_middleware", "read", "api",
       "builds the key check from app.state.args.api_key after plugins attach"),
    _e("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware", "read", "api",
       "the key check that must hold the role keys (steer_server.serving.access)"),
    _e("vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc", "called", "api", "worker status, captures, receipts"),
    _e("vllm.v1.engine.async_llm", "AsyncLLM.generate", "called", "api", "residual captures"),
    _e("vllm.v1.engine.async_llm", "AsyncLLM.get_tokenizer", "called", "api", "the served tokenizer"),
    _e(_CORE_CLIENT, "AsyncMPClient.call_utility_async", "called", "api", "asks the engine core for its status"),
    _e(_CORE_CLIENT, "DPLBAsyncMPClient.call_utility_all_async", "called", "api",
       "reaches every data-parallel engine"),
    _e("vllm.v1.engine.core", "EngineCore.collective_rpc", "called", "api",
       "called as a utility to reach each engine's workers"),
    _e("vllm.inputs", "TokensPrompt", "called", "api", "capture prompts as token ids"),
    # --- api: steer-server serve runs vLLM's serve in its own process (steer_server.vllm_serve, cli, kv_cache)
    _e("vllm.entrypoints.cli.serve", "ServeSubcommand.subparser_init", "called", "api", "vLLM's serve parser"),
    _e("vllm.entrypoints.cli.serve", "ServeSubcommand.validate", "called", "api", "vLLM's serve validation"),
    _e("vllm.entrypoints.cli.serve", "ServeSubcommand.cmd", "called", "api", "runs vLLM's server"),
    _e("vllm.utils.argparse_utils", "FlexibleArgumentParser", "called", "api", "vLLM's own argument parser"),
    _e("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup", "called", "api", "as vLLM's CLI sets up"),
    _e("vllm.logger", "configure_logging_from_args", "called", "api", "as vLLM's CLI configures logging"),
    _e("vllm.platforms", "current_platform", "read", "api", "CPU-only serve defaults"),
    _e("vllm.utils.cpu_resource_utils", "get_memory_node_info", "called", "api",
       "free memory as vLLM's CPU worker reads it"),
    # --- offline: steer-server check, the bench, vllm.LLM use
    _e("vllm", "LLM.collective_rpc", "called", "offline", "worker status and captures (check_engine)"),
    _e("vllm", "LLM.generate", "called", "offline", "offline captures and checks"),
    _e(_CORE_CLIENT, "SyncMPClient.call_utility", "called", "offline", "the engine core's status (check_engine)"),
    _e(_BENCH, "calculate_metrics", "called", "offline", "bench: vLLM's own metrics"),
    _e(_BENCH, "check_goodput_args", "called", "offline", "bench: goodput options"),
    _e(_BENCH, "add_cli_args", "called", "offline", "bench: vllm bench serve options"),
    _e(_BENCH, "get_first_model_from_server", "called", "offline", "bench: served model name"),
    _e(_BENCH, "TaskType", "read", "offline", "bench: request kind"),
    _e(_BENCH, "benchmark", "called", "offline", "bench: vLLM's load generator"),
    _e("vllm.benchmarks.datasets", "get_samples", "called", "offline", "bench: vLLM's datasets"),
    _e("vllm.benchmarks.lib.endpoint_request_func", "RequestFuncOutput", "read", "offline",
       "bench: per-request results"),
    _e("vllm.tokenizers", "get_tokenizer", "called", "offline", "bench: the served tokenizer"),
)


class VllmInternalsMissing(SteeringNotInstalled):
    """Symbols in ``INTERNALS`` that the installed vLLM does not have."""


def vllm_version() -> str:
    try:
        return str(importlib.import_module("vllm").__version__)
    except Exception as exc:  # noqa: BLE001 (any failure is reported, not raised)
        return f"? ({type(exc).__name__}: {exc})"


def _problem(entry: Internal) -> str | None:
    """Why ``entry`` does not resolve, or None."""
    if not entry.path:
        try:
            found = importlib.util.find_spec(entry.module) is not None  # no need to import it
        except (ImportError, ValueError) as exc:
            return f"module {entry.module} cannot be found ({type(exc).__name__}: {exc})"
        return None if found else f"module {entry.module} does not exist"
    try:
        owner = importlib.import_module(entry.module)
    except Exception as exc:  # noqa: BLE001 (a moved module may fail in any way)
        return f"module {entry.module} cannot be imported ({type(exc).__name__}: {exc})"
    where = entry.module
    parts = entry.path.split(".")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        # steer_vllm.hooks.patch wraps only what the class itself defines
        if last and entry.use == "patched" and isinstance(owner, type) and part not in vars(owner):
            inherited = " (only inherited)" if hasattr(owner, part) else ""
            return f"{where} does not define {part} itself{inherited}"
        try:
            owner = getattr(owner, part)
        except Exception as exc:  # noqa: BLE001 (lazy module attributes may raise anything)
            return f"{where} has no attribute {part} ({type(exc).__name__})"
        where = f"{where}.{part}"
    return None


def missing(where: str | None = None, entries: Iterable[Internal] | None = None) -> list[str]:
    """One message per entry (of process ``where``, or all) that the installed vLLM lacks;
    ``entries`` defaults to ``INTERNALS``."""
    if where is not None and where not in WHERE:
        raise ValueError(f"where: one of {WHERE} or None, not {where!r}")
    found = []
    version = None
    for entry in INTERNALS if entries is None else entries:
        if where is not None and entry.where != where:
            continue
        problem = _problem(entry)
        if problem is not None:
            version = version or vllm_version()
            found.append(f"{entry.name} ({entry.use}: {entry.why}) is missing in vLLM {version}: {problem}")
    return found


def check(where: str | None, entries: Iterable[Internal] | None = None) -> None:
    """Raise ``VllmInternalsMissing`` naming every missing symbol of ``where``."""
    found = missing(where, entries)
    if found:
        scope = f"its {where} side uses" if where else "it uses"
        raise VllmInternalsMissing(
            f"steer-server refuses to start: {len(found)} vLLM symbol(s) {scope} are missing or moved in "
            f"vLLM {vllm_version()} (steer-server is built for vLLM {BUILT_FOR}): " + "; ".join(found)
            + ". Install the vLLM version steer-server pins, or update steer_vllm/vllm_internals.py and the code "
            "that uses these symbols."
        )
