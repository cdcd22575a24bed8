"""What a sweep steers with, as the ``steering`` field of a request at (layer, coefficient)
or (layer, relative dose), and its floor: a random vector with the same norm as the
steering at that layer (at a dose, any vector moves the stream by exactly the dose, so the
floor's dose is the steering's).

Three kinds, as the HTTP API takes them:

- ``PromptAdditions``: ActAdd prompts with relative weights (e.g. "Love" +1, "Hate" -1);
  at coefficient c each prompt's ``coeff`` is c·weight.
- ``ContrastPairs``: constant mode, the mean last-token difference of positive/negative
  prompts (each pair addition gets c/len(pairs), so the pairs average as in the vector routes).
- ``NamedVector``: a stored vector (name or id), moved to the sweep's layer when one is given,
  at a coefficient or a dose, on any schedule (``positions``) in constant mode.

A dose needs one vector (it scales each addition on its own): sweep doses of a stored
vector, e.g. one created from the prompts or pairs.

The floor is uploaded through the vector routes as given directions: per layer, one random
Gaussian row per steering row, each scaled to that row's norm (ActAdd rows differ a lot in
norm: a BOS row cancels to 0, pad rows are large), so the floor adds as much, where the
steering adds it, in no particular direction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from steer_server.measure.client import EvalError, SteerClient

SERVER_PAD = "server default"  # leave "pad" out of the request: the server's --steering-pad


Strength = Literal["coeff", "dose"]
Positions = str | dict  # a named schedule, or a window {"start"[, "end"]} over generated tokens


def _coefficient_only(strength: Strength, what: str) -> None:
    if strength != "coeff":
        raise EvalError(f"{what} sweep coefficients; for doses, create a vector from them and sweep that vector")


class Steering(Protocol):
    mode: Literal["actadd", "constant"]

    def request(self, layer: int | None, value: float, strength: Strength = "coeff") -> dict:
        """The request's ``steering`` field at coefficient (or dose) ``value``."""

    async def reference_vector(self, client: SteerClient, layer: int | None) -> dict:
        """The server's description (``?norms=true``) of this steering's vector at coefficient 1."""

    def describe(self) -> str:
        """One line for reports."""


@dataclass(frozen=True)
class PromptAdditions:
    additions: tuple[tuple[str, float], ...]  # (prompt, weight)
    pad: str | None = SERVER_PAD
    mode: Literal["actadd"] = field(default="actadd", init=False)

    def _pad(self) -> dict:
        return {} if self.pad == SERVER_PAD else {"pad": self.pad}

    def request(self, layer: int | None, value: float, strength: Strength = "coeff") -> dict:
        _coefficient_only(strength, "prompt additions")
        if layer is None:
            raise EvalError("prompt additions need a layer")
        return {"additions": [{"prompt": p, "coeff": value * w, "layer": layer} for p, w in self.additions],
                **self._pad()}

    async def reference_vector(self, client: SteerClient, layer: int | None) -> dict:
        body = {"layer": layer, "additions": [{"prompt": p, "coeff": w} for p, w in self.additions], **self._pad()}
        created = await client.create_vector(body)
        return await client.vector(created["id"], norms=True)

    def describe(self) -> str:
        parts = " ".join(f"{w:+g}·{p!r}" for p, w in self.additions)
        return f"actadd {parts}" + ("" if self.pad == SERVER_PAD else f" pad={self.pad!r}")


@dataclass(frozen=True)
class ContrastPairs:
    pairs: tuple[tuple[str, str], ...]  # (positive, negative)
    positions: Positions = "all"
    mode: Literal["constant"] = field(default="constant", init=False)

    def request(self, layer: int | None, value: float, strength: Strength = "coeff") -> dict:
        _coefficient_only(strength, "contrast pairs")
        if layer is None:
            raise EvalError("contrast pairs need a layer")
        each = value / len(self.pairs)
        return {"mode": "constant", "positions": self.positions, "additions": [
            {"positive": pos, "negative": neg, "coeff": each, "layer": layer} for pos, neg in self.pairs]}

    async def reference_vector(self, client: SteerClient, layer: int | None) -> dict:
        created = await client.create_vector(
            {"layer": layer, "pairs": [{"positive": pos, "negative": neg} for pos, neg in self.pairs]})
        return await client.vector(created["id"], norms=True)

    def describe(self) -> str:
        return "constant " + ", ".join(f"{pos!r}−{neg!r}" for pos, neg in self.pairs) + f" positions={self.positions}"


@dataclass(frozen=True)
class NamedVector:
    name: str
    mode: Literal["actadd", "constant"] = "actadd"
    positions: Positions = "all"

    def request(self, layer: int | None, value: float, strength: Strength = "coeff") -> dict:
        return _vector_request(self.name, self.mode, self.positions, layer, value, strength)

    async def reference_vector(self, client: SteerClient, layer: int | None) -> dict:
        described = await client.vector(self.name, norms=True)
        if layer is None or len(described["layers"]) == 1:
            return described
        if layer not in described["layers"]:
            raise EvalError(f"vector {self.name!r} has layers {described['layers']}, not {layer}")
        return {**described, "layers": [layer], "row_norms": {str(layer): described["row_norms"][str(layer)]}}

    def describe(self) -> str:
        return f"vector {self.name!r} ({self.mode})"


@dataclass(frozen=True)
class RandomFloor:
    """Random vectors with the steering's row norms, one per sweep layer."""

    steering: Steering
    vector_of_layer: dict[int | None, str]  # sweep layer -> content id of the uploaded random vector

    def request(self, layer: int | None, value: float, strength: Strength = "coeff") -> dict:
        return _vector_request(self.vector_of_layer[layer], self.steering.mode, getattr(self.steering, "positions", "all"),
                               layer, value, strength)


def _vector_request(vector: str, mode: str, positions: Positions, layer: int | None, value: float,
                    strength: Strength) -> dict:
    addition = {"vector": vector, strength: value, **({} if layer is None else {"layer": layer})}
    return {"mode": mode, **({"positions": positions} if mode == "constant" else {}), "additions": [addition]}


async def random_floor(client: SteerClient, steering: Steering, layers: list[int | None], seed: int) -> RandomFloor:
    """Upload, per sweep layer, a random vector matching the steering's per-row norms."""
    rng = np.random.default_rng(seed)
    vector_of_layer: dict[int | None, str] = {}
    for layer in layers:
        reference = await steering.reference_vector(client, layer)
        directions = {}
        for source in reference["layers"]:
            norms = np.asarray(reference["row_norms"][str(source)], dtype=np.float64)
            rows = rng.standard_normal((len(norms), reference["hidden_size"]))
            rows *= (norms / np.linalg.norm(rows, axis=1))[:, None]
            directions[str(source if layer is None else layer)] = rows.tolist()
        created = await client.create_vector({"layers": directions, "kind": steering.mode})
        vector_of_layer[layer] = created["id"]
    return RandomFloor(steering, vector_of_layer)
