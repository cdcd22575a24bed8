"""The one validator of a steering against the served model.

Pure: it reads an engine steering, the vectors it names and the model's limits, and raises
``SteeringInvalid`` naming the field (relative to the steering object) and the reason.
The frontend hook runs ``validate`` on every request the engine gets, whatever its
entrypoint (``steer_vllm.frontend``). The HTTP layer (``steer_server.serving.steering``) runs
the same checks: single ones while it resolves names and prompts (a layer before a prompt
is captured at it), and ``validate`` on what it resolved, mapping each field back to the
request's own. A request is refused for the same reason whichever way it came in.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cachetools
import torch

from steer_vllm.plans import plan_layers
from steer_vllm.spec import EngineSteering, SteeringSpecError
from vector_store import StoredVector, VectorMeta, layer_outside


@dataclass(frozen=True)
class ModelLimits:
    """What a steering is checked against: the served model and the steering table."""

    num_layers: int
    hidden_size: int
    fingerprint: str
    dtype_max: float  # the largest value the model's dtype holds
    table_capacity: int  # rows of the steering table one request may use (all but its zero row)

    @classmethod
    def of(cls, vllm_config, settings, fingerprint: str) -> ModelLimits:
        """The limits of a vLLM config and the steering settings (``EngineSettings`` or the server's)."""
        from steer_vllm.limits import table_rows_for_config

        model_config = vllm_config.model_config
        return cls(
            num_layers=model_config.hf_text_config.num_hidden_layers,
            hidden_size=model_config.get_hidden_size(),
            fingerprint=fingerprint,
            dtype_max=torch.finfo(model_config.dtype).max,
            table_capacity=table_rows_for_config(vllm_config, settings) - 1,
        )


class SteeringInvalid(SteeringSpecError):
    """``field`` (e.g. ``additions[2].layer``, relative to the steering) cannot be applied: ``reason``."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"steering.{field}: {reason}")


def check_layer(layer: int, limits: ModelLimits, field: str) -> None:
    outside = layer_outside(layer, limits.num_layers)
    if outside:
        raise SteeringInvalid(
            field, f"{outside} (layer L is the stream entering block L; this model has {limits.num_layers} blocks)"
        )


def check_made_for_model(meta: VectorMeta, limits: ModelLimits, field: str, name: str) -> None:
    if meta.model_fingerprint != limits.fingerprint or meta.hidden_size != limits.hidden_size:
        raise SteeringInvalid(
            field,
            f"{name} was made for model {meta.model_fingerprint} (hidden size {meta.hidden_size}), "
            f"not the served {limits.fingerprint} (hidden size {limits.hidden_size})",
        )


def check_projection_direction(direction: torch.Tensor, op: str, field: str) -> None:
    if direction.shape[0] != 1 or not float(direction.norm()) > 0:
        raise SteeringInvalid(field, f"{op} needs one non-zero direction per layer, not {direction.shape[0]} rows")


def check_constant_rows(rows: int, layer: int, field: str, name: str) -> None:
    if rows != 1:
        raise SteeringInvalid(
            field, f"constant mode needs one row per layer; {name} is an ActAdd sequence of {rows} rows at layer {layer}"
        )


def check_actadd_fits(rows: int, prompt_len: int, anchor: int, field: str) -> None:
    """ActAdd rows land on positions anchor..anchor+rows-1: the prompt must reach that far."""
    available = prompt_len - anchor
    if rows > available:
        where = "" if not anchor else f" from its anchor at position {anchor}"
        raise SteeringInvalid(
            field,
            f"the steering sequence has {rows} tokens but the request's prompt has only {available}{where} "
            "(ActAdd adds one row per prompt position, front-aligned)",
        )


# content id -> whether every value is finite (content-addressed, so never stale)
_FINITE: cachetools.LRUCache = cachetools.LRUCache(maxsize=4096)


def is_finite(content_id: str, vector: StoredVector) -> bool:
    if content_id not in _FINITE:
        _FINITE[content_id] = all(bool(torch.isfinite(t).all()) for t in vector.directions.values())
    return _FINITE[content_id]


def _direction(use, vectors: Mapping[str, StoredVector], limits: ModelLimits, field: str) -> torch.Tensor:
    vector = vectors[use.vector]
    check_made_for_model(vector.meta, limits, f"{field}.vector", f"vector {use.vector}")
    direction = vector.directions.get(use.direction_layer)
    if direction is None:
        raise SteeringInvalid(
            f"{field}.source_layer",
            f"vector {use.vector} has no direction for layer {use.direction_layer} (it has {vector.layers})",
        )
    return direction


def validate(steering: EngineSteering, vectors: Mapping[str, StoredVector], limits: ModelLimits,
             prompt_len: int | None = None) -> None:
    """Raises ``SteeringInvalid`` for the first thing in ``steering`` the model cannot take.

    ``vectors`` holds every vector the steering names, by content id. Without ``prompt_len``
    (the HTTP layer, before vLLM renders the prompt) the checks against the prompt wait.
    """
    uses = [("additions", i, a) for i, a in enumerate(steering.additions)]
    uses += [("projections", i, p) for i, p in enumerate(steering.projections)]
    for kind, i, use in uses:
        field = f"{kind}[{i}]"
        check_layer(use.layer, limits, f"{field}.layer")
        direction = _direction(use, vectors, limits, field)
        if not is_finite(use.vector, vectors[use.vector]):
            raise SteeringInvalid(f"{field}.vector", f"vector {use.vector} holds NaN or infinite values")
        if kind == "projections":
            check_projection_direction(direction, use.op, f"{field}.vector")
            continue
        if use.mode == "constant":
            check_constant_rows(direction.shape[0], use.direction_layer, f"{field}.vector", f"vector {use.vector}")
        if use.mode == "actadd" and prompt_len is not None:
            check_actadd_fits(direction.shape[0], prompt_len, steering.anchor, f"{field}.vector")
        if use.coeff is not None and abs(use.coeff) * float(direction.abs().max()) > limits.dtype_max:
            raise SteeringInvalid(f"{field}.coeff", f"{use.coeff} times this vector overflows the model's dtype")
    if prompt_len is not None and steering.anchor and steering.anchor >= prompt_len:
        raise SteeringInvalid("anchor", f"position {steering.anchor} is past the prompt's {prompt_len} tokens")
    for layer in steering.preserve_norm:
        check_layer(layer, limits, "preserve_norm")
    rows = sum(p.num_rows for p in plan_layers(steering, lambda a: vectors[a.vector].directions[a.direction_layer].shape[0]))
    if rows > limits.table_capacity:
        raise SteeringInvalid(
            "additions",
            f"this steering needs {rows} rows of the steering table, which has {limits.table_capacity} (--steering-table-rows)",
        )
