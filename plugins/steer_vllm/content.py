"""Vector content that travels inside a request, so no engine process reads the store.

The frontend (the process that accepts requests) validates a request's steering against
the store and then attaches, under ``extra_args["steering_vectors"]``, the float32 bytes
of every (content id, source layer) the steering uses. The scheduler counts table rows
from their lengths and the workers copy them into the table: the engine step never
waits on the store, a store fault can only fail a request before it is submitted, and
since content ids are immutable a vector deleted or renamed after validation cannot
change what a queued or running request adds.

Shipping bytes with each request (rather than pushing them to worker caches by RPC)
keeps every engine process stateless with respect to the store: nothing to keep
coherent, nothing to evict too early, the same bytes on every tensor-parallel rank.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from steer_vllm.spec import STEERING_KEY, EngineAddition, EngineSteering, SteeringSpecError

VECTORS_KEY = "steering_vectors"


def content_key(addition: EngineAddition) -> str:
    return f"{addition.vector}@{addition.direction_layer}"


def attach_vectors(
    extra_args: dict,
    steering: EngineSteering,
    direction_of: Callable[[EngineAddition], torch.Tensor],
) -> None:
    """Put the float32 rows of every direction ``steering`` uses into ``extra_args``
    (replacing whatever a client may have put there)."""
    extra_args[VECTORS_KEY] = {
        content_key(a): direction_of(a).to(torch.float32).contiguous().numpy().tobytes() for a in steering.additions
    }


class ShippedVectors:
    """The directions a request carries, checked against the model's hidden size."""

    def __init__(self, extra_args: dict, steering: EngineSteering, hidden_size: int):
        raw = extra_args.get(VECTORS_KEY)
        if not isinstance(raw, dict):
            raise SteeringSpecError(f"{STEERING_KEY}: the request carries no vector content (it did not pass the frontend)")
        row_bytes = 4 * hidden_size
        self._data: dict[str, bytes] = {}
        for addition in steering.additions:
            key = content_key(addition)
            data = raw.get(key)
            if not isinstance(data, (bytes, bytearray)) or not data or len(data) % row_bytes:
                raise SteeringSpecError(f"{STEERING_KEY}: the content of {key} is missing or not [k, {hidden_size}] float32")
            self._data[key] = bytes(data)
        self._hidden_size = hidden_size
        self._row_bytes = row_bytes

    def length(self, addition: EngineAddition) -> int:
        return len(self._data[content_key(addition)]) // self._row_bytes

    def direction(self, addition: EngineAddition) -> torch.Tensor:
        """float32 ``[k, hidden]``."""
        data = bytearray(self._data[content_key(addition)])  # writable: torch.frombuffer shares it
        return torch.frombuffer(data, dtype=torch.float32).reshape(-1, self._hidden_size)
