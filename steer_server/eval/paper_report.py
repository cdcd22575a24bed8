"""``report.md`` and its plots for ``steer-server eval paper``."""
from __future__ import annotations

from pathlib import Path

from steer_server.eval.paper import NLL_BUDGET, PAPER, PaperResult, ratio_by_bin
from steer_server.measure.metrics import Estimate
from steer_server.eval.report import fmt, heatmaps
from steer_server.measure.sweep import METRICS, CellResult, SweepResult


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _ratio(b: dict, interval: bool = False) -> str:
    if b["ratio"] is None:
        return "-"
    if not interval or b["low"] is None:
        return f"{b['ratio']:.3f}"
    return f"{b['ratio']:.3f} [{b['low']:.3f}, {b['high']:.3f}]"


def _line_plot(result: SweepResult, axis: str, metric: str, ylabel: str, path: Path, title: str) -> Path:
    """Steered and random-floor metric against layers or coefficients, with intervals and the
    unsteered value as a horizontal band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = result.plan
    xs = list(plan.layers) if axis == "layer" else list(plan.coeffs)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    arms = (("steered", "o-"), ("random", "s--")) if plan.floor else (("steered", "o-"),)
    for arm, style in arms:
        cells = [result.cell(arm, x, plan.coeffs[0]) if axis == "layer" else result.cell(arm, plan.layers[0], x)
                 for x in xs]
        values = [c.summary[metric].value for c in cells]
        lows = [c.summary[metric].low if c.summary[metric].low is not None else v for c, v in zip(cells, values)]
        highs = [c.summary[metric].high if c.summary[metric].high is not None else v for c, v in zip(cells, values)]
        ax.plot(xs, values, style, label="steering" if arm == "steered" else "random vector, equal norm")
        ax.fill_between(xs, lows, highs, alpha=0.2)
    base = result.cell("unsteered").summary[metric]
    ax.axhline(base.value, color="grey", linestyle=":", label="unsteered")
    if base.low is not None:
        ax.axhspan(base.low, base.high, color="grey", alpha=0.12)
    if axis == "coefficient":
        ax.set_xscale("log", base=2)
    ax.set_xlabel(axis)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _ratio_plot(bins: dict[str, dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in bins if bins[label]["ratio"] is not None]
    values = [bins[label]["ratio"] for label in labels]
    errors = [[v - (bins[label]["low"] or v) for label, v in zip(labels, values)],
              [(bins[label]["high"] or v) - v for label, v in zip(labels, values)]]
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    ax.bar(labels, values, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_ylabel("perplexity steered / unsteered")
    ax.set_xlabel("share of the text's words that are wedding words")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _floor(result: SweepResult, layer: int, coeff: float) -> dict[str, Estimate]:
    """The random floor's summary, or empty estimates where the sweep ran without one."""
    if result.plan.floor:
        return result.cell("random", layer, coeff).summary
    return {name: Estimate(None, None, None, 0) for name in METRICS}


def _scores(summary: dict[str, Estimate]) -> str:
    """Relevance, then the three scores against unsteered, as table cells."""
    return " | ".join(fmt(summary[name]) for name in ("relevance", "fluency_score", "relevance_score", "harmonic"))


def _sweep_table(result: SweepResult, axis: str) -> list[str]:
    lines = [f"| {axis} | topic share (steered) | random floor | NLL steered | NLL random | relevance (PMI) steered | "
             "fluency score | relevance score | harmonic mean | distinct-2 steered |", "|---:|" + "---|" * 9]
    base = result.cell("unsteered").summary
    lines.append(f"| unsteered | {fmt(base['topic'])} | | {fmt(base['nll'])} | | {_scores(base)} | "
                 f"{fmt(base['distinct2'])} |")
    keys = [(layer, c) for layer in result.plan.layers for c in result.plan.coeffs]
    for layer, coeff in keys:
        s, r = result.cell("steered", layer, coeff).summary, _floor(result, layer, coeff)
        x = layer if axis == "layer" else f"{coeff:g}"
        lines.append(f"| {x} | {fmt(s['topic'])} | {fmt(r['topic'])} | {fmt(s['nll'])} | {fmt(r['nll'])} | "
                     f"{_scores(s)} | {fmt(s['distinct2'])} |")
    return lines


def _sentiment_table(result: SweepResult) -> list[str]:
    lines = ["| layer | VADER steered | random floor | NLL steered | relevance (PMI) steered | distinct-2 steered |",
             "|---:|---|---|---|---|---|"]
    base = result.cell("unsteered").summary
    lines.append(f"| unsteered | {fmt(base['sentiment'])} | | {fmt(base['nll'])} | {fmt(base['relevance'])} | "
                 f"{fmt(base['distinct2'])} |")
    for layer in result.plan.layers:
        s = result.cell("steered", layer, result.plan.coeffs[0]).summary
        r = _floor(result, layer, result.plan.coeffs[0])
        lines.append(f"| {layer} | {fmt(s['sentiment'])} | {fmt(r['sentiment'])} | {fmt(s['nll'])} | "
                     f"{fmt(s['relevance'])} | {fmt(s['distinct2'])} |")
    return lines


def _setting_scores(cell: CellResult, sweep: SweepResult) -> str:
    """A cell's topic share, NLL and relevance beside its sweep's unsteered ones, then its scores."""
    s, base = cell.summary, sweep.cell("unsteered").summary
    return (f"topic {fmt(s['topic'])} (unsteered {fmt(base['topic'])}), NLL {fmt(s['nll'])} (unsteered "
            f"{fmt(base['nll'])}), relevance {fmt(s['relevance'])} (unsteered {fmt(base['relevance'])}); fluency "
            f"score {fmt(s['fluency_score'])}, relevance score {fmt(s['relevance_score'])}, harmonic mean "
            f"{fmt(s['harmonic'])}")


def _examples(result: SweepResult, steered: CellResult, count: int = 3) -> list[str]:
    base = result.cell("unsteered")
    step = max(1, len(base.texts) // count)
    lines = []
    for i in range(0, step * count, step):
        prompt = result.plan.prompts[i // result.plan.sampling.samples]
        lines += [f"- prompt `{prompt!r}`", f"  - unsteered: {base.texts[i].strip()!r}",
                  f"  - steered: {steered.texts[i].strip()!r}"]
    return lines


def write_report(result: PaperResult, out_dir: Path, command: str) -> Path:
    """``report.md`` with plots beside it; returns its path."""
    layers, coeffs, senti = result.topic_layers, result.topic_coeffs, result.sentiment
    _line_plot(layers, "layer", "topic", "share mentioning weddings", out_dir / "topic_vs_layer.png",
               f"wedding topic vs layer, coefficient {layers.plan.coeffs[0]:g}")
    _line_plot(coeffs, "coefficient", "topic", "share mentioning weddings", out_dir / "topic_vs_coeff.png",
               f"wedding topic vs coefficient, layer {result.best_layer}")
    _line_plot(coeffs, "coefficient", "nll", "NLL/token under unsteered model", out_dir / "nll_vs_coeff.png",
               f"fluency cost vs coefficient, layer {result.best_layer}")
    _line_plot(senti, "layer", "sentiment", "mean VADER compound", out_dir / "sentiment_vs_layer.png",
               f"Love − Hate on hostile openings, coefficient {senti.plan.coeffs[0]:g}")
    bins = ratio_by_bin(result.perplexity)
    _ratio_plot(bins, out_dir / "perplexity_ratio.png",
                f"wedding vector at layer {result.layer}, coefficient {result.coeff:g}")
    for name, sweep in (("topic_layers", layers), ("topic_coeffs", coeffs), ("sentiment", senti)):
        heatmaps(sweep, out_dir / name)

    best = layers.cell("steered", result.best_layer, layers.plan.coeffs[0]).summary
    base = layers.cell("unsteered").summary
    s = result.settings
    best_senti_layer = max(senti.plan.layers, key=lambda layer: senti.cell("steered", layer, senti.plan.coeffs[0])
                           .summary["sentiment"].value or -2)
    best_senti = senti.cell("steered", best_senti_layer, senti.plan.coeffs[0]).summary["sentiment"]
    chosen_sweep, chosen = result.chosen()
    topic_cells = [(sweep, c) for sweep in (layers, coeffs) for c in sweep.cells if c.cell.arm == "steered"]
    balanced_sweep, balanced = max(topic_cells, key=lambda pair: pair[1].summary["harmonic"].value or 0.0)
    lines = [
        f"# ActAdd paper experiments on {result.model}",
        "",
        f"Command: `{command}`  ",
        f"Run time: {result.seconds / 60:.1f} min. Sampling: temperature 1.0, top_p 0.3, repetition_penalty 1.2, "
        f"{s.max_tokens} tokens, {s.samples} completions × {s.prompts} prompts per cell (raw completions). "
        f"BOS written in front of prompts and steering prompts: {result.bos!r}. Intervals are 95% "
        "(Wilson for shares, normal for means). The random floor is a random vector with the steering's "
        "per-row norms.",
        "",
        "## Summary beside the paper (GPT-2-XL)",
        "",
        "| | paper | this model |",
        "|---|---|---|",
        f"| wedding topic, unsteered | {PAPER['topic_unsteered']} | {_pct(base['topic'].value)} |",
        f"| wedding topic, best layer | {PAPER['topic_best']} | {_pct(best['topic'].value)} at layer "
        f"{result.best_layer} of {layers.plan.layers[-1]} (coefficient {layers.plan.coeffs[0]:g}) |",
        f"| Love − Hate on hostile openings | {PAPER['sentiment']} | VADER "
        f"{fmt(senti.cell('unsteered').summary['sentiment'])} unsteered → {fmt(best_senti)} at layer {best_senti_layer} |",
        f"| off-topic perplexity ratio | {PAPER['perplexity']} | "
        + "; ".join(f"{label}: {_ratio(b)} ({b['texts']} texts)" for label, b in bins.items()) + " |",
        "",
        f"Chosen setting: layer {result.layer}, coefficient {result.coeff:g}, the highest topic share among the "
        f"{len(topic_cells)} steered cells of sections 1 and 2 whose NLL costs at most {NLL_BUDGET:g} nat/token over "
        f"unsteered (the highest of all when none does): {_setting_scores(chosen, chosen_sweep)}.",
        "",
        f"Highest harmonic mean of topic share, fluency score and relevance score among those cells (AxBench's "
        f"criterion): layer {balanced.cell.layer}, coefficient {balanced.cell.coeff:g}: "
        f"{_setting_scores(balanced, balanced_sweep)}.",
        "",
        "## 1. Wedding topic against layer",
        "",
        "![topic vs layer](topic_vs_layer.png)",
        "",
        *_sweep_table(layers, "layer"),
        "",
        "## 2. Wedding topic against coefficient at the best layer",
        "",
        "![topic vs coefficient](topic_vs_coeff.png) ![NLL vs coefficient](nll_vs_coeff.png)",
        "",
        *_sweep_table(coeffs, "coefficient"),
        "",
        "Examples at the chosen setting:",
        "",
        *_examples(chosen_sweep, chosen),
        "",
        "## 3. Love − Hate on hostile sentence starts",
        "",
        "![sentiment vs layer](sentiment_vs_layer.png)",
        "",
        *_sentiment_table(senti),
        "",
        "## 4. Off-topic perplexity",
        "",
        "![perplexity ratio](perplexity_ratio.png)",
        "",
        "| wedding-word share | texts | perplexity ratio steered/unsteered [95%] |",
        "|---|---:|---|",
        *[f"| {label} | {b['texts']} | {_ratio(b, interval=True)} |" for label, b in bins.items()],
        "",
    ]
    if result.treatment:
        lines += ["## 5. BOS and negative prompt at the chosen setting", "",
                  "| variant | topic share | NLL | relevance (PMI) | distinct-2 |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {fmt(c.summary['topic'])} | {fmt(c.summary['nll'])} | {fmt(c.summary['relevance'])} | "
                  f"{fmt(c.summary['distinct2'])} |" for name, c in result.treatment.items()]
        lines.append("")
    lines += ["Per-sweep heatmaps: `topic_layers/`, `topic_coeffs/`, `sentiment/` (one PNG per metric); raw "
              "completions in each directory's `records.jsonl`; all numbers in `paper.json`.", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
