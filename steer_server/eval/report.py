"""A sweep's outputs: ``summary.json``, a table in the terminal, one heatmap PNG per metric."""
from __future__ import annotations

import json
from pathlib import Path

from steer_server.measure.metrics import Estimate
from steer_server.measure.sweep import METRICS, SweepResult


def fmt(est: Estimate, digits: int = 2, sep: str = " ") -> str:
    """``value [low, high]`` (``sep`` between value and interval)."""
    if est.value is None:
        return "-"
    if est.low is None:
        return f"{est.value:.{digits}f}"
    return f"{est.value:.{digits}f}{sep}[{est.low:.{digits}f}, {est.high:.{digits}f}]"


def write_json(result: SweepResult, path: Path) -> None:
    path.write_text(json.dumps(result.as_dict(), indent=1) + "\n", encoding="utf-8")


def table(result: SweepResult, title: str | None = None):
    """A rich Table: the baseline row, then per (layer, coeff) the steering and its floor."""
    from rich.table import Table

    plan = result.plan
    out = Table(title=title or f"{plan.steering.describe()} on {result.model}", show_lines=False)
    out.add_column("layer", justify="right")
    out.add_column("coeff", justify="right")
    out.add_column("arm")
    for label in METRICS.values():
        out.add_column(label)
    for cell in result.cells:
        c = cell.cell
        out.add_row("-" if c.layer is None else str(c.layer), "-" if c.coeff is None else f"{c.coeff:g}", c.arm,
                    *(fmt(cell.summary[name], sep="\n") for name in METRICS),
                    style="dim" if c.arm == "random" else ("bold" if c.arm == "unsteered" else None))
    return out


def heatmaps(result: SweepResult, out_dir: Path) -> list[Path]:
    """``heatmap_<metric>.png``: layers × coefficients, the steering beside its random floor,
    with the unsteered value in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plan = result.plan
    arms = ["steered", "random"] if plan.floor else ["steered"]
    paths = []
    for name, label in METRICS.items():
        grids = {}
        for arm in arms:
            grid = np.full((len(plan.layers), len(plan.coeffs)), np.nan)
            for i, layer in enumerate(plan.layers):
                for j, coeff in enumerate(plan.coeffs):
                    value = result.cell(arm, layer, coeff).summary[name].value
                    grid[i, j] = np.nan if value is None else value
            grids[arm] = grid
        finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        fig, axes = plt.subplots(1, len(arms), figsize=(2.2 + 1.0 * len(plan.coeffs) * len(arms),
                                                        1.4 + 0.35 * len(plan.layers)), squeeze=False,
                                 layout="constrained")  # room for the title above the panels' own
        for ax, arm in zip(axes[0], arms):
            image = ax.imshow(grids[arm], aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, origin="lower")
            ax.set_xticks(range(len(plan.coeffs)), [f"{c:g}" for c in plan.coeffs])
            ax.set_yticks(range(len(plan.layers)), ["own" if layer is None else str(layer) for layer in plan.layers])
            ax.set_xlabel("coefficient")
            ax.set_ylabel("layer")
            ax.set_title("steering" if arm == "steered" else "random vector, equal norm", fontsize=9)
            for (i, j), value in np.ndenumerate(grids[arm]):
                if np.isfinite(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < (vmin + vmax) / 2 else "black")
        fig.colorbar(image, ax=axes[0].tolist())
        baseline = result.cell("unsteered").summary[name].value
        fig.suptitle(f"{label} (unsteered: {'-' if baseline is None else f'{baseline:.2f}'})", fontsize=10)
        path = out_dir / f"heatmap_{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(result: SweepResult, out_dir: Path) -> list[Path]:
    """summary.json and the heatmaps; returns the paths written."""
    write_json(result, out_dir / "summary.json")
    return [out_dir / "summary.json", *heatmaps(result, out_dir)]
