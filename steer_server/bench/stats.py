"""vLLM's serving metrics for each class of request in a run, and the ratios between classes.

Classes:
- ``steered``: the steered requests of the test blocks;
- ``unsteered``: the requests of the reference blocks (nothing steered in their batches);
- ``unsteered_beside_steered``: the unsteered requests of the test blocks (when p < 1), which
  share batches with steered ones; against ``unsteered`` they show what steered neighbours cost
  a request that asked for no steering.

Each class is summarised by vLLM's ``calculate_metrics`` over its requests, with the duration of
its blocks, into the keys of vLLM's result JSON (``median_ttft_ms``, ``p99_itl_ms``,
``output_throughput``, ``request_goodput`` ...). Throughput ratios come from the blocks: one
ratio of test-block to reference-block output tok/s per pair, their median the figure and
their range the spread. Within a block, classes that share it also get
``output_throughput_at_concurrency`` = C x output tokens / sum of their latencies: by Little's
law, what the server would deliver at concurrency C if every request were of that class.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steer_server.bench.workload import Block, RunSpec

CLASSES = ("steered", "unsteered", "unsteered_beside_steered")
_LATENCY_KEY = re.compile(r"^(median|p[0-9.]+)_(ttft|tpot|itl|e2el)_ms$")


def vllm_metrics(outputs: list, duration: float, options: argparse.Namespace) -> dict:
    """vLLM's metrics of these requests (``vllm.benchmarks.serve.calculate_metrics``), under the
    keys its result JSON uses, for every latency metric it knows."""
    from vllm.benchmarks.serve import calculate_metrics, check_goodput_args

    percentiles = [float(p) for p in options.metric_percentiles.split(",")]
    goodput = check_goodput_args(options)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints failures and a plotting tip
        metrics, _ = calculate_metrics(input_requests=[], outputs=outputs, dur_s=duration, tokenizer=None,
                                       selected_percentiles=percentiles, goodput_config_dict=goodput)
    result = {
        "duration": duration,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput if goodput else None,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
    }
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            result[f"{stat}_{name}_ms"] = float(getattr(metrics, f"{stat}_{name}_ms"))
        for p, value in getattr(metrics, f"percentiles_{name}_ms"):
            result[f"p{int(p) if int(p) == p else p}_{name}_ms"] = float(value)
    return result


def throughput_at_concurrency(outputs: list, concurrency: int) -> float | None:
    done = [o for o in outputs if o.success]
    busy = sum(o.latency for o in done)
    return concurrency * sum(o.output_tokens for o in done) / busy if busy > 0 else None


def spread_of(values: Sequence[float]) -> dict:
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "values": []}
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 5) for v in values]}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def latency_ratios(a: dict, b: dict) -> dict:
    """a / b for each median and percentile latency both have (``median_ttft``, ``p99_itl`` ...),
    and for the throughput at concurrency. Above 1: a is slower (latencies) or faster (throughput)."""
    ratios = {key[:-3]: ratio(a[key], b[key]) for key in a if _LATENCY_KEY.match(key) and key in b}
    ratios["output_throughput_at_concurrency"] = ratio(a.get("output_throughput_at_concurrency"),
                                                       b.get("output_throughput_at_concurrency"))
    return ratios


def _block_rate(block: Block) -> float | None:
    tokens = sum(o.output_tokens for o in block.outputs if o.success)
    return tokens / block.duration if block.duration > 0 else None


def summarize_run(spec: RunSpec, blocks: list[Block], options: argparse.Namespace) -> dict:
    """Per-class metrics, per-pair throughput ratios and latency ratios of one run's blocks."""
    members: dict[str, list] = {name: [] for name in CLASSES}
    durations = {name: 0.0 for name in CLASSES}
    for block in blocks:
        if block.test:
            for steered, output in zip(block.steered, block.outputs):
                members["steered" if steered else "unsteered_beside_steered"].append(output)
            durations["steered"] += block.duration
            durations["unsteered_beside_steered"] += block.duration
        else:
            members["unsteered"] += block.outputs
            durations["unsteered"] += block.duration
    classes = {}
    for name, outputs in members.items():
        if outputs:
            classes[name] = vllm_metrics(outputs, durations[name], options)
            classes[name]["output_throughput_at_concurrency"] = throughput_at_concurrency(outputs, spec.concurrency)

    pair_ratios = []
    for first, second in zip(blocks[0::2], blocks[1::2]):
        test, reference = (first, second) if first.test else (second, first)
        if all(o.success for o in test.outputs + reference.outputs):  # a pair with failures says nothing about speed
            pair_ratios.append(ratio(_block_rate(test), _block_rate(reference)))
    throughput = spread_of([r for r in pair_ratios if r is not None])
    result = {
        "classes": classes,
        "throughput_ratio": throughput,  # test blocks / reference blocks, output tok/s
        "ratios": {},  # steered / unsteered
        "neighbour_ratios": {},  # unsteered beside steered / unsteered
        "blocks": [{"test": b.test, "steered": sum(b.steered), "requests": len(b.steered), "duration": b.duration,
                    "output_throughput": _block_rate(b), "failed": sum(not o.success for o in b.outputs)}
                   for b in blocks],
        "errors_sample": sorted({(o.error or "no output").strip().splitlines()[-1][:300]
                                 for b in blocks for o in b.outputs if not o.success})[:5],
    }
    if "steered" in classes:
        result["ratios"] = latency_ratios(classes["steered"], classes["unsteered"])
        result["ratios"]["output_throughput"] = throughput["median"]
    if "unsteered_beside_steered" in classes:
        result["neighbour_ratios"] = latency_ratios(classes["unsteered_beside_steered"], classes["unsteered"])
    return result
