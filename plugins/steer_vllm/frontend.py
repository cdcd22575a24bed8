"""Frontend side (the process that accepts requests): validate each request's steering
against the served model and the store, and salt its prefix-cache key.

Checking here means a bad payload fails only its own request, with a message naming
the field, before it reaches the engine that every other request shares.
"""
from __future__ import annotations

import functools
import hashlib
import uuid

import torch
from vllm.exceptions import VLLMNotFoundError

from steer_vllm.spec import EngineSteering, SteeringSpecError, capture_of, steering_of
from steer_vllm.vector_cache import VectorCache
from vector_store import VectorNotFound


class UnknownVector(VLLMNotFoundError, ValueError):
    """Answered 404 by the OpenAI server."""


def steering_salt(steering: EngineSteering, client_salt: str | None) -> str:
    """Prefix-cache salt: KV computed under one steering is never reused under another."""
    digest = hashlib.sha256(steering.canonical_json().encode()).hexdigest()[:32]
    return f"steer-{digest}" + (f"|{client_salt}" if client_salt else "")


class SteeringValidator:
    def __init__(self, model_config, vectors: VectorCache | None = None):
        self.num_layers = model_config.hf_text_config.num_hidden_layers
        self.hidden_size = model_config.get_hidden_size()
        self.model_dir = model_config.model
        self.dtype_max = torch.finfo(model_config.dtype).max
        self.vectors = vectors or VectorCache()
        self._fingerprint: str | None = None
        self._finite: dict[str, bool] = {}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from vector_store.keys import model_fingerprint

            self._fingerprint = model_fingerprint(self.model_dir)
        return self._fingerprint

    def check(self, steering: EngineSteering, prompt_len: int) -> None:
        for i, addition in enumerate(steering.additions):
            where = f"steering.additions[{i}]"
            if addition.layer > self.num_layers:
                raise SteeringSpecError(f"{where}.layer: {addition.layer} is outside 0..{self.num_layers} for this model")
            try:
                vector = self.vectors.get(addition.vector)
            except VectorNotFound:
                raise UnknownVector(f"{where}.vector: unknown vector id {addition.vector!r}") from None
            if vector.meta.hidden_size != self.hidden_size:
                raise SteeringSpecError(
                    f"{where}.vector: hidden size {vector.meta.hidden_size} does not match the served model's {self.hidden_size}"
                )
            if vector.meta.model_fingerprint != self.fingerprint:
                raise SteeringSpecError(
                    f"{where}.vector: made for model {vector.meta.model_fingerprint}, not the served {self.fingerprint}"
                )
            direction = vector.directions.get(addition.direction_layer)
            if direction is None:
                raise SteeringSpecError(
                    f"{where}.source_layer: vector {addition.vector} has no direction for layer "
                    f"{addition.direction_layer} (it has {vector.layers})"
                )
            if not self._is_finite(addition.vector, vector):
                raise SteeringSpecError(f"{where}.vector: {addition.vector} holds NaN or infinite values")
            if addition.mode == "actadd" and direction.shape[0] > prompt_len:
                raise SteeringSpecError(
                    f"{where}: the actadd sequence has {direction.shape[0]} positions but the prompt has only {prompt_len} tokens"
                )
            if addition.mode == "constant" and direction.shape[0] != 1:
                raise SteeringSpecError(
                    f"{where}.mode: constant mode needs a single vector, {addition.vector} is a sequence of {direction.shape[0]}"
                )
            if abs(addition.coeff) * float(direction.abs().max()) > self.dtype_max:
                raise SteeringSpecError(f"{where}.coeff: {addition.coeff} times this vector overflows the model's dtype")

    def _is_finite(self, content_id: str, vector) -> bool:
        if content_id not in self._finite:
            self._finite[content_id] = all(bool(torch.isfinite(t).all()) for t in vector.directions.values())
        return self._finite[content_id]

    def prepare(self, request) -> None:
        """Validate an ``EngineCoreRequest`` in place and set its cache salt."""
        extra_args = request.sampling_params.extra_args
        steering = steering_of(extra_args)
        if steering is not None:
            self.check(steering, len(request.prompt_token_ids or ()))
            request.cache_salt = steering_salt(steering, request.cache_salt)
        if capture_of(extra_args) is not None:
            # Never served from or stored for other requests' prefix cache.
            request.cache_salt = f"steer-capture-{uuid.uuid4().hex}"


def _process_inputs(original):
    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        params = request.sampling_params
        if params is not None and params.extra_args:
            validator = getattr(self, "_steer_validator", None)
            if validator is None:
                validator = self._steer_validator = SteeringValidator(self.vllm_config.model_config)
            validator.prepare(request)
        return request

    process_inputs._steer_hook = True
    return process_inputs


def install_frontend_hooks() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if not getattr(InputProcessor.process_inputs, "_steer_hook", False):
        InputProcessor.process_inputs = _process_inputs(InputProcessor.process_inputs)
