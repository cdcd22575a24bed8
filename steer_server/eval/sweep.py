"""A layers × coefficients sweep of one steering over a prompt set, against a running server.

Cells: the unsteered baseline, then per (layer, coefficient) the steering and (``floor``)
a random vector of equal row norms. A unit of work is one (cell, prompt): one completions
request for ``sampling.samples`` completions (with ``sampling.seeded``, a seed that depends
only on the prompt, so every cell draws the same random numbers), then one unsteered prompt-log-probability
request that scores those completions' tokens. Units run concurrently and are journaled as
they finish (``records.jsonl`` in the output directory), so a rerun skips finished units.

Per cell (``summarize``): topic share (completions that contain a lexicon word, Wilson
interval), sentiment (mean VADER compound), fluency (mean NLL per completion token under
the unsteered model, averaged over completions) and repetition (distinct-2 of each
completion's words, averaged).
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from steer_server.eval import metrics
from steer_server.eval.client import Sampling, SteerClient
from steer_server.eval.journal import Journal
from steer_server.eval.steerings import RandomFloor, Steering, random_floor

Arm = Literal["unsteered", "steered", "random"]
METRICS = {  # name -> label
    "topic": "topic share",
    "sentiment": "sentiment (VADER)",
    "nll": "NLL under unsteered model",
    "distinct2": "distinct-2",
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

    def cells(self) -> list[Cell]:
        arms: tuple[Arm, ...] = ("steered", "random") if self.floor else ("steered",)
        return [Cell("unsteered")] * self.baseline + [Cell(arm, layer, coeff) for layer in self.layers
                                                      for coeff in self.coeffs for arm in arms]

    def header(self, model: str) -> dict:
        """What makes two runs the same run (for resuming)."""
        return {"model": model, "steering": self.steering.describe(), "prompts": list(self.prompts),
                "layers": list(self.layers), "coeffs": list(self.coeffs), "lexicon": sorted(self.lexicon.entries),
                "sampling": dataclasses.asdict(self.sampling), "floor": self.floor, "baseline": self.baseline,
                "seed": self.seed}


@dataclass
class CellResult:
    cell: Cell
    texts: list[str]
    nll: list[float | None]
    summary: dict[str, metrics.Estimate]

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
                "coeffs": list(self.plan.coeffs), "prompts": len(self.plan.prompts),
                "sampling": dataclasses.asdict(self.plan.sampling), "lexicon": self.plan.lexicon.name,
                "cells": [c.as_dict() for c in self.cells]}


def summarize(texts: list[str], nll: list[float | None], lexicon: metrics.Lexicon) -> dict[str, metrics.Estimate]:
    return {
        "topic": metrics.wilson(sum(lexicon.mentions(t) for t in texts), len(texts)),
        "sentiment": metrics.mean_interval(metrics.sentiment(t) for t in texts),
        "nll": metrics.mean_interval(nll),
        "distinct2": metrics.mean_interval(metrics.distinct_n(t, 2) for t in texts),
    }


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
        units = [(cell, i) for cell in cells for i in range(len(plan.prompts))]
        todo = [(cell, i) for cell, i in units if _unit_key(cell, i) not in journal]
        done = len(units) - len(todo)
        if on_progress:
            on_progress(done, len(units))
        gate = asyncio.Semaphore(concurrency)

        async def one(cell: Cell, index: int) -> None:
            nonlocal done
            async with gate:
                record = await _run_unit(client, plan, floor, cell, index)
            journal.add(_unit_key(cell, index), record)
            done += 1
            if on_progress:
                on_progress(done, len(units))

        await asyncio.gather(*(one(cell, i) for cell, i in todo))
        results = []
        for cell in cells:
            texts, nll = [], []
            for i in range(len(plan.prompts)):
                record = journal.records[_unit_key(cell, i)]
                texts += record["texts"]
                nll += record["nll"]
            results.append(CellResult(cell, texts, nll, summarize(texts, nll, plan.lexicon)))
    return SweepResult(plan, client.model, results)


def _unit_key(cell: Cell, prompt_index: int) -> str:
    return f"{cell.key}#prompt={prompt_index}"


def steering_of(plan: SweepPlan, floor: RandomFloor | None, cell: Cell) -> dict | None:
    if cell.arm == "unsteered":
        return None
    if cell.arm == "random":
        assert floor is not None
        return floor.request(cell.layer, cell.coeff)
    return plan.steering.request(cell.layer, cell.coeff)


async def _run_unit(client: SteerClient, plan: SweepPlan, floor: RandomFloor | None, cell: Cell, index: int) -> dict:
    completions = await client.complete(plan.prompts[index], plan.sampling, plan.seed + index,
                                        steering_of(plan, floor, cell))
    scored = [c.prompt_token_ids + c.token_ids for c in completions]
    logprobs = await client.prompt_logprobs(scored)
    nll = [metrics.mean_nll(lp[len(c.prompt_token_ids) - 1:]) for c, lp in zip(completions, logprobs)]
    return {"texts": [c.text for c in completions], "nll": nll,
            "tokens": [len(c.token_ids) for c in completions]}
