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

from vllm.exceptions import VLLMNotFoundError

from steer_vllm.capture import CAPTURE_TOKEN
from steer_vllm.content import VECTORS_KEY, attach_vectors
from steer_vllm.hooks import patch
from steer_vllm.settings import EngineSettings, load_engine_settings
from steer_vllm.spec import CAPTURE_KEY, EngineSteering, SteeringSpecError, capture_of, steering_of
from steer_vllm.support import check_request
from steer_vllm.validate import ModelLimits, validate
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
    """Attaches each request's vectors and checks its steering (``steer_vllm.validate``)."""

    def __init__(self, vllm_config, settings: EngineSettings, vectors: VectorCache | None = None,
                 store: VectorStore | None = None):
        self.vllm_config = vllm_config
        self.settings = settings
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self.vectors = vectors or process_cache()
        self._store = store
        self._limits: ModelLimits | None = None

    @property
    def limits(self) -> ModelLimits:
        if self._limits is None:  # on the first steered request: the fingerprint reads the model's files
            from vector_store.keys import model_fingerprint

            fingerprint = model_fingerprint(self.vllm_config.model_config.model, cache_home=self.settings.cache_home)
            self._limits = ModelLimits.of(self.vllm_config, self.settings, fingerprint)
        return self._limits

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
        uses = [("additions", i, a) for i, a in enumerate(steering.additions)]
        uses += [("projections", i, p) for i, p in enumerate(steering.projections)]
        for kind, i, use in uses:
            if use.vector not in vectors:
                vectors[use.vector] = self._vector(use.vector, f"steering.{kind}[{i}]")
        validate(steering, vectors, self.limits, prompt_len)
        return vectors

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
