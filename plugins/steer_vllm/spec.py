"""The engine's wire format: what a request's ``SamplingParams.extra_args`` carries.

Requests carry references, not tensors: each addition names a stored vector by content
id. The HTTP layer resolves prompts and names into this form; offline users may build it
directly::

    SamplingParams(extra_args={"steering": {"additions": [
        {"vector": "v-…", "layer": 6, "coeff": 5.0, "mode": "actadd"}]}})

The value may also be the same object as a JSON string (vLLM's ``vllm_xargs`` only
carries flat values).
"""
from __future__ import annotations

import json
import math
import threading
from typing import Annotated, Any, Literal, Union

import cachetools
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from vllm.exceptions import VLLMValidationError

from steer_vllm.limits import MAX_ADDITIONS

STEERING_KEY = "steering"
CAPTURE_KEY = "steering_capture"


class SteeringSpecError(VLLMValidationError, ValueError):
    """A steering payload the engine cannot apply; the message names the field.

    A vLLM client error, so the OpenAI server answers 400 with this message."""

    __str__ = Exception.__str__  # the message already names the field


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def positive_finite(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a finite number above 0, got {value}")
    return value


# The numbers of the wire formats (the engine's here, the HTTP layer's and its routes').
FiniteFloat = Annotated[float, AfterValidator(finite)]
PositiveFinite = Annotated[float, AfterValidator(positive_finite)]


class PositionWindow(BaseModel):
    """Generated tokens ``start <= g < end`` (g = 0 is the first generated token; ``end``
    absent: no end). Generated token g sits at absolute position prompt_len + g; steering
    there first changes token g + 1, as for ``"generated"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int = Field(ge=0)
    end: int | None = None

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: int | None, info) -> int | None:
        start = info.data.get("start")
        if end is not None and start is not None and end <= start:
            raise ValueError(f"must be greater than start ({start}), got {end}")
        return end


# Which positions an operation acts on: every one, the prompt's, the generated tokens',
# those from the anchor on (chat: from the last user message), or a window of generated tokens.
POSITION_TAGS = ("named", "window")
Positions = Annotated[
    Union[Annotated[Literal["all", "prompt", "generated", "after_anchor"], Tag("named")],
          Annotated[PositionWindow, Tag("window")]],
    Discriminator(lambda value: "named" if isinstance(value, str) else "window",
                  custom_error_type="positions", custom_error_message=(
                      'expected "all", "prompt", "generated", "after_anchor" or {"start": i, "end": j}')),
]


def positions_json(positions: str | PositionWindow) -> str | dict:
    """A schedule as plain JSON (a window without its absent end)."""
    return positions if isinstance(positions, str) else positions.model_dump(exclude_none=True)


class EngineDirection(BaseModel):
    """A stored direction used at one layer.

    ``layer`` is the residual stream entering decoder block ``layer`` (0 = embeddings,
    num_layers = after the last block). ``source_layer`` picks which of the stored
    vector's layers to use (default: ``layer``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vector: str = Field(min_length=1)
    layer: int = Field(ge=0)
    source_layer: int | None = Field(default=None, ge=0)

    @property
    def direction_layer(self) -> int:
        return self.layer if self.source_layer is None else self.source_layer


class EngineAddition(EngineDirection):
    """The direction added to the stream, scaled by ``coeff`` or by a relative ``dose``:
    with a dose d each steered token t gets ``d * ‖h_t‖ * r / ‖r‖`` (r the direction's row
    for t, h_t the stream before steering), so ‖Δh‖/‖h‖ = d whatever the layer or model.
    ActAdd rows keep their front alignment (``positions`` stays "all")."""

    coeff: FiniteFloat | None = None
    dose: PositiveFinite | None = None
    mode: Literal["actadd", "constant"] = "actadd"
    positions: Positions = "all"

    @model_validator(mode="after")
    def _one_strength(self) -> "EngineAddition":
        if (self.coeff is None) == (self.dose is None):
            raise ValueError("give exactly one of coeff and dose")
        if self.mode == "actadd" and self.positions != "all":
            raise ValueError("actadd rows are front-aligned from the anchor; positions applies to constant mode")
        return self

    @property
    def strength(self) -> float:
        """The coefficient, or the dose."""
        return self.coeff if self.dose is None else self.dose


class EngineProjection(EngineDirection):
    """The stream's component along the direction's unit vector u, at every position:
    ``ablate`` removes it (h - (h.u)u); ``clamp`` sets it to ``value`` (h + (value - h.u)u).
    Applied after the layer's additions, so it also acts on what they added."""

    op: Literal["ablate", "clamp"]
    value: FiniteFloat = 0.0
    positions: Positions = "all"


class EngineSteering(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    additions: list[EngineAddition] = Field(default_factory=list, max_length=MAX_ADDITIONS)
    projections: list[EngineProjection] = Field(default_factory=list, max_length=MAX_ADDITIONS)
    # Layers at which each steered token's stream is rescaled to its norm before steering.
    preserve_norm: list[int] = Field(default_factory=list)
    # Absolute position of ActAdd row 0 (chat: the first token of the last user message).
    anchor: int = Field(default=0, ge=0)
    # Set by the HTTP layer while ``anchor`` waits for the prompt vLLM renders: "prompt" (its
    # first token) or "user" (the last user message). Its render hook checks the ActAdd
    # lengths against that prompt, sets ``anchor`` and clears this; the frontend refuses a
    # request that still carries it, so a render hook that did not run cannot skip the checks.
    anchor_to: Literal["prompt", "user"] | None = None
    # Set when the client asked for a receipt: the workers record what they applied under it.
    receipt: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "EngineSteering":
        if not self.additions and not self.projections:
            raise ValueError("at least one addition or projection is needed")
        layers = [p.layer for p in self.projections]
        if len(layers) != len(set(layers)):
            raise ValueError("at most one projection (ablate or clamp) per layer")
        steered = {a.layer for a in self.additions} | set(layers)
        if not set(self.preserve_norm) <= steered:
            raise ValueError("preserve_norm names a layer nothing steers")
        mixed = {a.layer for a in self.additions if a.dose is None} & {a.layer for a in self.additions if a.dose is not None}
        if mixed:
            raise ValueError(f"layer {min(mixed)} mixes coeff and dose additions; use one kind per layer")
        return self

    @property
    def directions(self) -> list[EngineDirection]:
        """Every stored direction the steering uses (additions, then projections)."""
        return [*self.additions, *self.projections]

    def canonical_json(self) -> str:
        """Order-independent text of the steering, for cache salts and logs."""
        rows = sorted(a.model_dump_json() for a in self.directions)
        extra = json.dumps({"preserve_norm": sorted(self.preserve_norm), "anchor": self.anchor})
        return "[" + ",".join(rows) + "]" + extra


class CaptureRequest(BaseModel):
    """Asks the engine to record the residual stream of this request's prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128)
    layers: list[int] = Field(min_length=1)
    token: str = ""  # proves the capture comes from this server's own frontend (see capture.py)


def _decode(raw: Any, model: type[BaseModel], key: str) -> Any:
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SteeringSpecError(f"{key}: not valid JSON ({exc.msg})") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise SteeringSpecError(_describe(exc, key)) from None


def _describe(exc: ValidationError, key: str) -> str:
    parts = []
    for error in exc.errors():
        # Drop the tags pydantic puts in a location inside the ``positions`` union.
        loc = [p for p in error["loc"] if p not in POSITION_TAGS]
        where = key + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


# Each process parses a steering's text once: the frontend, the scheduler (which asks again
# on every step a request waits for table rows) and the worker would otherwise each
# re-validate the same JSON. Parsed steerings are frozen, so sharing one is safe.
_parsed: cachetools.LRUCache[str, EngineSteering] = cachetools.LRUCache(4096)
_parsed_lock = threading.Lock()  # the scheduler's and the frontend's threads share it


def steering_text(steering: EngineSteering) -> str:
    """The wire text of ``steering``; this process will not parse that text again."""
    text = steering.model_dump_json(exclude_defaults=True)
    with _parsed_lock:
        _parsed[text] = steering
    return text


def steering_of(extra_args: dict | None) -> EngineSteering | None:
    """The request's steering, or None when it has none."""
    if not extra_args or extra_args.get(STEERING_KEY) is None:
        return None
    raw = extra_args[STEERING_KEY]
    if not isinstance(raw, str):
        return _decode(raw, EngineSteering, STEERING_KEY)
    with _parsed_lock:
        steering = _parsed.get(raw)
    if steering is None:
        steering = _decode(raw, EngineSteering, STEERING_KEY)
        with _parsed_lock:
            _parsed[raw] = steering
    return steering


def capture_of(extra_args: dict | None) -> CaptureRequest | None:
    if not extra_args or extra_args.get(CAPTURE_KEY) is None:
        return None
    return _decode(extra_args[CAPTURE_KEY], CaptureRequest, CAPTURE_KEY)
