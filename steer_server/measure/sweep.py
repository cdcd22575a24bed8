"""A layers × coefficients (or × relative doses) sweep of one steering over a prompt set,
against a running server.

Cells: the unsteered baseline, then per (layer, coefficient) the steering and (``floor``)
a random vector of equal row norms. A unit of work is one (cell, prompt): one completions
request for ``sampling.samples`` completions (with ``sampling.seeded``, a seed that depends
only on the prompt, so every cell draws the same random numbers), then one unsteered prompt-log-probability
request that scores those completions' tokens after their prompt and after the document start
alone. Units run concurrently and are journaled as they finish (``records.jsonl`` in the output
directory), so a rerun skips finished units.

Per cell (``summarize``): topic share (completions that contain a lexicon word, Wilson
interval), sentiment (mean VADER compound), fluency (mean NLL per completion token under
the unsteered model, averaged over completions), relevance (the per-token pointwise mutual
information of prompt and completion under the unsteered model: how much better the prompt
predicts the completion than nothing does) and repetition (distinct-2 of each completion's
words, averaged). Then (``scores``) against the unsteered cell, in [0, 1]: a fluency score,
a relevance score and the harmonic mean of those two with the topic share (AxBench's way
of asking for concept, instruction relevance and fluency at once).
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from steer_server.measure import metrics
from steer_server.measure.client import Sampling, SteerClient
from steer_server.measure.journal import Journal
from steer_server.measure.steerings import RandomFloor, Steering, Strength, random_floor

Arm = Literal["unsteered", "steered", "random"]
METRICS = {  # name -> label
    "topic": "topic share",
    "sentiment": "sentiment (VADER)",
    "nll": "NLL under unsteered model",
    "relevance": "relevance (PMI, nats/token)",
    "distinct2": "distinct-2",
    # against the unsteered cell (``scores``)
    "fluency_score": "fluency score",
    "relevance_score": "relevance score",
    "harmonic": "harmonic mean (topic, fluency, relevance)",
}


@dataclass(frozen=True)
class Cell:
    arm: Arm
    layer: int | None = None
    coeff: float | None = None

    @property
    def key(self) -> str:
        if self.arm == "unsteered":
            return "unsteered"
        return f"{self.arm}@layer={self.layer}&coeff={self.coeff:g}"


@dataclass(frozen=True)
class SweepPlan:
    steering: Steering
    prompts: tuple[str, ...]
    layers: tuple[int | None, ...]
    coeffs: tuple[float, ...]
    lexicon: metrics.Lexicon
    sampling: Sampling = Sampling()
    floor: bool = True
    baseline: bool = True  # the unsteered cell
    seed: int = 0
    strength: Strength = "coeff"  # what ``coeffs`` hold: coefficients, or relative doses

    def cells(self) -> list[Cell]:
        arms: tuple[Arm, ...] = ("steered", "random") if self.floor else ("steered",)
        return [Cell("unsteered")] * self.baseline + [Cell(arm, layer, coeff) for layer in self.layers
                                                      for coeff in self.coeffs for arm in arms]

    def generated_tokens(self) -> int:
        """The most tokens the run generates: every completion of every cell at max_tokens."""
        return len(self.cells()) * len(self.prompts) * self.sampling.samples * self.sampling.max_tokens

    def header(self, model: str) -> dict:
        """What makes two runs the same run (for resuming)."""
        return {"model": model, "steering": self.steering.describe(), "prompts": list(self.prompts),
                "layers": list(self.layers), "coeffs": list(self.coeffs), "lexicon": sorted(self.lexicon.entries),
                "sampling": dataclasses.asdict(self.sampling), "floor": self.floor, "baseline": self.baseline,
                "seed": self.seed, **({"strength": self.strength} if self.strength != "coeff" else {})}


@dataclass
class CellResult:
    cell: Cell
    texts: list[str]
    nll: list[float | None]
    summary: dict[str, metrics.Estimate]
    records: list[dict]  # the journal's, one per prompt in order (token ids for concept scores read off the stream)

    def as_dict(self) -> dict:
        return {"arm": self.cell.arm, "layer": self.cell.layer, "coeff": self.cell.coeff,
                "metrics": {name: est.as_dict() for name, est in self.summary.items()}}


@dataclass
class SweepResult:
    plan: SweepPlan
    model: str
    cells: list[CellResult]

    def cell(self, arm: Arm, layer: int | None = None, coeff: float | None = None) -> CellResult:
        for result in self.cells:
            if result.cell == Cell(arm, layer, coeff):
                return result
        raise KeyError((arm, layer, coeff))

    def as_dict(self) -> dict:
        return {"model": self.model, "steering": self.plan.steering.describe(), "layers": list(self.plan.layers),
                "coeffs": list(self.plan.coeffs), "strength": self.plan.strength, "prompts": len(self.plan.prompts),
                "sampling": dataclasses.asdict(self.plan.sampling), "lexicon": self.plan.lexicon.name,
                "cells": [c.as_dict() for c in self.cells]}


def summarize(texts: list[str], nll: list[float | None], pmi: list[float | None],
              lexicon: metrics.Lexicon) -> dict[str, metrics.Estimate]:
    return {
        "topic": metrics.wilson(sum(lexicon.mentions(t) for t in texts), len(texts)),
        "sentiment": metrics.mean_interval(metrics.sentiment(t) for t in texts),
        "nll": metrics.mean_interval(nll),
        "relevance": metrics.mean_interval(pmi),
        "distinct2": metrics.mean_interval(metrics.distinct_n(t, 2) for t in texts),
    }


def scores(summary: dict[str, metrics.Estimate], unsteered: dict[str, metrics.Estimate] | None,
           concept: str = "topic") -> dict[str, metrics.Estimate]:
    """A cell's scores in [0, 1] against the unsteered cell's summary (None: a sweep without
    one, nothing to score against), and their harmonic mean with the concept score, the
    summary's share named ``concept``. Point values: each is a ratio of two estimates."""
    fluency = relevance = None
    if unsteered is not None:
        fluency = metrics.fluency_score(summary["nll"].value, unsteered["nll"].value)
        relevance = metrics.relevance_score(summary["relevance"].value, unsteered["relevance"].value)
    harmonic = metrics.harmonic_mean([summary[concept].value, fluency, relevance])
    n = min(summary[concept].n, summary["nll"].n, summary["relevance"].n)
    return {"fluency_score": metrics.Estimate(fluency, None, None, summary["nll"].n),
            "relevance_score": metrics.Estimate(relevance, None, None, summary["relevance"].n),
            "harmonic": metrics.Estimate(harmonic, None, None, n)}


ProgressHook = Callable[[int, int], None]  # (done, total)


async def run_sweep(client: SteerClient, plan: SweepPlan, out_dir: Path, *, concurrency: int = 8,
                    on_progress: ProgressHook | None = None) -> SweepResult:
    """Run (or finish) the sweep; records go to ``out_dir/records.jsonl``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = plan.cells()
    with Journal(out_dir / "records.jsonl", plan.header(client.model)) as journal:
        floor = None
        if plan.floor:
            floor = await random_floor(client, plan.steering, list(plan.layers), plan.seed)
        start = (await client.document_start()).ids
        units = [(cell, i) for cell in cells for i in range(len(plan.prompts))]
        todo = [(cell, i) for cell, i in units if _unit_key(cell, i) not in journal]
        done = len(units) - len(todo)
        if on_progress:
            on_progress(done, len(units))
        gate = asyncio.Semaphore(concurrency)

        async def one(cell: Cell, index: int) -> None:
            nonlocal done
            async with gate:
                record = await _run_unit(client, plan, floor, cell, index, start)
            journal.add(_unit_key(cell, index), record)
            done += 1
            if on_progress:
                on_progress(done, len(units))

        await asyncio.gather(*(one(cell, i) for cell, i in todo))
        results = []
        for cell in cells:
            records = [journal.records[_unit_key(cell, i)] for i in range(len(plan.prompts))]
            texts = [text for record in records for text in record["texts"]]
            nll = [value for record in records for value in record["nll"]]
            # records journaled before relevance was measured have no "pmi": missing, not zero
            pmi = [value for record in records for value in record.get("pmi", [None] * len(record["texts"]))]
            results.append(CellResult(cell, texts, nll, summarize(texts, nll, pmi, plan.lexicon), records))
    unsteered = next((result.summary for result in results if result.cell.arm == "unsteered"), None)
    for result in results:
        result.summary |= scores(result.summary, unsteered)
    return SweepResult(plan, client.model, results)


def _unit_key(cell: Cell, prompt_index: int) -> str:
    return f"{cell.key}#prompt={prompt_index}"


def steering_of(plan: SweepPlan, floor: RandomFloor | None, cell: Cell) -> dict | None:
    if cell.arm == "unsteered":
        return None
    if cell.arm == "random":
        assert floor is not None
        return floor.request(cell.layer, cell.coeff, plan.strength)
    return plan.steering.request(cell.layer, cell.coeff, plan.strength)


async def _run_unit(client: SteerClient, plan: SweepPlan, floor: RandomFloor | None, cell: Cell, index: int,
                    start: tuple[int, ...]) -> dict:
    completions = await client.complete(plan.prompts[index], plan.sampling, plan.seed + index,
                                        steering_of(plan, floor, cell))
    # One unsteered scoring request: each completion after its prompt (fluency, and relevance's
    # conditional side), then after the document start ``start`` alone (relevance's other side;
    # an empty completion with no start token leaves nothing to send).
    prompted = [c.prompt_token_ids + c.token_ids for c in completions]
    unprompted = [list(start) + c.token_ids for c in completions]
    logprobs = await client.prompt_logprobs(prompted + [ids for ids in unprompted if ids])
    answers = [lp[len(c.prompt_token_ids) - 1:] for c, lp in zip(completions, logprobs)]
    free = iter(logprobs[len(completions):])
    pmi = [metrics.pmi(answer, next(free)) if ids else None for answer, ids in zip(answers, unprompted)]
    return {"texts": [c.text for c in completions], "nll": [metrics.mean_nll(answer) for answer in answers],
            "pmi": pmi, "tokens": [len(c.token_ids) for c in completions],
            # the ids themselves, for concept scores read off the model's stream (calibration)
            "prompt_token_ids": completions[0].prompt_token_ids if completions else [],
            "token_ids": [c.token_ids for c in completions]}
