"""Frontend side (the process that accepts requests): every request passes through
vLLM's ``InputProcessor.process_inputs`` on its way to the engine, whatever HTTP
entrypoint (or offline API) it came from. There each request's steering is validated
against the served model, its vectors are attached (``steer_vllm.content``), and its
prefix-cache key is salted; captures are refused unless this process made them.

Checking here means a bad payload fails only its own request, with a message naming
the field, before it reaches the engine that every other request shares.

Vectors come from the process-wide cache (``vector_store.cache``). The HTTP layer reads
them from the store without blocking its event loop and pins them there for the
duration of the request, so for served requests this hook never touches the store; an
offline caller that names vectors directly gets them read from the store here.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import uuid

import torch
from vllm.exceptions import VLLMNotFoundError

from steer_vllm.capture import CAPTURE_TOKEN
from steer_vllm.content import VECTORS_KEY, attach_vectors
from steer_vllm.hooks import patch
from steer_vllm.limits import table_rows_for_config
from steer_vllm.plans import plan_layers
from steer_vllm.settings import EngineSettings, load_engine_settings
from steer_vllm.spec import CAPTURE_KEY, EngineSteering, SteeringSpecError, capture_of, steering_of
from steer_vllm.support import check_request
from vector_store import StoredVector, VectorNotFound, VectorStore, layer_outside
from vector_store.cache import VectorCache, process_cache

# Longest prompt a capture may record (the server captures steering prompts and one
# reference text, both far shorter).
MAX_CAPTURE_TOKENS = 2048


class UnknownVector(VLLMNotFoundError, ValueError):
    """Answered 404 by the OpenAI server."""


def steering_salt(steering: EngineSteering, client_salt: str | None) -> str:
    """Prefix-cache salt: KV computed under one steering is never reused under another."""
    digest = hashlib.sha256(steering.canonical_json().encode()).hexdigest()[:32]
    return f"steer-{digest}" + (f"|{client_salt}" if client_salt else "")


def prompt_length(request) -> int:
    """Tokens in an ``EngineCoreRequest``'s prompt (token ids or prompt embeddings)."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    embeds = getattr(request, "prompt_embeds", None)
    return 0 if embeds is None else int(embeds.shape[0])


class SteeringValidator:
    def __init__(self, vllm_config, settings: EngineSettings, vectors: VectorCache | None = None,
                 store: VectorStore | None = None):
        model_config = vllm_config.model_config
        self.settings = settings
        self.num_layers = model_config.hf_text_config.num_hidden_layers
        self.hidden_size = model_config.get_hidden_size()
        self.model_dir = model_config.model
        self.dtype_max = torch.finfo(model_config.dtype).max
        self.table_capacity = table_rows_for_config(vllm_config, settings) - 1
        self.vectors = vectors or process_cache()
        self._store = store
        self._fingerprint: str | None = None
        self._finite: dict[str, bool] = {}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from vector_store.keys import model_fingerprint

            self._fingerprint = model_fingerprint(self.model_dir, cache_home=self.settings.cache_home)
        return self._fingerprint

    def _vector(self, content_id: str, where: str) -> StoredVector:
        vector = self.vectors.get(content_id)
        if vector is not None:
            return vector
        if self._store is None:
            # Reached only by vectors the API did not pin (offline use): a server's own
            # --store-timeout bounds the read, so a stalled store cannot hold the frontend.
            from vector_store import open_store

            self._store = open_store(self.settings.store_location, timeout_s=self.settings.store_timeout_s)
        try:
            return self.vectors.load(content_id, self._store)
        except VectorNotFound:
            raise UnknownVector(f"{where}.vector: unknown vector id {content_id!r}") from None

    def check(self, steering: EngineSteering, prompt_len: int) -> dict[str, StoredVector]:
        """Validate against the model; returns the vectors by content id."""
        if steering.anchor_to is not None:
            raise SteeringSpecError(
                f"steering.anchor: the server did not check this request against the prompt vLLM rendered "
                f"(anchor_to {steering.anchor_to!r} is still open: steer-server's render hook did not run)"
            )
        vectors: dict[str, StoredVector] = {}
        kinds = [("additions", a) for a in steering.additions] + [("projections", p) for p in steering.projections]
        counters = {"additions": 0, "projections": 0}
        for kind, use in kinds:
            where = f"steering.{kind}[{counters[kind]}]"
            counters[kind] += 1
            outside = layer_outside(use.layer, self.num_layers)
            if outside:
                raise SteeringSpecError(f"{where}.layer: {outside} for this model")
            vector = vectors.get(use.vector) or self._vector(use.vector, where)
            vectors[use.vector] = vector
            direction = self._direction(use, vector, where)
            if kind == "projections":
                if direction.shape[0] != 1 or not float(direction.norm()) > 0:
                    raise SteeringSpecError(f"{where}.vector: {use.op} needs one non-zero direction, not {direction.shape[0]} rows")
                continue
            if use.mode == "actadd" and direction.shape[0] > prompt_len - steering.anchor:
                raise SteeringSpecError(
                    f"{where}: the actadd sequence has {direction.shape[0]} positions but the prompt has only "
                    f"{prompt_len - steering.anchor} tokens from position {steering.anchor}"
                )
            if use.mode == "constant" and direction.shape[0] != 1:
                raise SteeringSpecError(
                    f"{where}.mode: constant mode needs a single vector, {use.vector} is a sequence of {direction.shape[0]}"
                )
            if use.coeff is not None and abs(use.coeff) * float(direction.abs().max()) > self.dtype_max:
                raise SteeringSpecError(f"{where}.coeff: {use.coeff} times this vector overflows the model's dtype")
        if steering.anchor and steering.anchor >= prompt_len:
            raise SteeringSpecError(f"steering.anchor: position {steering.anchor} is past the prompt's {prompt_len} tokens")
        if any(layer_outside(layer, self.num_layers) for layer in steering.preserve_norm):
            raise SteeringSpecError(f"steering.preserve_norm: layers are in 0..{self.num_layers}")
        rows = sum(p.num_rows for p in plan_layers(steering, lambda a: vectors[a.vector].directions[a.direction_layer].shape[0]))
        if rows > self.table_capacity:
            raise SteeringSpecError(
                f"steering.additions: this steering needs {rows} rows of the steering table, which has "
                f"{self.table_capacity} (--steering-table-rows)"
            )
        return vectors

    def _direction(self, use, vector: StoredVector, where: str) -> torch.Tensor:
        if vector.meta.hidden_size != self.hidden_size:
            raise SteeringSpecError(
                f"{where}.vector: hidden size {vector.meta.hidden_size} does not match the served model's {self.hidden_size}"
            )
        if vector.meta.model_fingerprint != self.fingerprint:
            raise SteeringSpecError(
                f"{where}.vector: made for model {vector.meta.model_fingerprint}, not the served {self.fingerprint}"
            )
        direction = vector.directions.get(use.direction_layer)
        if direction is None:
            raise SteeringSpecError(
                f"{where}.source_layer: vector {use.vector} has no direction for layer {use.direction_layer} "
                f"(it has {vector.layers})"
            )
        if not self._is_finite(use.vector, vector):
            raise SteeringSpecError(f"{where}.vector: {use.vector} holds NaN or infinite values")
        return direction

    def _is_finite(self, content_id: str, vector) -> bool:
        if content_id not in self._finite:
            self._finite[content_id] = all(bool(torch.isfinite(t).all()) for t in vector.directions.values())
        return self._finite[content_id]

    def check_capture(self, capture, prompt_len: int) -> None:
        if not hmac.compare_digest(capture.token, CAPTURE_TOKEN):
            raise SteeringSpecError(f"{CAPTURE_KEY}: reserved for the server's own residual captures")
        if any(layer_outside(layer, self.num_layers) for layer in capture.layers) or len(set(capture.layers)) != len(capture.layers):
            raise SteeringSpecError(f"{CAPTURE_KEY}.layers: distinct layers in 0..{self.num_layers}")
        if prompt_len > MAX_CAPTURE_TOKENS:
            raise SteeringSpecError(f"{CAPTURE_KEY}: at most {MAX_CAPTURE_TOKENS} prompt tokens")

    def prepare(self, request) -> None:
        """Validate an ``EngineCoreRequest`` in place, attach its vectors, set its cache salt."""
        extra_args = request.sampling_params.extra_args
        extra_args.pop(VECTORS_KEY, None)  # only this hook attaches vector content
        prompt_len = prompt_length(request)
        capture = capture_of(extra_args)
        if capture is not None:
            self.check_capture(capture, prompt_len)
            # Never served from or stored for other requests' prefix cache.
            request.cache_salt = f"steer-capture-{uuid.uuid4().hex}"
        steering = steering_of(extra_args)
        if steering is not None:
            vectors = self.check(steering, prompt_len)
            attach_vectors(extra_args, steering, lambda a: vectors[a.vector].directions[a.direction_layer])
            if steering.receipt is not None:
                # A receipt counts the prompt positions this request steers: none may come from the cache.
                request.cache_salt = f"steer-receipt-{steering.receipt}"
            elif capture is None:
                request.cache_salt = steering_salt(steering, request.cache_salt)


def _process_inputs(original):
    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        params = request.sampling_params
        if params is not None:
            check_request(params, self.vllm_config.device_config.device_type == "cpu")
        if params is not None and params.extra_args:
            validator = getattr(self, "_steer_validator", None)
            if validator is None:
                validator = self._steer_validator = SteeringValidator(self.vllm_config, load_engine_settings())
            validator.prepare(request)
        return request

    return process_inputs


def install_frontend_hooks() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    patch(InputProcessor, "process_inputs", _process_inputs)
