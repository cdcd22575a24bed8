"""``steer-server bench suite``: baselines and the steering sweep, with the servers started and
stopped here, one at a time, on loopback.

1. Plain vLLM (no plugin at all) against ``steer-server serve`` with the plugin loaded but
   unused. Two servers cannot share 2 cores fairly, so servers are restarted in the order
   A B, B A, A B, ... (A = plain); each runs a warm-up and ``baseline_blocks`` unsteered blocks,
   and its rate is its median block's output tok/s (one block hit by outside load does not
   decide a pair). The figure is the median of the per-pair ratios, with min and max.
2. On one steer server: the K sweep at concurrency C in every mode, a C sweep, a run with a
   fraction p of each test block steered (what steered requests cost their unsteered
   neighbours), and runs with long prompts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import statistics
from pathlib import Path

from steer_server.bench import BenchError
from steer_server.bench.servers import ServerOptions, running_server, vector_store
from steer_server.bench.stats import spread_of
from steer_server.bench.workload import RunSpec, measure_all


def suite_specs(base: RunSpec, *, modes: list[str], ks: list[int], cs: list[int], c_sweep_k: int,
                fractions: list[float], long_prompts: list[int]) -> list[RunSpec]:
    """The sweep of part 2: every mode x K at C = base.concurrency; then, in the first mode at
    K = c_sweep_k, the other C values, each fraction p < 1, and each long prompt length."""
    specs = [dataclasses.replace(base, mode=mode, num_configs=k) for mode in modes for k in ks]
    first = dataclasses.replace(base, mode=modes[0], num_configs=c_sweep_k)
    specs += [dataclasses.replace(first, concurrency=c) for c in cs if c != base.concurrency]
    specs += [dataclasses.replace(first, steered_fraction=p) for p in fractions if p != base.steered_fraction]
    specs += [dataclasses.replace(first, input_len=n) for n in long_prompts]
    return specs


def plain_vs_plugin(server_options: ServerOptions, options, spec: RunSpec, *, pairs: int, workdir: Path,
                    store, servers: list[dict]) -> dict:
    """Part 1 (see the module's description); appends what each server did to ``servers``."""
    rates: dict[str, list[float]] = {"plain": [], "steer": []}
    pair_ratios = []
    for pair in range(pairs):
        order = ("plain", "steer") if pair % 2 == 0 else ("steer", "plain")
        for kind in order:
            log = workdir / f"{len(servers) + 1:02d}-{kind}.log"
            with running_server(kind, server_options, store=store, log=log) as server:
                (run,) = asyncio.run(measure_all(server.url, server.api_key, options, [spec]))
            if any(block["failed"] for block in run["blocks"]):
                raise BenchError(f"{kind} server: requests failed ({run['errors_sample']}); see {log}")
            rates[kind].append(statistics.median(block["output_throughput"] for block in run["blocks"]))
            servers.append({"kind": kind, "start_s": server.start_s, "log": str(log), "unsteered": run})
        pair_ratios.append(rates["steer"][-1] / rates["plain"][-1])
    result = spread_of(pair_ratios)
    result.update({"concurrency": spec.concurrency, "plain_tok_s": rates["plain"], "plugin_tok_s": rates["steer"],
                   "order": "A B, B A, ... (A = plain)"})
    return result


def run_suite(server_options: ServerOptions, options, base: RunSpec, *, baseline_pairs: int, baseline_blocks: int,
              baseline_concurrency: int, sweep: dict, workdir: Path) -> dict:
    """Parts 1 and 2; returns what the result JSON holds (``servers``, ``store``,
    ``plain_vs_plugin``, ``runs``)."""
    data: dict = {"servers": []}
    specs = suite_specs(base, **sweep)
    for spec in specs:
        spec.validate()
    with vector_store(server_options, workdir) as store:
        if baseline_pairs > 0:
            unsteered = dataclasses.replace(base, steered_fraction=0.0, concurrency=baseline_concurrency,
                                            pairs=math.ceil(baseline_blocks / 2))
            data["plain_vs_plugin"] = plain_vs_plugin(server_options, options, unsteered, pairs=baseline_pairs,
                                                      workdir=workdir, store=store, servers=data["servers"])
        if specs:
            log = workdir / f"{len(data['servers']) + 1:02d}-steer.log"
            with running_server("steer", server_options, store=store, log=log) as server:
                data["servers"].append({"kind": "steer", "start_s": server.start_s, "log": str(log)})
                data["runs"] = asyncio.run(measure_all(server.url, server.api_key, options, specs))
    data["store"] = {"kind": server_options.store, "description": store.description,
                     "latency_ms": server_options.store_latency_ms, "measured_added_ms": store.measured_latency_ms,
                     "proxy": store.proxy_totals}
    data.setdefault("runs", [])
    data.setdefault("plain_vs_plugin", None)
    return data
