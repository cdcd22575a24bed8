"""Paired blocks of load, sent by vLLM's own load generator (``vllm.benchmarks.serve``).

One run (a ``RunSpec``) on a server:

1. K random vectors are uploaded (``vectors``), and one steered request must succeed.
2. Requests are drawn from a ``vllm bench serve`` dataset (``--dataset-name random`` unless the
   options say otherwise; lengths from the spec). Each carries a unique ``cache_salt``, so no
   request reuses another's KV cache: vLLM's random prompts can repeat, and a prefix hit would
   favour whichever class it fell in.
3. A warm-up block, untimed: half of it steered and every one of the K vectors at least once, so
   the timed part measures steady-state serving.
4. ``pairs`` pairs of blocks in the order T R, R T, T R, ... (an even number of pairs cancels a
   linear drift of the machine). A test block T steers a fraction p of its requests, spread
   evenly through it; a reference block R steers none. Steered requests take the K vectors
   round-robin, as per-request body overrides (``SampleRequest.request_overrides``), which
   vLLM's loop merges into each request's body. A block is one call of vLLM's ``benchmark()``
   at max concurrency C; by default it is one wave of C requests (``block_requests``).

What each block's requests measured comes back as vLLM's own per-request records.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

from steer_server.bench import BenchError
from steer_server.bench.vectors import MODES, SteeringConfigs, check_steered_request, delete_configs, upload_configs
from steer_server.client import auth_headers

# vLLM's dataset options that `vllm bench serve --output-len` maps to, as it does.
_OUTPUT_LEN_OPTIONS = ("random_output_len", "sharegpt_output_len", "custom_output_len", "hf_output_len",
                       "spec_bench_output_len", "prefix_repetition_output_len")


@dataclass(frozen=True)
class RunSpec:
    """One measured configuration."""

    mode: str = "actadd"  # actadd | constant
    num_configs: int = 32  # K distinct steering vectors
    concurrency: int = 32  # C, vLLM's max concurrency
    steered_fraction: float = 1.0  # p: share of steered requests in a test block
    input_len: int = 32  # prompt tokens (random dataset)
    output_len: int = 64
    pairs: int = 4  # (test, reference) block pairs
    block_requests: int = 0  # requests per block; 0: C (one wave)
    warmup: int = 0  # untimed requests first; 0: C
    layer: int = 2
    rows: int = 4  # rows of an actadd vector (front-aligned positions 0..rows-1)
    coeff: float = 4.0

    @property
    def block_size(self) -> int:
        return self.block_requests or self.concurrency

    @property
    def label(self) -> str:
        steering = f"{self.mode}-K{self.num_configs}" if self.steered_fraction else "unsteered"
        return f"{steering}-C{self.concurrency}-p{self.steered_fraction:g}-in{self.input_len}-out{self.output_len}"

    def validate(self) -> None:
        if self.concurrency < 1 or self.num_configs < 1 or self.pairs < 1:
            raise BenchError("C, K and --pairs must be at least 1")
        if not 0.0 <= self.steered_fraction <= 1.0:
            raise BenchError("-p is a fraction in [0, 1]")
        if self.mode not in MODES:
            raise BenchError(f"unknown mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.mode == "actadd" and self.rows > self.input_len:
            raise BenchError("--rows must not exceed --input-len (ActAdd rows sit on prompt positions)")
        if self.output_len < 2:
            raise BenchError("--output-len must be at least 2 (inter-token latency needs two tokens)")


def vllm_options(argv: Sequence[str] = ()) -> argparse.Namespace:
    """``vllm bench serve``'s options parsed from ``argv`` (its own parser and defaults)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="steer-server bench (vllm bench serve options)")
    add_cli_args(parser)
    options = parser.parse_args(list(argv))
    if options.max_concurrency is not None:
        raise BenchError("give the concurrency with -C (a list makes a sweep), not --max-concurrency")
    if options.num_warmups:
        raise BenchError("give warm-up requests with --warmup (vLLM's --num-warmups repeats one request)")
    if options.temperature is None:
        options.temperature = 0.0  # greedy, as every earlier run of this bench
    return options


@dataclass
class Endpoint:
    """A server under load, and how vLLM's loop addresses it."""

    url: str
    api_key: str | None
    model_id: str  # what the tokenizer is loaded from (the server's model root by default)
    model_name: str  # the served name requests carry
    tokenizer: Any
    options: argparse.Namespace

    @property
    def headers(self) -> dict[str, str]:
        extra = dict(item.split("=", 1) for item in self.options.header or [])
        return {**extra, **auth_headers(self.api_key)}


async def connect(url: str, api_key: str | None, options: argparse.Namespace) -> Endpoint:
    from vllm.benchmarks.serve import get_first_model_from_server
    from vllm.tokenizers import get_tokenizer

    url = url.rstrip("/")
    if options.model is None:
        model_name, model_id = await get_first_model_from_server(url, auth_headers(api_key))
    else:
        model_name, model_id = options.served_model_name or options.model, options.model
    tokenizer = get_tokenizer(options.tokenizer or model_id, tokenizer_mode=options.tokenizer_mode,
                              trust_remote_code=options.trust_remote_code)
    return Endpoint(url, api_key, model_id, model_name, tokenizer, options)


@dataclass
class Block:
    test: bool  # a test block (fraction p steered) or a reference block (none steered)
    steered: list[bool]  # per request
    outputs: list  # vLLM's RequestFuncOutput per request, in order
    duration: float  # vLLM's benchmark duration: first send to last response


def mixed_pattern(n: int, fraction: float) -> list[bool]:
    """n flags, round(n * fraction) of them True, spread evenly (Bresenham)."""
    return [math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9) for i in range(n)]


def warmup_pattern(requests: int, num_configs: int) -> list[bool]:
    """Untimed requests: half of them steered and at least one per config (configs are taken
    round-robin), so every vector is in the server's caches before the clock starts."""
    if num_configs == 0:
        return [False] * requests
    steered = max(requests - requests // 2, num_configs)
    unsteered = requests // 2
    return mixed_pattern(steered + unsteered, steered / (steered + unsteered))


def block_order(pairs: int) -> list[bool]:
    """T R, R T, T R, ... (True = test block): each pair swaps which goes first."""
    order: list[bool] = []
    for i in range(pairs):
        order += [True, False] if i % 2 == 0 else [False, True]
    return order


def draw_requests(endpoint: Endpoint, spec: RunSpec, count: int, run_id: str) -> list:
    """``count`` requests from the configured vLLM dataset, at the spec's lengths."""
    from vllm.benchmarks.datasets import get_samples

    options = copy.copy(endpoint.options)
    options.num_prompts = count
    options.random_input_len = spec.input_len
    for name in _OUTPUT_LEN_OPTIONS:
        setattr(options, name, spec.output_len)
    options.request_id_prefix = f"{run_id}-"
    with contextlib.redirect_stdout(io.StringIO()):
        requests = get_samples(options, endpoint.tokenizer)
    if len(requests) < count:
        raise BenchError(f"the dataset gave {len(requests)} requests, the run needs {count}")
    return requests[:count]


def _with_overrides(request, salt: str, steering: dict | None):
    overrides = dict(request.request_overrides or {}, cache_salt=salt)
    if steering is not None:
        overrides["steering"] = steering
    return replace(request, request_overrides=overrides)


async def send(endpoint: Endpoint, requests: list, concurrency: int) -> tuple[list, float]:
    """One call of vLLM's ``benchmark()``: its loop, its request function, its timing. Returns
    its per-request outputs (vLLM's ``RequestFuncOutput``) and its duration."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import TaskType, benchmark

    options = endpoint.options
    sampling = {name: getattr(options, name) for name in ("top_p", "top_k", "min_p", "temperature",
                                                          "frequency_penalty", "presence_penalty",
                                                          "repetition_penalty")
                if getattr(options, name) is not None}
    # fixed output lengths on random prompts, as `vllm bench serve` itself sets for them
    ignore_eos = options.ignore_eos or options.dataset_name in ("random", "random-mm")
    with contextlib.redirect_stdout(io.StringIO()):  # vLLM prints a report per call
        result = await benchmark(
            task_type=TaskType.GENERATION, endpoint_type=options.backend,
            api_url=endpoint.url + options.endpoint, base_url=endpoint.url, model_id=endpoint.model_id,
            model_name=endpoint.model_name, tokenizer=endpoint.tokenizer, input_requests=requests,
            logprobs=options.logprobs, request_rate=options.request_rate, burstiness=options.burstiness,
            disable_tqdm=True, num_warmups=0, profile=False, selected_percentile_metrics=[],
            selected_percentiles=[], ignore_eos=ignore_eos, goodput_config_dict={}, max_concurrency=concurrency,
            lora_modules=None, extra_headers=endpoint.headers, extra_body={**sampling, **(options.extra_body or {})},
            ready_check_timeout_sec=0,
        )
    outputs = [
        RequestFuncOutput(success=not error and output_len > 0, latency=latency, output_tokens=output_len,
                          ttft=ttft, itl=list(itl), prompt_len=input_len, error=error, start_time=start)
        for error, output_len, latency, ttft, itl, input_len, start in zip(
            result["errors"], result["output_lens"], result["latencies"], result["ttfts"], result["itls"],
            result["input_lens"], result["start_times"])
    ]
    return outputs, result["duration"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_blocks(endpoint: Endpoint, spec: RunSpec, configs: SteeringConfigs | None, run_id: str,
                     log: Callable[[str], None] = _log) -> tuple[Block, list[Block]]:
    """The warm-up block and the timed blocks of one run (see the module's description)."""
    warm_flags = warmup_pattern(spec.warmup or spec.concurrency, spec.num_configs if configs else 0)
    order = block_order(spec.pairs)
    flags = [warm_flags] + [mixed_pattern(spec.block_size, spec.steered_fraction if test else 0.0)
                            for test in order]
    requests = draw_requests(endpoint, spec, sum(map(len, flags)), run_id)
    if configs is not None:
        check_steered_request(endpoint.url, endpoint.api_key, endpoint.model_name, requests[0].prompt,
                              configs.fields[0])
    pool = iter(requests)
    next_config = 0
    blocks: list[Block] = []
    for index, (block_flags, test) in enumerate(zip(flags, [None, *order])):
        batch = []
        for steered in block_flags:
            steering = None
            if steered:
                steering = configs.fields[next_config % len(configs.fields)]
                next_config += 1
            salt = f"{run_id}-{len(blocks)}-{len(batch)}"
            batch.append(_with_overrides(next(pool), salt, steering))
        outputs, duration = await send(endpoint, batch, spec.concurrency)
        failed = sum(not o.success for o in outputs)
        what = "warm-up" if test is None else "test" if test else "reference"
        log(f"  {spec.label}: block {index}/{len(order)} {what:9s} {sum(block_flags):3d}/{len(block_flags)} steered, "
            f"{duration:6.2f} s, {failed} failed")
        blocks.append(Block(bool(test), block_flags, outputs, duration))
    warmup = blocks.pop(0)
    if not any(o.success for o in warmup.outputs):
        raise BenchError(f"every warm-up request failed: {sorted({o.error for o in warmup.outputs})[:3]}")
    return warmup, blocks


async def measure(endpoint: Endpoint, spec: RunSpec, *, log: Callable[[str], None] = _log,
                  keep_vectors: bool = False) -> dict:
    """One run: vectors up, a steered request checked, warm-up, paired blocks, vectors down;
    the result summarised by ``stats.summarize_run``."""
    from steer_server.bench.stats import summarize_run

    spec.validate()
    run_id = "bench-" + uuid.uuid4().hex[:8]
    configs = None
    if spec.steered_fraction > 0:
        configs = upload_configs(endpoint.url, endpoint.api_key, count=spec.num_configs, mode=spec.mode,
                                 layer=spec.layer, rows=spec.rows, coeff=spec.coeff, seed=endpoint.options.seed,
                                 prefix=run_id)
    try:
        warmup, blocks = await run_blocks(endpoint, spec, configs, run_id, log)
    finally:
        if configs is not None and not keep_vectors:
            delete_configs(endpoint.url, endpoint.api_key, configs.names)
    options = endpoint.options
    result = summarize_run(spec, blocks, options)
    result.update({
        "label": spec.label, "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "spec": asdict(spec),
        "model_id": endpoint.model_id, "model_name": endpoint.model_name,
        "tokenizer_id": options.tokenizer or endpoint.model_id,
        "vllm": {"backend": options.backend, "endpoint": options.endpoint, "dataset_name": options.dataset_name,
                 "request_rate": options.request_rate if options.request_rate < math.inf else "inf",
                 "burstiness": options.burstiness, "metric_percentiles": options.metric_percentiles,
                 "goodput": options.goodput},
        "warmup_failed": sum(not o.success for o in warmup.outputs),
        "vector_upload_s": None if configs is None else configs.upload_s,
        "hidden_size": None if configs is None else configs.hidden_size,
    })
    return result


async def measure_all(url: str, api_key: str | None, options: argparse.Namespace, specs: list[RunSpec],
                      log: Callable[[str], None] = _log) -> list[dict]:
    """Every spec in turn on one server."""
    endpoint = await connect(url, api_key, options)
    runs = []
    for number, spec in enumerate(specs, 1):
        log(f"run {number}/{len(specs)}: {spec.label}")
        runs.append(await measure(endpoint, spec, log=log))
    return runs
