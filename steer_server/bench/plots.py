"""Figures: the throughput ratio of test to reference blocks against whatever the runs swept
(K, C, prompt length, steered fraction), and the premium across model sizes."""
from __future__ import annotations

from pathlib import Path

from steer_server.bench.targets import STEERED_RATIO

# spec field, axis label, log scale
DIMENSIONS = (("num_configs", "K (distinct steering vectors)", True),
              ("concurrency", "C (concurrent requests)", True),
              ("input_len", "prompt tokens", True),
              ("steered_fraction", "p (steered share of a test block)", False))
SHORT_NAMES = {"num_configs": "K", "concurrency": "C", "input_len": "in", "steered_fraction": "p"}


def _series(runs: list[dict], dimension: str) -> dict[tuple, list[tuple]]:
    """Runs grouped by every spec field but ``dimension``: {rest: [(x, ratio, low, high)]}."""
    groups: dict[tuple, list[tuple]] = {}
    for run in runs:
        spread = run["throughput_ratio"]
        if spread["median"] is None:
            continue
        spec = run["spec"]
        rest = tuple((name, spec[name]) for name, _, _ in DIMENSIONS if name != dimension) + (("mode", spec["mode"]),)
        groups.setdefault(rest, []).append((spec[dimension], spread["median"], spread["min"], spread["max"]))
    return groups


def plot_runs(runs: list[dict], path: str | Path, title: str, plain_vs_plugin: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = []
    for dimension, label, log in DIMENSIONS:
        lines = {rest: points for rest, points in _series(runs, dimension).items()
                 if len({p[0] for p in points}) > 1}
        if lines:
            panels.append((dimension, label, log, lines))
    if not panels:  # nothing swept: the runs as points against K
        panels = [(DIMENSIONS[0][0], DIMENSIONS[0][1], True, _series(runs, DIMENSIONS[0][0]))]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, (dimension, label, log, lines) in zip(axes[0], panels):
        for rest, points in sorted(lines.items(), key=str):
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            err = [[max(p[1] - p[2], 0) for p in points], [max(p[3] - p[1], 0) for p in points]]
            legend = " ".join(str(value) if name == "mode" else f"{SHORT_NAMES[name]}={value:g}"
                              for name, value in rest)
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=legend)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(STEERED_RATIO, color="red", linestyle="--", linewidth=0.8, label=f"target {STEERED_RATIO}")
        if plain_vs_plugin and plain_vs_plugin.get("median") is not None and ax is axes[0][0]:
            ax.axhline(plain_vs_plugin["median"], color="green", linestyle=":", linewidth=1,
                       label=f"plugin unused / plain vLLM {plain_vs_plugin['median']:.3f}")
        if log:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel(label)
        ax.set_ylabel("test / reference block output tok/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_premium(results: list[dict], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    results = sorted(results, key=lambda r: r["parameters"])
    xs = [r["parameters"] for r in results]
    ys = [100 * r["premium_median"] for r in results]
    low = [100 * (r["premium_median"] - r["premium_min"]) for r in results]
    high = [100 * (r["premium_max"] - r["premium_median"]) for r in results]
    ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4)
    for r, x, y in zip(results, xs, ys):
        ax.annotate(f"{r['model']}\n({r['num_layers']} layers)", (x, y), textcoords="offset points", xytext=(6, 6),
                    fontsize=7)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("premium = t_steered / t_baseline - 1  (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
