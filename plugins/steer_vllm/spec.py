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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from vllm.exceptions import VLLMValidationError

STEERING_KEY = "steering"
CAPTURE_KEY = "steering_capture"
MAX_ADDITIONS = 64


class SteeringSpecError(VLLMValidationError, ValueError):
    """A steering payload the engine cannot apply; the message names the field.

    A vLLM client error, so the OpenAI server answers 400 with this message."""

    __str__ = Exception.__str__  # the message already names the field


class EngineAddition(BaseModel):
    """One stored direction, scaled, added at one layer.

    ``layer`` is the residual stream entering decoder block ``layer`` (0 = embeddings,
    num_layers = after the last block). ``source_layer`` picks which of the stored
    vector's layers to use (default: ``layer``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vector: str = Field(min_length=1)
    layer: int = Field(ge=0)
    source_layer: int | None = Field(default=None, ge=0)
    coeff: float
    mode: Literal["actadd", "constant"] = "actadd"
    positions: Literal["all", "prompt", "generated"] = "all"

    @field_validator("coeff")
    @classmethod
    def _finite(cls, coeff: float) -> float:
        if not math.isfinite(coeff):
            raise ValueError("coeff must be a finite number")
        return coeff

    @property
    def direction_layer(self) -> int:
        return self.layer if self.source_layer is None else self.source_layer


class EngineSteering(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    additions: list[EngineAddition] = Field(min_length=1, max_length=MAX_ADDITIONS)

    def canonical_json(self) -> str:
        """Order-independent text of the steering, for cache salts and logs."""
        rows = sorted(a.model_dump_json() for a in self.additions)
        return "[" + ",".join(rows) + "]"


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
        where = ".".join([key, *(str(p) for p in error["loc"])])
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def steering_of(extra_args: dict | None) -> EngineSteering | None:
    """The request's steering, or None when it has none."""
    if not extra_args or extra_args.get(STEERING_KEY) is None:
        return None
    return _decode(extra_args[STEERING_KEY], EngineSteering, STEERING_KEY)


def capture_of(extra_args: dict | None) -> CaptureRequest | None:
    if not extra_args or extra_args.get(CAPTURE_KEY) is None:
        return None
    return _decode(extra_args[CAPTURE_KEY], CaptureRequest, CAPTURE_KEY)
