"""Calibration: a stored vector's default layer, dose and positions, measured on prompts.

A sweep of layers × relative doses (``steer_server.measure``, the same machinery as
``/v1/steering/sweeps``) steers a prompt set through the server; each cell is judged by a
concept score and by fluency:

- concept: the share of completions that mention a lexicon word, or, for a vector made from
  contrast pairs (its stats hold the pairs' midpoint), the share of generated tokens whose
  stream, read through the *unsteered* model at the vector's layer, projects past that
  midpoint on the vector's direction — the positive side of the pairs it was made from;
- fluency: mean NLL per token of the completions under the unsteered model.

The chosen cell is the one whose concept score moves furthest from the unsteered
completions' (read the same way: a stream readout's unsteered level differs by layer) while
its fluency costs at most the budget (nats/token above the unsteered cell), the smaller dose
on a tie. It is stored beside
the vector, keyed by its content id (``vector_store``'s calibrations): a re-calibration is a
new version of that record, never a new vector, and every replica reading the store uses it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import torch

from steer_server.measure import metrics
from steer_server.measure.sweep import SweepResult

DEFAULT_BUDGET = 1.0  # nats/token of fluency a calibrated setting may cost
MAX_DEFAULT_LAYERS = 4
CAPTURE_GROUP = 64  # sequences per capture call

# (token id lists, layers) -> per sequence {layer: float32 [len, hidden]}
CaptureFn = Callable[[list[list[int]], list[int]], Awaitable[list[dict[int, torch.Tensor]]]]


class CalibrationError(Exception):
    """No setting can be chosen (the message says why); the vector is left as it was."""


def default_layers(vector_layers: list[int], num_layers: int) -> list[int]:
    """The layers a calibration tries when none are given: the vector's own, or, for a vector
    with many, up to ``MAX_DEFAULT_LAYERS`` of them spread over the middle of the model
    (where steering moves text without breaking it first; EVALUATION.md)."""
    if len(vector_layers) <= MAX_DEFAULT_LAYERS:
        return list(vector_layers)
    middle = [layer for layer in vector_layers if num_layers * 0.25 <= layer <= num_layers * 0.75] or vector_layers
    step = (len(middle) - 1) / (MAX_DEFAULT_LAYERS - 1)
    return sorted({middle[round(i * step)] for i in range(MAX_DEFAULT_LAYERS)})


@dataclass(frozen=True)
class CellScore:
    layer: int
    dose: float
    concept: metrics.Estimate
    nll: metrics.Estimate
    baseline: metrics.Estimate  # the unsteered completions' concept score, read the same way

    def as_dict(self, unsteered_nll: float) -> dict:
        cost = None if self.nll.value is None else self.nll.value - unsteered_nll
        return {"layer": self.layer, "dose": self.dose, "concept": self.concept.as_dict(),
                "unsteered_concept": self.baseline.as_dict(), "nll": self.nll.as_dict(), "nll_cost": cost}


@dataclass(frozen=True)
class Calibration:
    """What is stored: the default setting and how it was found."""

    layer: int
    dose: float
    positions: str | dict
    mode: str
    concept: str  # "projection" or "lexicon:<name>"
    score: float
    score_interval: tuple[float, float]
    unsteered_score: float
    nll_cost: float
    budget: float
    prompts: int
    samples: int
    created: float

    def as_json(self) -> dict:
        body = asdict(self)
        body["score_interval"] = list(self.score_interval)
        return body


def choose(cells: list[CellScore], unsteered_nll: float, budget: float) -> CellScore:
    """The cell that moves the concept most from its unsteered level among those within the
    fluency budget. A cell is within it when the upper end of its NLL's 95% interval is: a
    cell whose mean cost sits at the budget's edge costs more than the budget on about half
    of new prompts (EVALUATION.md, "First try")."""
    measured = [c for c in cells if c.nll.value is not None and c.concept.value is not None]
    within = [c for c in measured if _cost_bound(c) - unsteered_nll <= budget]
    if not within:
        if not measured:
            raise CalibrationError("no cell produced any text to score")
        cheapest = min(measured, key=_cost_bound)
        raise CalibrationError(
            f"no cell costs at most {budget:g} nats/token of fluency, at the upper end of its 95% interval (the "
            f"cheapest, layer {cheapest.layer} at dose {cheapest.dose:g}, costs {cheapest.nll.value - unsteered_nll:.2f},"
            f" up to {_cost_bound(cheapest) - unsteered_nll:.2f}); try smaller doses or a larger budget")
    # The largest move from the unsteered level: a stream readout's unsteered level differs by layer.
    return max(within, key=lambda c: (c.concept.value - (c.baseline.value or 0.0), -c.dose))


def _cost_bound(cell: CellScore) -> float:
    """The upper end of the cell's NLL interval (its value when too few completions give one)."""
    return cell.nll.value if cell.nll.high is None else cell.nll.high


class ProjectionConcept:
    """The share of generated tokens on the positive side of a vector's pairs, read through
    the unsteered model at ``layer``: ``h · u > midpoint`` (u the unit direction)."""

    def __init__(self, capture: CaptureFn, layer: int, direction: torch.Tensor, midpoint: float):
        self.capture = capture
        self.layer = layer
        self.unit = direction.reshape(-1).double() / direction.double().norm()
        self.midpoint = midpoint

    async def shares(self, prompt_ids: list[int], completions: list[list[int]]) -> list[float]:
        """Per completion (generated token ids after ``prompt_ids``), its share of tokens past
        the midpoint; completions with no tokens are left out."""
        kept = [ids for ids in completions if ids]
        out = []
        for start in range(0, len(kept), CAPTURE_GROUP):
            group = kept[start:start + CAPTURE_GROUP]
            streams = await self.capture([prompt_ids + ids for ids in group], [self.layer])
            for ids, stream in zip(group, streams):
                generated = stream[self.layer][len(prompt_ids):].double()
                out.append(float(((generated @ self.unit) > self.midpoint).double().mean()))
        return out


async def score_cells(result: SweepResult, readouts: dict[int, ProjectionConcept] | None
                      ) -> tuple[metrics.Estimate, list[CellScore]]:
    """The unsteered fluency, and every steered cell's concept and fluency beside the unsteered
    concept read the same way. ``readouts`` (per layer) None: the lexicon share the sweep measured."""
    unsteered = next(c for c in result.cells if c.cell.arm == "unsteered")

    async def concept_of(cell, layer: int) -> metrics.Estimate:
        if readouts is None:
            return cell.summary["topic"]
        values = []
        for record in cell.records:
            values += await readouts[layer].shares(record["prompt_token_ids"], record["token_ids"])
        return metrics.mean_interval(values)

    baselines: dict[int, metrics.Estimate] = {}
    scored = []
    for cell in result.cells:
        if cell.cell.arm != "steered":
            continue
        layer = cell.cell.layer
        if layer not in baselines:
            baselines[layer] = await concept_of(unsteered, layer)
        scored.append(CellScore(layer, cell.cell.coeff, await concept_of(cell, layer), cell.summary["nll"],
                                baselines[layer]))
    return unsteered.summary["nll"], scored


def calibration_of(best: CellScore, unsteered_nll: float, *, positions, mode: str, concept: str, budget: float,
                   prompts: int, samples: int) -> Calibration:
    interval = (best.concept.low, best.concept.high)
    if not all(x is not None and math.isfinite(x) for x in interval):
        interval = (best.concept.value, best.concept.value)
    return Calibration(best.layer, best.dose, positions, mode, concept, best.concept.value, interval,
                       best.baseline.value, best.nll.value - unsteered_nll, budget, prompts, samples, time.time())
