"""The ``steering`` request field: typed, validated, and resolved into the engine's spec.

The field, on /v1/completions, /v1/chat/completions and /v1/responses (openai SDK: ``extra_body``)::

    "steering": {
        "additions": [{"prompt": "Love", "coeff": 5, "layer": 6},
                      {"prompt": "Hate", "coeff": -5, "layer": 6}],
        "mode": "actadd",          # or "constant"
        "positions": "all",        # constant mode's default: "all" | "prompt" | "generated" |
                                   # "after_anchor" | {"start": i, "end": j} (generated tokens i..j-1)
        "pad": " ",                # actadd only: pad text (one token) or null; default: the server's
        "ablate": [{"vector": "refusal", "layers": "all"}],
        "clamp": [{"vector": "formal", "layers": [12], "value": 4.0, "norm": "preserve"}],
        "anchor": "user",          # chat and responses: "user" (default) or "template"
        "receipt": true            # report what was applied in the response
    }

Additions, by mode:

- ``actadd`` (default; ActAdd, Turner et al. 2023): ``{"prompt", "coeff", "layer"}`` — the
  prompt's residual stream entering ``layer``, one row per token, added front-aligned at
  positions anchor..anchor+k-1. The prompts of one layer are right-padded with the pad token
  to the same length k. ``{"vector", "coeff"[, "layer"]}`` adds a vector's rows the same way.
- ``constant`` (one direction per layer added at every position the ``positions`` field
  selects): ``{"vector", "coeff"[, "layer"]}`` (the vector must hold one row per layer) or
  ``{"positive", "negative", "coeff", "layer"}``: the difference of the two prompts'
  last-token streams at ``layer`` (``VectorComputer.constant``). A ``prompt`` addition has no
  single-vector meaning and is refused in constant mode.

Strength: ``coeff`` scales the vector; ``dose`` instead scales it per token so that the
addition moves the stream by that share of its norm (‖Δh‖/‖h‖ = dose), which carries over
between layers, models and vectors. One layer's additions use one or the other. A vector
or pair addition (constant mode), an ablate and a clamp may name their own ``positions``.

A ``vector`` is a stored vector's name or content id, or an inline vector
``{"data": base64, "dtype", "shape", "layer"}``. ``ablate`` and ``clamp`` project the stream
on a vector's unit direction (after that layer's additions). ``"norm": "preserve"`` on any
entry restores each steered token's stream norm at that layer.

Layer L is the residual stream *entering* decoder block L (0 = the embeddings,
num_layers = after the last block). A ``vector`` addition without ``layer`` applies each of
the vector's stored layers at that layer; with ``layer`` it applies the vector's only layer
(or its direction for that layer) at ``layer``.

Anchor (chat and responses): ActAdd row 0 falls on the first token of the last user
message's content in the prompt as vLLM renders it (``steer_server.serving.anchor``);
``"template"`` puts it on the templated prompt's first token. Completions use position 0.

Tokenization: steering prompts use the same rule as the request's prompt would with the
tokenizer defaults (``add_special_tokens=True``; a completions request's own
``add_special_tokens`` is followed), so with a BOS-adding tokenizer position 0 is BOS in
both and cancels when the coefficients sum to 0. SmolLM2 adds no BOS: write
``<|endoftext|>`` at the start of the prompt and of each steering prompt to get one.
"""
from __future__ import annotations

import base64
import binascii
import copy
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

import torch

from steer_vllm.spec import (
    MAX_ADDITIONS,
    POSITION_TAGS,
    EngineAddition,
    EngineProjection,
    EngineSteering,
    FiniteFloat,
    Positions,
    PositiveFinite,
    steering_text,
)
from steer_vllm.validate import (
    ModelLimits,
    SteeringInvalid,
    check_actadd_fits,
    check_constant_rows,
    check_layer,
    check_made_for_model,
    check_projection_direction,
    validate,
)
from vector_store import (
    QuotaExceeded,
    StoredDataDamaged,
    StoredVector,
    StoreUnavailable,
    VectorMeta,
    VectorNotFound,
    VectorStoreError,
)
from vector_store.base import shown


class SteeringError(Exception):
    """A refused request: HTTP status, OpenAI-style error type, the field, the reason.

    ``reason`` is a short machine-readable cause for metrics (``invalid``, ``not_found``,
    ``too_large``, ``quota``, ``store_unavailable``, ``internal``); ``headers`` go with the
    response (``Retry-After``)."""

    def __init__(self, status: int, message: str, param: str | None = None, reason: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.reason = reason or {400: "invalid", 404: "not_found", 413: "too_large", 429: "quota",
                                 503: "store_unavailable"}.get(status, "internal")
        self.headers = headers

    @property
    def error_type(self) -> str:
        return {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                413: "RequestEntityTooLargeError", 429: "RateLimitError",
                503: "ServiceUnavailableError"}.get(self.status, "InternalServerError")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.status}}


def bad_request(param: str, reason: str) -> SteeringError:
    return SteeringError(400, f"{param}: {reason}", param)


def refused(exc: SteeringInvalid, param: str | None = None) -> SteeringError:
    """A 400 for what ``steer_vllm.validate`` refused, at the request's own field ``param``."""
    return bad_request(param or exc.field, exc.reason)


def quota_refusal(exc: QuotaExceeded) -> SteeringError:
    """A 429 naming the tenant's quota and its limit; ``Retry-After`` where waiting frees it."""
    headers = None if exc.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return SteeringError(429, str(exc), None, "quota", headers)


def store_failure(param: str, exc: StoreUnavailable | StoredDataDamaged) -> SteeringError:
    """The store could not give what a request needs: the server's fault, and temporary."""
    return SteeringError(503, f"{param}: {exc}", param, reason="store_unavailable")


# ---------------------------------------------------------------- the typed field


Dose = PositiveFinite  # a relative dose ‖Δh‖/‖h‖: a share of the stream's norm


class FiniteCoeff(BaseModel):
    """A strict wire object with a finite ``coeff`` (shared by the request field and the vector routes)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    coeff: FiniteFloat


Norm = Literal["preserve"]


class InlineVector(BaseModel):
    """A vector carried by the request itself: ``data`` is base64 of the little-endian
    values (``dtype``), ``shape`` is ``[hidden]`` or ``[k, hidden]``, ``layer`` the stream
    it was taken from (its layer when no other is given)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    data: str = Field(min_length=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    shape: list[int] = Field(min_length=1, max_length=2)
    layer: int


VectorRef = Annotated[
    Union[Annotated[str, Field(min_length=1), Tag("name")], Annotated[InlineVector, Tag("inline")]],
    Discriminator(lambda value: "name" if isinstance(value, str) else "inline"),
]


class Strength(BaseModel):
    """How strongly an addition steers: ``coeff`` times the vector, or a relative ``dose``
    (each steered token's stream moves by ``dose`` times its norm)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    coeff: FiniteFloat | None = None
    dose: Dose | None = None


class PromptAddition(Strength):
    """ActAdd: the prompt's per-token residual stream at ``layer``, scaled by ``coeff`` or ``dose``."""

    prompt: str
    layer: int
    norm: Norm | None = None


class VectorAddition(Strength):
    """A stored vector (name or content id) or an inline one, at its own layer(s) unless
    ``layer`` is given."""

    vector: VectorRef
    layer: int | None = None
    norm: Norm | None = None
    positions: Positions | None = None  # constant mode; default: the steering's


class PairAddition(Strength):
    """Constant mode: last-token(positive) - last-token(negative) at ``layer``."""

    positive: str
    negative: str
    layer: int
    norm: Norm | None = None
    positions: Positions | None = None  # default: the steering's


class Ablation(BaseModel):
    """Remove the stream's component along the vector's direction at ``layers``
    ("all", one layer, or a list; default: the vector's own layers), at ``positions``
    (default: every position)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    vector: VectorRef
    layers: Literal["all"] | int | list[int] | None = None
    norm: Norm | None = None
    positions: Positions = "all"


class Clamp(Ablation):
    """Set the stream's component along the vector's direction to ``value``."""

    value: FiniteFloat


def _addition_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        if "vector" in value:
            return "vector"
        if "positive" in value or "negative" in value:
            return "pair"
        if "prompt" in value:
            return "prompt"
    elif isinstance(value, Strength):
        return {PromptAddition: "prompt", VectorAddition: "vector", PairAddition: "pair"}[type(value)]
    return None


ADDITION_SHAPES = '{"prompt", "coeff", "layer"}, {"vector", "coeff"[, "layer"]} or {"positive", "negative", "coeff", "layer"}'

Addition = Annotated[
    Union[
        Annotated[PromptAddition, Tag("prompt")],
        Annotated[VectorAddition, Tag("vector")],
        Annotated[PairAddition, Tag("pair")],
    ],
    Discriminator(_addition_kind, custom_error_type="addition_shape",
                  custom_error_message=f"an addition is an object: {ADDITION_SHAPES}"),
]


class SteeringField(BaseModel):
    """The request's ``steering`` object (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    additions: list[Addition] = Field(default_factory=list)
    ablate: list[Ablation] = Field(default_factory=list)
    clamp: list[Clamp] = Field(default_factory=list)
    mode: Literal["actadd", "constant"] = "actadd"
    positions: Positions | None = None
    pad: str | None = None  # absent: the server's --steering-pad (see `pad_given`)
    anchor: Literal["user", "template"] | None = None  # chat and responses only; default "user"
    receipt: bool = False

    @property
    def pad_given(self) -> bool:
        return "pad" in self.model_fields_set


def parse_steering(raw: Any) -> SteeringField:
    """The client's ``steering`` value -> SteeringField; SteeringError (400) names the field."""
    if not isinstance(raw, dict):
        raise bad_request("steering", f"expected an object with \"additions\", got {type(raw).__name__}")
    try:
        field = SteeringField.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = field_path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "literal_error":
            message += f", got {error['input']!r}"
        elif error["type"] == "extra_forbidden":
            message = f"unknown field (an addition is {ADDITION_SHAPES})" if "additions" in param else "unknown field"
        raise bad_request(param, message) from None
    if not (field.additions or field.ablate or field.clamp):
        missing = "required" if "additions" not in raw else "at least one addition is needed"
        raise bad_request("steering.additions", f"{missing} (or give ablate or clamp)")
    return field


def field_path(loc: tuple, root: str = "steering") -> str:
    parts = list(loc)
    # Inside a tagged union member pydantic puts the tag after the index: drop it; inside
    # the name-or-inline union it names the branch (str / InlineVector): drop that too.
    if len(parts) >= 3 and parts[0] == "additions" and isinstance(parts[1], int):
        del parts[2]
    return dotted_path([p for p in parts if p not in ("name", "inline", *POSITION_TAGS)], root)


def dotted_path(parts, root: str = "") -> str:
    """``("additions", 0, "coeff")`` -> ``additions[0].coeff`` (after ``root`` when one is given)."""
    path = root
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


# ---------------------------------------------------------------- resolution


@dataclass
class Resolved:
    """A request's steering in engine form, plus what the prompt-length check needs."""

    engine: EngineSteering
    mode: str
    actadd_lengths: list[tuple[str, int]] = field(default_factory=list)  # (field, k rows)
    vectors: dict[str, StoredVector] = field(default_factory=dict)  # content id -> what was validated
    calibrated: list[dict] = field(default_factory=list)  # additions that took their vector's calibrated default
    # the request's field each engine addition / projection came from ("steering.additions[i]")
    origins: dict[str, list[str]] = field(default_factory=dict)

    def engine_json(self) -> str:
        return steering_text(self.engine)

    def summary(self) -> str:
        """For logs: ids, coefficients, layers; never tensors or prompt text."""
        parts = []
        for a in self.engine.additions:
            source = "" if a.source_layer in (None, a.layer) else f" from layer {a.source_layer}"
            strength = f"*{a.coeff:+g}" if a.dose is None else f" dose {a.dose:g}"
            parts.append(f"{a.vector}{strength}@{a.layer}{source}")
        for p in self.engine.projections:
            parts.append(f"{p.op}({p.vector}{'=' + format(p.value, 'g') if p.op == 'clamp' else ''})@{p.layer}")
        extra = f" positions={self.engine.additions[0].positions}" if self.mode == "constant" and self.engine.additions else ""
        if self.engine.preserve_norm:
            extra += f" preserve_norm={sorted(set(self.engine.preserve_norm))}"
        if self.engine.anchor:
            extra += f" anchor={self.engine.anchor}"
        return f"mode={self.mode}{extra} [{', '.join(parts)}]"

    def operations(self) -> list[str]:
        """What the request does, for metrics: "add", "ablate", "clamp"."""
        return (["add"] if self.engine.additions else []) + sorted({p.op for p in self.engine.projections})

    @property
    def waits_for_prompt(self) -> bool:
        """ActAdd lengths and "after_anchor" positions need the anchor in the rendered prompt."""
        return bool(self.actadd_lengths) or any(d.positions == "after_anchor" for d in self.engine.directions)

    def check_prompt_length(self, prompt_len: int) -> None:
        """ActAdd rows land on positions anchor..anchor+k-1: the prompt must reach that far."""
        for param, rows in self.actadd_lengths:
            try:
                check_actadd_fits(rows, prompt_len, self.engine.anchor, param)
            except SteeringInvalid as exc:
                raise refused(exc) from None

    def request_field(self, exc: SteeringInvalid) -> str:
        """The request's field an engine-spec field names: engine additions and projections
        map back to the request's entries they came from (a vector addition may make several)."""
        match = re.fullmatch(r"(additions|projections)\[(\d+)\](?:\.(\w+))?", exc.field)
        if match is None:
            return f"steering.{exc.field}"
        kind, index, leaf = match.groups()
        origin = self.origins[kind][int(index)]
        if leaf in ("layer", "source_layer"):
            return origin + (".layers" if kind == "projections" else ".layer")
        return origin if leaf is None else f"{origin}.{leaf}"


def _decode_inline(inline: InlineVector, hidden_size: int, param: str) -> torch.Tensor:
    """float32 ``[k, hidden]`` from the request's base64 bytes."""
    try:
        raw = base64.b64decode(inline.data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}.data", "not valid base64") from None
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[inline.dtype]
    shape = list(inline.shape)
    if any(n <= 0 for n in shape) or shape[-1] != hidden_size:
        raise bad_request(f"{param}.shape", f"expected [hidden] or [k, hidden] with hidden = {hidden_size}, got {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise bad_request(f"{param}.data", f"{len(raw)} bytes, but shape {shape} of {inline.dtype} is {expected} bytes")
    tensor = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(-1, hidden_size).to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise bad_request(f"{param}.data", "holds NaN or infinite values")
    return tensor


_POSITIONS_ACTADD = "only applies to mode 'constant' (actadd adds its rows front-aligned from the anchor)"


def _name(ref) -> str:
    return f"vector {ref!r}" if isinstance(ref, str) else "the inline vector"


def _layers_of(layers, vector: StoredVector, num_layers: int) -> list[int]:
    if layers is None:
        return vector.layers
    if layers == "all":
        return list(range(num_layers + 1))
    return [layers] if isinstance(layers, int) else list(layers)


class SteeringResolver:
    """SteeringField -> engine spec, computing prompt vectors through the store.

    ``tokenize(text, add_special_tokens) -> list[int]``; ``computer`` is a
    ``vector_store.compute.VectorComputer`` over a ``vector_store.async_access.AsyncStore``.
    The server holds one with no tenant; each request uses ``for_tenant(its tenant)``, which
    finds only that tenant's vectors (the store refuses a call without a tenant).
    """

    def __init__(self, *, computer, limits: ModelLimits, tokenize, default_pad_id: int | None, max_additions: int,
                 max_prompt_tokens: int, max_dose: float | None = None):
        self.computer = computer
        self.store = computer.store
        self.model = computer.model
        self.limits = limits
        self.tokenize = tokenize
        self.default_pad_id = default_pad_id
        self.max_additions = max_additions
        self.max_prompt_tokens = max_prompt_tokens
        self.max_dose = max_dose
        self.tenant: str | None = None

    def for_tenant(self, tenant: str) -> SteeringResolver:
        """This resolver, reading, computing and storing vectors as ``tenant``'s (one per request)."""
        scoped = copy.copy(self)
        scoped.tenant = tenant
        return scoped

    # -- helpers
    def pad_token_id(self, pad: str, param: str = "steering.pad") -> int:
        ids = self.tokenize(pad, False)
        if len(ids) != 1:
            raise bad_request(param, f"the pad must be a single token; {pad!r} is {len(ids)} tokens")
        return ids[0]

    def check_layer(self, layer: int, param: str) -> None:
        try:
            check_layer(layer, self.limits, param)
        except SteeringInvalid as exc:
            raise refused(exc) from None

    def prompt_ids(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        ids = self.tokenize(text, add_special_tokens)
        if not ids:
            raise bad_request(param, "the prompt is empty")
        if len(ids) > self.max_prompt_tokens:
            raise bad_request(
                param,
                f"the prompt has {len(ids)} tokens, over this server's limit of {self.max_prompt_tokens} "
                "(--max-steering-prompt-tokens)",
            )
        return ids

    async def vector(self, ref: str | InlineVector, param: str) -> tuple[str, StoredVector]:
        """A stored vector (by name or content id) or an inline one, checked against the model.
        Inline vectors are cached by content like stored ones, never written to the store."""
        if isinstance(ref, InlineVector):
            self.check_layer(ref.layer, f"{param}.layer")
            rows = _decode_inline(ref, self.model.hidden_size, param)
            kind = "constant" if rows.shape[0] == 1 else "actadd"
            meta = VectorMeta(self.model.fingerprint, self.model.hidden_size, kind, "inline")
            vector = StoredVector(meta, {ref.layer: rows})
            content_id = vector.content_id
            self.store.vectors.put(content_id, vector)
            return content_id, vector
        try:
            content_id = await self.store.resolve(ref, tenant=self.tenant)
            vector = await self.store.get(content_id)
        except VectorNotFound:
            raise SteeringError(404, f"{param}: no vector named or with id {shown(ref)}", param) from None
        except (StoreUnavailable, StoredDataDamaged) as exc:
            raise store_failure(param, exc) from None
        try:
            check_made_for_model(vector.meta, self.limits, param, _name(ref))
        except SteeringInvalid as exc:
            raise refused(exc) from None
        return content_id, vector

    @staticmethod
    def source_layer(vector: StoredVector, layer: int, ref, param: str) -> int:
        """Which of the vector's directions to use at ``layer``: its only one, or its own for that layer."""
        if len(vector.layers) == 1:
            return vector.layers[0]
        if layer in vector.directions:
            return layer
        raise bad_request(
            param,
            f"{_name(ref)} has directions for layers {vector.layers}; {layer} is not one of them "
            "(a single-layer vector may be moved to any layer)",
        )

    # -- the work
    async def resolve(self, steering: SteeringField, add_special_tokens: bool = True) -> Resolved:
        mode = steering.mode
        if len(steering.additions) > self.max_additions:
            raise bad_request(
                "steering.additions",
                f"{len(steering.additions)} additions, over this server's limit of {self.max_additions} (--max-additions)",
            )
        if steering.positions is not None and mode != "constant":
            raise bad_request("steering.positions", "only applies to mode 'constant' (actadd adds at positions 0..k-1)")
        positions = steering.positions or "all"
        pad_id = self.default_pad_id
        if steering.pad_given:
            if mode != "actadd":
                raise bad_request("steering.pad", "only applies to mode 'actadd'")
            pad_id = None if steering.pad is None else self.pad_token_id(steering.pad)

        # addition index -> list of (content id or None (prompt, filled below), layer, source_layer, rows)
        planned: list[list[dict]] = []
        prompt_groups: dict[int, list[tuple[int, list[int]]]] = {}  # layer -> [(addition index, ids)]
        vectors: dict[str, StoredVector] = {}
        preserve: set[int] = set()
        for i, addition in enumerate(steering.additions):
            where = f"steering.additions[{i}]"
            self._check_strength(addition, mode, where)
            if isinstance(addition, PromptAddition):
                if mode != "actadd":
                    raise bad_request(
                        f"{where}.prompt",
                        "a prompt addition is an ActAdd sequence; constant mode takes "
                        '{"vector", "coeff"[, "layer"]} or {"positive", "negative", "coeff", "layer"}',
                    )
                self.check_layer(addition.layer, f"{where}.layer")
                ids = self.prompt_ids(addition.prompt, f"{where}.prompt", add_special_tokens)
                prompt_groups.setdefault(addition.layer, []).append((i, ids))
                planned.append([{"layer": addition.layer}])
            elif isinstance(addition, PairAddition):
                if mode != "constant":
                    raise bad_request(
                        where,
                        "a positive/negative pair makes a constant vector; use \"mode\": \"constant\" "
                        '(actadd takes {"prompt", "coeff", "layer"} or {"vector", "coeff"[, "layer"]})',
                    )
                self.check_layer(addition.layer, f"{where}.layer")
                positive = self.prompt_ids(addition.positive, f"{where}.positive", add_special_tokens)
                negative = self.prompt_ids(addition.negative, f"{where}.negative", add_special_tokens)
                planned.append([{"layer": addition.layer, "pair": (positive, negative)}])
            else:
                planned.append(await self._plan_vector(addition, mode, where, vectors, "mode" in steering.model_fields_set))
            if addition.norm == "preserve":
                preserve.update(step["layer"] for step in planned[-1])

        total = sum(len(p) for p in planned)
        if total > MAX_ADDITIONS:
            raise bad_request(
                "steering.additions",
                f"the additions expand to {total} (layer, vector) pairs (a vector addition counts once per layer), "
                f"over the engine's limit of {MAX_ADDITIONS}",
            )
        projections = await self._projections(steering, vectors, preserve)

        # Compute what is not stored yet (cached by the store after the first time).
        try:
            for layer, members in prompt_groups.items():
                content_ids = await self.computer.actadd([ids for _, ids in members], layer, pad_id, tenant=self.tenant)
                length = max(len(ids) for _, ids in members)
                for (i, ids), content_id in zip(members, content_ids):
                    rows = length if pad_id is not None else len(ids)
                    planned[i][0].update(vector=content_id, rows=rows)
            for i, steps in enumerate(planned):
                if "pair" in steps[0]:
                    steps[0]["vector"] = await self.computer.constant([steps[0].pop("pair")], steps[0]["layer"],
                                                                      tenant=self.tenant)
                    steps[0]["rows"] = 1
            for steps in planned:
                for step in steps:
                    if step["vector"] not in vectors:
                        vectors[step["vector"]] = await self.store.get(step["vector"])
        except (StoreUnavailable, StoredDataDamaged) as exc:
            raise store_failure("steering.additions", exc) from None
        except VectorStoreError as exc:  # checked above; a store refusal still names itself
            raise bad_request("steering.additions", str(exc)) from None

        additions, lengths, origins = [], [], []
        strength_of_layer: dict[int, tuple[str, int]] = {}  # layer -> ("coeff" | "dose", addition index)
        calibrated = []
        for i, (addition, steps) in enumerate(zip(steering.additions, planned)):
            for step in steps:
                calibration = step.get("calibration")
                kind = "coeff" if addition.dose is None and calibration is None else "dose"
                step_mode = mode if calibration is None else calibration["mode"]
                own_positions = getattr(addition, "positions", None)
                if calibration is not None:
                    own_positions = own_positions or calibration["positions"]
                    calibrated.append({"addition": i, "vector": addition.vector, "layer": step["layer"],
                                       "dose": calibration["dose"], "positions": own_positions,
                                       "version": calibration.get("version")})
                other, first = strength_of_layer.setdefault(step["layer"], (kind, i))
                if other != kind:
                    raise bad_request(
                        f"steering.additions[{i}].{kind}",
                        f"layer {step['layer']} already has a {other} addition (steering.additions[{first}]); "
                        "one layer's additions use either coeff or dose",
                    )
                additions.append(
                    EngineAddition(
                        vector=step["vector"],
                        layer=step["layer"],
                        source_layer=step.get("source_layer"),
                        coeff=addition.coeff,
                        dose=addition.dose if calibration is None else calibration["dose"],
                        mode=step_mode,
                        positions=(own_positions or positions) if step_mode == "constant" else "all",
                    )
                )
                origins.append(f"steering.additions[{i}]")
                if step_mode == "actadd":
                    kind = "prompt" if isinstance(addition, PromptAddition) else "vector"
                    lengths.append((f"steering.additions[{i}].{kind}", step["rows"]))
        engine = EngineSteering(
            additions=additions,
            projections=[projection for projection, _ in projections],
            preserve_norm=sorted(preserve),
            receipt=uuid.uuid4().hex if steering.receipt else None,
        )
        resolved = Resolved(engine, mode, lengths, vectors, calibrated,
                            {"additions": origins, "projections": [where for _, where in projections]})
        try:  # what the engine's frontend will check, but for the prompt vLLM has not rendered yet
            validate(engine, vectors, self.limits)
        except SteeringInvalid as exc:
            raise refused(exc, resolved.request_field(exc)) from None
        return resolved

    def _check_strength(self, addition, mode: str, where: str) -> None:
        if addition.coeff is not None and addition.dose is not None:
            raise bad_request(f"{where}.coeff", "give coeff or dose (got both)")
        if addition.coeff is None and addition.dose is None and not (
                isinstance(addition, VectorAddition) and isinstance(addition.vector, str)):
            raise bad_request(f"{where}.coeff", "give coeff or dose (got neither; only a stored vector "
                                                "has a calibrated default)")
        if addition.dose is not None and self.max_dose is not None and addition.dose > self.max_dose:
            raise bad_request(f"{where}.dose", f"{addition.dose} is over this server's limit of {self.max_dose} (--max-dose)")
        calibrated = addition.coeff is None and addition.dose is None  # its mode comes with its calibration
        if getattr(addition, "positions", None) is not None and mode != "constant" and not calibrated:
            raise bad_request(f"{where}.positions", _POSITIONS_ACTADD)

    async def _calibration(self, addition: VectorAddition, content_id: str, mode_given: bool, mode: str,
                           where: str) -> dict | None:
        """The stored default of a vector addition that gives no coeff or dose."""
        if addition.coeff is not None or addition.dose is not None:
            return None
        try:
            calibration = await self.store.calibration(content_id, tenant=self.tenant)
        except (StoreUnavailable, StoredDataDamaged) as exc:
            raise store_failure(f"{where}.vector", exc) from None
        if calibration is None:
            raise bad_request(f"{where}.coeff", f"give coeff or dose (got neither; vector {addition.vector!r} has no "
                                                f"calibrated default: POST /v1/steering/vectors/{addition.vector}/calibrate)")
        if mode_given and calibration["mode"] != mode:
            raise bad_request(f"{where}.vector", f"vector {addition.vector!r} is calibrated for mode "
                                                 f"{calibration['mode']!r}, but the steering's mode is {mode!r}")
        if calibration["mode"] != "constant" and addition.positions is not None:
            raise bad_request(f"{where}.positions", _POSITIONS_ACTADD)
        if self.max_dose is not None and calibration["dose"] > self.max_dose:
            raise bad_request(f"{where}.vector", f"vector {addition.vector!r} is calibrated at dose {calibration['dose']}, "
                                                 f"over this server's limit of {self.max_dose} (--max-dose)")
        return calibration

    async def _plan_vector(self, addition: VectorAddition, mode: str, where: str, vectors: dict,
                           mode_given: bool = True) -> list[dict]:
        content_id, vector = await self.vector(addition.vector, f"{where}.vector")
        vectors[content_id] = vector
        calibration = await self._calibration(addition, content_id, mode_given, mode, where)
        if calibration is not None:
            mode = calibration["mode"]
            if addition.layer is None:
                addition = addition.model_copy(update={"layer": calibration["layer"]})
        if addition.layer is None:
            steps = [{"vector": content_id, "layer": layer, "rows": vector.directions[layer].shape[0]} for layer in vector.layers]
            for step in steps:
                self.check_layer(step["layer"], f"{where}.vector")
        else:
            self.check_layer(addition.layer, f"{where}.layer")
            source = self.source_layer(vector, addition.layer, addition.vector, f"{where}.layer")
            steps = [{"vector": content_id, "layer": addition.layer, "source_layer": source,
                      "rows": vector.directions[source].shape[0]}]
        if mode == "constant":
            for step in steps:
                try:
                    check_constant_rows(step["rows"], step.get("source_layer", step["layer"]), f"{where}.vector",
                                        _name(addition.vector))
                except SteeringInvalid as exc:
                    raise refused(exc) from None
        if calibration is not None:
            for step in steps:
                step["calibration"] = calibration
        return steps

    async def _projections(self, steering: SteeringField, vectors: dict,
                           preserve: set[int]) -> list[tuple[EngineProjection, str]]:
        """Ablations and clamps -> one engine projection per (entry, layer), with the entry's
        field; one per layer."""
        projections: dict[int, tuple[EngineProjection, str]] = {}
        entries = [("ablate", i, e) for i, e in enumerate(steering.ablate)] + [("clamp", i, e) for i, e in enumerate(steering.clamp)]
        for op, i, entry in entries:
            where = f"steering.{op}[{i}]"
            content_id, vector = await self.vector(entry.vector, f"{where}.vector")
            vectors[content_id] = vector
            for layer in _layers_of(entry.layers, vector, self.model.num_layers):
                self.check_layer(layer, f"{where}.layers")
                source = self.source_layer(vector, layer, entry.vector, f"{where}.layers")
                try:
                    check_projection_direction(vector.directions[source], op, f"{where}.vector")
                except SteeringInvalid as exc:
                    raise refused(exc) from None
                if layer in projections:
                    raise bad_request(f"{where}.layers", f"layer {layer} already has an ablate or clamp; one per layer")
                projections[layer] = (EngineProjection(vector=content_id, layer=layer, source_layer=source, op=op,
                                                       value=getattr(entry, "value", 0.0), positions=entry.positions),
                                      where)
                if entry.norm == "preserve":
                    preserve.add(layer)
        if len(projections) > MAX_ADDITIONS:
            raise bad_request("steering.ablate", f"{len(projections)} projected layers, over the engine's limit of {MAX_ADDITIONS}")
        return [projections[layer] for layer in sorted(projections)]
