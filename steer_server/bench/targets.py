"""The project's performance targets, checked on what a bench run measured (never in tests:
timing on a shared machine is evidence for a benchmark, not a pass/fail for CI). A target whose
runs were not part of the measurement is simply not listed.
"""
from __future__ import annotations

import math
import statistics

STEERED_RATIO = 0.97  # steered / unsteered output throughput at C = 32, K = 32
PLUGIN_RATIO = 0.99  # plugin loaded but unused / plain vLLM
K_TOLERANCE = 0.02  # "does not fall as K grows": no K more than this below the smallest K (one run's noise here)
LONG_PROMPT_RATIO = 0.99  # steered / unsteered throughput with long prompts
LONG_PROMPT_TOKENS = 1536  # from here on a prompt counts as long
TTFT_TOLERANCE = 0.05  # steered TTFT median and p99 within 5 % of unsteered
NEIGHBOUR_TOLERANCE = 0.05  # unsteered TTFT and throughput beside steered requests within 5 % of alone
LATENCY_TARGET_C = 32
LATENCY_TARGET_KS = (32, 256)


def _check(target: str, value, passed: bool, spread: list | None = None) -> dict:
    return {"target": target, "value": value, "passed": passed, "spread": spread}


def _spread(run: dict) -> list:
    return [run["throughput_ratio"]["min"], run["throughput_ratio"]["max"]]


def _within(ratios: dict, keys: tuple[str, ...], tolerance: float, higher_is_better: bool = False) -> tuple[dict, bool]:
    values = {key: ratios.get(key) for key in keys if ratios.get(key) is not None}
    if higher_is_better:
        passed = all(v >= 1 - tolerance for v in values.values())
    else:
        passed = all(v <= 1 + tolerance for v in values.values())
    return values, bool(values) and passed


def check_targets(runs: list[dict], plain_vs_plugin: dict | None = None, store: str | None = None) -> list[dict]:
    """PASS/FAIL for every target the runs have data for. ``store`` names the server's vector
    store setup (e.g. "redis +2 ms"), shown with the latency targets it conditions."""
    checks: list[dict] = []
    where = f", store {store}" if store else ""
    for run in runs:
        spec, ratio = run["spec"], run["ratios"].get("output_throughput")
        k, c, p, prompt = spec["num_configs"], spec["concurrency"], spec["steered_fraction"], spec["input_len"]
        name = f"{spec['mode']}, K={k}, C={c}, p={p:g}, {prompt}-token prompts"
        if p == 1 and c == 32 and k == 32 and prompt < LONG_PROMPT_TOKENS:
            checks.append(_check(f"steered/unsteered throughput >= {STEERED_RATIO} ({name})", ratio,
                                 ratio is not None and ratio >= STEERED_RATIO, _spread(run)))
        if p == 1 and prompt >= LONG_PROMPT_TOKENS:
            checks.append(_check(f"steered/unsteered throughput >= {LONG_PROMPT_RATIO} with long prompts ({name})",
                                 ratio, ratio is not None and ratio >= LONG_PROMPT_RATIO, _spread(run)))
        if p > 0 and c == LATENCY_TARGET_C and k in LATENCY_TARGET_KS:
            values, passed = _within(run["ratios"], ("median_ttft", "p99_ttft"), TTFT_TOLERANCE)
            checks.append(_check(f"steered TTFT median and p99 within {TTFT_TOLERANCE:.0%} of unsteered "
                                 f"({name}{where})", values, passed))
        if 0 < p < 1 and c == LATENCY_TARGET_C and k in LATENCY_TARGET_KS:
            neighbours = run["neighbour_ratios"]
            ttft, ttft_ok = _within(neighbours, ("median_ttft", "p99_ttft"), NEIGHBOUR_TOLERANCE)
            rate, rate_ok = _within(neighbours, ("output_throughput_at_concurrency",), NEIGHBOUR_TOLERANCE, True)
            checks.append(_check(f"unsteered TTFT and throughput unchanged (within {NEIGHBOUR_TOLERANCE:.0%}) "
                                 f"beside steered requests ({name}{where})", {**ttft, **rate}, ttft_ok and rate_ok))
    if plain_vs_plugin is not None and plain_vs_plugin.get("median") is not None:
        median = plain_vs_plugin["median"]
        checks.append(_check(f"plugin loaded but unused / plain vLLM >= {PLUGIN_RATIO}", median,
                             median >= PLUGIN_RATIO, [plain_vs_plugin["min"], plain_vs_plugin["max"]]))
    checks += _k_checks(runs)
    return checks


def _k_checks(runs: list[dict]) -> list[dict]:
    series: dict[tuple, list[dict]] = {}
    for run in runs:
        spec = run["spec"]
        if spec["steered_fraction"] > 0 and run["ratios"].get("output_throughput") is not None:
            key = (spec["mode"], spec["concurrency"], spec["steered_fraction"], spec["input_len"], spec["output_len"])
            series.setdefault(key, []).append(run)
    checks = []
    for (mode, c, p, prompt, _), members in sorted(series.items()):
        members.sort(key=lambda run: run["spec"]["num_configs"])
        if len({run["spec"]["num_configs"] for run in members}) < 2:
            continue
        ks = [run["spec"]["num_configs"] for run in members]
        ratios = [run["ratios"]["output_throughput"] for run in members]
        slope = statistics.linear_regression([math.log2(k) for k in ks], ratios).slope
        checks.append({
            "target": f"throughput ratio does not fall as K grows ({mode}, C={c}, p={p:g}, {prompt}-token prompts: "
                      f"no K below K={ks[0]}'s ratio - {K_TOLERANCE}; fitted slope {slope:+.4f} per doubling of K)",
            "value": {str(k): r for k, r in zip(ks, ratios)},
            "slope_per_doubling": slope,
            "passed": min(ratios[1:]) >= ratios[0] - K_TOLERANCE,
            "spread": None,
        })
    return checks
