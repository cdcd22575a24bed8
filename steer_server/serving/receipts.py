"""Steering receipts on the wire: what the engine applied, added to the response.

A request with ``"steering": {..., "receipt": true}`` gets ``"steering_receipt"``: per
steered layer, the operations there, how many prompt and generated tokens were steered,
and the relative dose ``‖Δh‖/‖h‖`` (mean and max) measured on the stream; a layer
steered by doses also lists the doses its additions asked for. Non-streaming responses carry it
beside ``usage``; streams carry it in their last chunk (chat and completions: the chunk
before ``[DONE]``; responses: the ``response`` of ``response.completed``), added where
``steered_routes`` builds the response.
"""
from __future__ import annotations

from steer_vllm.spec import EngineSteering

RECEIPT_FIELD = "steering_receipt"


def receipt_body(engine: EngineSteering, per_point: dict[int, dict], calibrated: list[dict] | None = None) -> dict:
    """``calibrated``: the additions that took their vector's calibrated default (``Resolved.calibrated``)."""
    operations: dict[int, list[str]] = {}
    doses: dict[int, list[float]] = {}
    for addition in engine.additions:
        if addition.strength != 0.0 and "add" not in operations.setdefault(addition.layer, []):
            operations[addition.layer].append("add")
        if addition.dose is not None:
            doses.setdefault(addition.layer, []).append(addition.dose)
    for projection in engine.projections:
        operations.setdefault(projection.layer, []).append(projection.op)
    for layer in set(engine.preserve_norm):
        operations.setdefault(layer, []).append("preserve_norm")
    layers = []
    for layer in sorted(operations):
        stats = per_point.get(layer)
        layers.append({
            "layer": layer,
            "operations": operations[layer],
            "prompt_tokens": stats["prompt_tokens"] if stats else 0,
            "generated_tokens": stats["generated_tokens"] if stats else 0,
            "dose_mean": stats["dose_mean"] if stats else None,
            "dose_max": stats["dose_max"] if stats else None,
            **({"doses_requested": doses[layer]} if layer in doses else {}),
        })
    return {"object": "steering.receipt", "layers": layers, **({"calibrated": calibrated} if calibrated else {})}
