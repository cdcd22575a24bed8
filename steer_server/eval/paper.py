"""The ActAdd paper's experiments (Turner et al. 2023) on whatever model a server serves.

1. Topic: the wedding vector (``" weddings"`` − ``" "``, front-aligned) on neutral sentence
   starts; share of completions with a wedding word against the layer at a fixed
   coefficient, then against the coefficient at the best layer; beside the unsteered share
   and a random vector of equal norm. The chosen setting is the best of all those cells
   within the fluency budget.
2. Sentiment: ``"Love"`` − ``"Hate"`` on hostile sentence starts; VADER shift per layer.
3. Off-topic perplexity: the shipped texts, binned by the share of their words that are
   wedding words; per bin the steered/unsteered perplexity ratio at the chosen wedding
   setting (perplexity under ActAdd, whose rows sit on the text's first tokens).
4. Treatment: the chosen wedding setting with and without a BOS token in front of prompt and
   steering prompts, and with the space stream subtracted (the paper's padded empty negative)
   or not (the " weddings" stream alone).

Everything goes under one output directory (one subdirectory per sweep, each resumable),
with ``report.md`` and its plots at the top.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from steer_server.measure import data, metrics
from steer_server.measure.client import Sampling, SteerClient
from steer_server.measure.journal import Journal
from steer_server.measure.steerings import PromptAdditions
from steer_server.measure.sweep import CellResult, SweepPlan, SweepResult, run_sweep

# What the paper reports for GPT-2-XL (48 blocks), for the report's side-by-side.
PAPER = {
    "topic_unsteered": "about 2%",
    "topic_best": "over 90% (best layer 6 of 48, effective from the first layer, declining after)",
    "perplexity": "ratio about 1 for unrelated texts, below 1 (steered text more likely) for wedding-related ones",
    "sentiment": "Love − Hate turns hostile openings kind (\"I hate you because\" → affectionate completions)",
}
# Relatedness bins: share of a text's words that are wedding words.
BINS = ((0.0, 0.0, "none"), (0.0, 0.03, "light (≤ 3%)"), (0.03, 1.0, "heavy (> 3%)"))
NLL_BUDGET = 1.0  # the chosen setting may cost at most this many nats/token of fluency


@dataclass(frozen=True)
class PaperSettings:
    layer_stride: int  # topic layers: 0, stride, 2·stride, ... num_layers
    topic_coeff: float  # the fixed coefficient of the layer sweep
    topic_coeffs: tuple[float, ...]  # the coefficient sweep at the best layer
    sentiment_coeff: float
    prompts: int  # how many of each shipped prompt set
    samples: int  # completions per prompt and cell
    max_tokens: int = 40
    treatment: bool = True
    sentiment_stride: int | None = None  # sentiment layers (default: the topic layers)
    floors: bool = True  # random floors in the coefficient and sentiment sweeps too (the layer sweep always has one)

    @classmethod
    def quick(cls) -> PaperSettings:
        return cls(layer_stride=5, topic_coeff=4.0, topic_coeffs=(1.0, 2.0, 4.0, 8.0), sentiment_coeff=5.0,
                   prompts=8, samples=4, max_tokens=24, sentiment_stride=10, floors=False)

    @classmethod
    def full(cls) -> PaperSettings:
        return cls(layer_stride=2, topic_coeff=4.0, topic_coeffs=(0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
                   sentiment_coeff=5.0, prompts=16, samples=8)


def sampling_of(settings: PaperSettings) -> Sampling:
    return Sampling(max_tokens=settings.max_tokens, samples=settings.samples)


def wedding_steering(bos: str, minus_space: bool = True) -> PromptAdditions:
    """``" weddings"`` − ``" "`` (the paper's: its negative prompt is empty, space-padded), or
    with ``minus_space=False`` the ``" weddings"`` stream alone (less BOS, when there is one)."""
    if minus_space:
        return PromptAdditions(((bos + " weddings", 1.0), (bos + " ", -1.0)))
    return PromptAdditions(((bos + " weddings", 1.0), (bos, -1.0)) if bos else ((" weddings", 1.0),), pad=None)


def love_hate_steering(bos: str) -> PromptAdditions:
    return PromptAdditions(((bos + "Love", 1.0), (bos + "Hate", -1.0)))


def best_layer(result: SweepResult) -> int:
    """Highest topic share; ties go to the lower NLL."""
    steered = [c for c in result.cells if c.cell.arm == "steered"]
    return max(steered, key=lambda c: (c.summary["topic"].value, -(c.summary["nll"].value or 0))).cell.layer


def chosen_setting(*results: SweepResult) -> tuple[int, float]:
    """(layer, coefficient) of the highest topic share among every steered cell of the sweeps
    whose NLL costs at most NLL_BUDGET nats/token over its own sweep's unsteered cell (the
    highest share of all when none does); ties go to the smaller coefficient. Over every cell,
    not only the topic-maximising layer's: a layer that steers less at full strength may steer
    more within the budget."""
    steered, fluent = [], []
    for result in results:
        base = result.cell("unsteered").summary["nll"].value or 0.0
        cells = [c for c in result.cells if c.cell.arm == "steered"]
        steered += cells
        fluent += [c for c in cells if (c.summary["nll"].value or 0.0) <= base + NLL_BUDGET]
    best = max(fluent or steered, key=lambda c: (c.summary["topic"].value, -c.cell.coeff))
    return best.cell.layer, best.cell.coeff


def bin_of(density: float) -> str:
    for low, high, label in BINS:
        if (density == 0.0 and high == 0.0) or low < density <= high:
            return label
    raise ValueError(density)


async def perplexity_ratios(client: SteerClient, steering: dict, bos: str, out_dir: Path,
                            on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Per shipped text: its wedding density, bin, and mean NLL unsteered and steered."""
    lexicon = data.wedding_lexicon()
    texts = data.offtopic_texts()
    rows = []
    with Journal(out_dir / "records.jsonl", {"model": client.model, "steering": steering, "bos": bos,
                                             "texts": texts}) as journal:
        done = 0

        async def one(index: int, text: str) -> None:
            nonlocal done
            key = f"text={index}"
            if key not in journal:
                plain, steered = await asyncio.gather(client.prompt_logprobs([bos + text]),
                                                      client.prompt_logprobs([bos + text], steering))
                journal.add(key, {"nll_unsteered": metrics.mean_nll(plain[0]),
                                  "nll_steered": metrics.mean_nll(steered[0])})
            done += 1
            if on_progress:
                on_progress(done, len(texts))

        await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        for i, text in enumerate(texts):
            record = journal.records[f"text={i}"]
            density = lexicon.density(text)
            rows.append({"text": i, "density": density, "bin": bin_of(density),
                         "nll_unsteered": record["nll_unsteered"], "nll_steered": record["nll_steered"],
                         "log_ratio": record["nll_steered"] - record["nll_unsteered"]})
    return rows


def ratio_by_bin(rows: list[dict]) -> dict[str, dict]:
    """Per bin: perplexity ratio exp(mean log ratio) with its interval, and the text count."""
    out = {}
    for _, _, label in BINS:
        est = metrics.mean_interval(r["log_ratio"] for r in rows if r["bin"] == label)
        out[label] = {"ratio": None if est.value is None else math.exp(est.value),
                      "low": None if est.low is None else math.exp(est.low),
                      "high": None if est.high is None else math.exp(est.high), "texts": est.n}
    return out


@dataclass
class PaperResult:
    model: str
    settings: PaperSettings
    bos: str
    topic_layers: SweepResult
    topic_coeffs: SweepResult
    sentiment: SweepResult
    perplexity: list[dict]
    treatment: dict[str, CellResult]
    best_layer: int  # the layer sweep's highest topic share: where the coefficients were swept
    layer: int  # the chosen setting (``chosen_setting``)
    coeff: float
    seconds: float

    def as_dict(self) -> dict:
        return {"model": self.model, "settings": dataclasses.asdict(self.settings), "bos": self.bos,
                "best_layer": self.best_layer, "layer": self.layer, "coeff": self.coeff, "seconds": self.seconds,
                "topic_layers": self.topic_layers.as_dict(), "topic_coeffs": self.topic_coeffs.as_dict(),
                "sentiment": self.sentiment.as_dict(), "perplexity": {"texts": self.perplexity,
                                                                      "bins": ratio_by_bin(self.perplexity)},
                "treatment": {name: cell.as_dict() for name, cell in self.treatment.items()}}

    def chosen(self) -> tuple[SweepResult, CellResult]:
        """The chosen setting's cell and the sweep that measured it (the coefficient sweep's when
        both did)."""
        return next((sweep, c) for sweep in (self.topic_coeffs, self.topic_layers) for c in sweep.cells
                    if c.cell.arm == "steered" and (c.cell.layer, c.cell.coeff) == (self.layer, self.coeff))


ProgressFactory = Callable[[str], Callable[[int, int], None]]  # stage title -> progress hook


async def run_paper(client: SteerClient, settings: PaperSettings, out_dir: Path, *, bos: str | None = None,
                    concurrency: int = 8, progress: ProgressFactory | None = None) -> PaperResult:
    started = time.monotonic()
    hook = progress or (lambda title: None)
    if bos is None:  # position 0 a BOS: what ``document_start`` finds, written when the tokenizer adds none
        bos = (await client.document_start()).text
    num_layers = await client.num_layers()
    layers = tuple(range(0, num_layers + 1, settings.layer_stride))
    sampling = sampling_of(settings)
    lexicon = data.wedding_lexicon()
    neutral = tuple(bos + p for p in data.neutral_prompts()[:settings.prompts])
    hostile = tuple(bos + p for p in data.hostile_prompts()[:settings.prompts])

    async def sweep(name: str, plan: SweepPlan) -> SweepResult:
        return await run_sweep(client, plan, out_dir / name, concurrency=concurrency, on_progress=hook(name))

    wedding = wedding_steering(bos)
    topic_layers = await sweep("topic_layers", SweepPlan(wedding, neutral, layers, (settings.topic_coeff,),
                                                         lexicon, sampling))
    swept = best_layer(topic_layers)
    topic_coeffs = await sweep("topic_coeffs", SweepPlan(wedding, neutral, (swept,), settings.topic_coeffs,
                                                         lexicon, sampling, floor=settings.floors))
    layer, coeff = chosen_setting(topic_layers, topic_coeffs)
    sentiment_layers = tuple(range(0, num_layers + 1, settings.sentiment_stride or settings.layer_stride))
    sentiment = await sweep("sentiment", SweepPlan(love_hate_steering(bos), hostile, sentiment_layers,
                                                   (settings.sentiment_coeff,), lexicon, sampling,
                                                   floor=settings.floors))
    perplexity = await perplexity_ratios(client, wedding.request(layer, coeff), bos, out_dir / "perplexity",
                                         hook("perplexity"))
    treatment: dict[str, CellResult] = {}
    if settings.treatment:
        variants = {"BOS, − ' '": (bos, True), "BOS, no negative": (bos, False),
                    "no BOS, − ' '": ("", True), "no BOS, no negative": ("", False)}
        for name, (prefix, minus_space) in variants.items():
            plan = SweepPlan(wedding_steering(prefix, minus_space),
                             tuple(prefix + p for p in data.neutral_prompts()[:settings.prompts]),
                             (layer,), (coeff,), lexicon, sampling, floor=False, baseline=False)
            slug = "treatment_" + "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
            treatment[name] = (await sweep(slug, plan)).cell("steered", layer, coeff)
    result = PaperResult(client.model, settings, bos, topic_layers, topic_coeffs, sentiment, perplexity, treatment,
                         swept, layer, coeff, time.monotonic() - started)
    (out_dir / "paper.json").write_text(json.dumps(result.as_dict(), indent=1) + "\n", encoding="utf-8")
    return result
