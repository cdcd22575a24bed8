"""steer_api: the vLLM endpoint plugin that puts steering on vLLM's OpenAI server.

Loaded by vLLM's API server process through the ``vllm.endpoint_plugins`` entry point
``steer_api`` (only when ``VLLM_PLUGINS`` names it; ``steer-server serve`` does that).

One request, in order:

1. ``BodyMiddleware`` (pure ASGI, in front of vLLM's handlers) buffers the body, refusing
   one over ``--max-body-bytes`` with 413.
2. On POST /v1/completions and /v1/chat/completions it pops the ``steering`` field,
   validates it (``steering.SteeringField``), resolves it (``steering.SteeringResolver``:
   names -> content ids; prompts -> stored ActAdd vectors, computed once through the
   engine's residual capture and cached by the store), renders the prompt the way vLLM
   will (chat template included) to check ActAdd lengths before any response starts,
   and re-injects the result as ``vllm_xargs.steering`` (a JSON string of
   ``steer_vllm.spec.EngineSteering``).
3. vLLM's own handler runs unchanged; ``SamplingParams.extra_args["steering"]`` carries
   the spec; the engine plugin's frontend hook validates it again, salts the prefix
   cache, and the workers add the vectors.

Vector routes (``/v1/steering/vectors``) live on the same app, so vLLM's ``--api-key``
middleware guards them (it guards every path under ``/v1``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import time
import uuid
from argparse import Namespace

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steer_server import metrics
from steer_server.settings import Settings
from steer_server.steering import (
    FiniteCoeff,
    SteeringError,
    SteeringField,
    SteeringResolver,
    bad_request,
    field_path,
    parse_steering,
)
from steer_vllm.spec import CAPTURE_KEY, STEERING_KEY, SteeringSpecError
from vector_store import StoredVector, VectorMeta, VectorNotFound, VectorStoreError

logger = logging.getLogger("vllm.steer_server")  # under "vllm": printed with vLLM's log handler

STEERED_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
VECTORS_PREFIX = "/v1/steering/vectors"
# Captured once per server to give "a typical token's norm" at each layer.
REFERENCE_TEXT = (
    "The museum opens at nine in the morning and closes at six. Visitors can walk through rooms of "
    "old maps, ship models and paintings of the harbour, and a small cafe on the ground floor serves "
    "coffee, soup and sandwiches. Guided tours start every hour from the main hall."
)


# ------------------------------------------------------------------------ plugin


class SteerApiPlugin:
    """The ``vllm.endpoint_plugins`` entry point (``steer_api``)."""

    name = "steer_api"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.server: SteerServer | None = None

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(vector_router(self))
        app.add_middleware(BodyMiddleware, plugin=self)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:
            logger.warning("steer_api: no engine (render-only server); steering is unavailable")
            return
        self.server = await SteerServer.start(engine_client, state, self.settings)


class _CountingStore:
    """The store, with computation-cache lookups counted for /metrics."""

    def __init__(self, store):
        self._store = store

    def cached_computation(self, key: str):
        content_id = self._store.cached_computation(key)
        (metrics.VECTOR_CACHE_HITS if content_id is not None else metrics.VECTOR_CACHE_MISSES).inc()
        return content_id

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class SteerServer:
    """Everything the routes need once the engine is up: model, tokenizer, store, computer."""

    def __init__(self, *, engine_client, state, settings: Settings, store, computer, vectors, tokenizer,
                 model_dir: str, model_type: str, default_pad_id: int | None):
        self.engine_client = engine_client
        self.state = state
        self.settings = settings
        self.store = store
        self.computer = computer
        self.model = computer.model
        self.vectors = vectors
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.model_type = model_type
        self.resolver = SteeringResolver(
            computer=computer,
            vectors=vectors,
            tokenize=self.tokenize,
            default_pad_id=default_pad_id,
            max_additions=settings.max_additions,
            max_prompt_tokens=settings.max_prompt_tokens,
        )
        self._typical_norms: dict[int, float] | None = None
        self._typical_lock = asyncio.Lock()

    @classmethod
    async def start(cls, engine_client, state, settings: Settings) -> "SteerServer":
        from steer_vllm import SteeringNotInstalled, check_engine_async
        from steer_vllm.capture import capture_residuals_async
        from steer_vllm.vector_cache import VectorCache
        from vector_store import open_store
        from vector_store.compute import ModelInfo, VectorComputer
        from vector_store.keys import model_fingerprint

        try:
            statuses = await check_engine_async(engine_client)
        except SteeringNotInstalled as exc:
            raise RuntimeError(f"steer-server cannot start: {exc}") from None
        logger.info("steer_api: steering installed in %d worker(s): %s", len(statuses), statuses)

        model_config = engine_client.model_config
        model_dir = model_config.model
        try:
            fingerprint = model_fingerprint(model_dir)
        except VectorStoreError as exc:
            raise RuntimeError(
                f"steer-server cannot start: the model must be a local Hugging Face directory ({exc})"
            ) from None
        model = ModelInfo(
            fingerprint=fingerprint,
            hidden_size=model_config.get_hidden_size(),
            num_layers=model_config.hf_text_config.num_hidden_layers,
        )
        store = open_store()  # $STEER_STORE, set by `steer-server serve --store`
        tokenizer = engine_client.get_tokenizer()
        if inspect.isawaitable(tokenizer):
            tokenizer = await tokenizer

        async def capture(token_id_lists: list[list[int]], layers: list[int]):
            started = time.perf_counter()
            try:
                return await capture_residuals_async(engine_client, token_id_lists, layers)
            finally:
                metrics.CAPTURE_SECONDS.observe(time.perf_counter() - started)

        counting = _CountingStore(store)
        computer = VectorComputer(counting, capture, model, max_prompt_tokens=settings.max_prompt_tokens)
        server = cls(
            engine_client=engine_client,
            state=state,
            settings=settings,
            store=counting,
            computer=computer,
            vectors=VectorCache(store),
            tokenizer=tokenizer,
            model_dir=model_dir,
            model_type=getattr(model_config.hf_config, "model_type", None) or "unknown",
            default_pad_id=None,
        )
        if settings.pad is not None:
            try:
                server.resolver.default_pad_id = server.resolver.pad_token_id(settings.pad)
            except SteeringError as exc:
                raise RuntimeError(f"steer-server cannot start: --steering-pad {exc.message}") from None
        logger.info(
            "steer_api: model %s (%d layers, hidden %d), store %r, pad %r (token %s), max %d additions, "
            "steering prompts up to %d tokens, bodies up to %d bytes",
            fingerprint, model.num_layers, model.hidden_size, store, settings.pad, server.resolver.default_pad_id,
            settings.max_additions, settings.max_prompt_tokens, settings.max_body_bytes,
        )
        return server

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def typical_norms(self) -> dict[int, float]:
        """Median L2 norm of a token's residual stream entering each layer, over a fixed
        English reference text (position 0 left out: its norm is an outlier in many models)."""
        async with self._typical_lock:
            if self._typical_norms is None:
                ids = self.tokenize(REFERENCE_TEXT)
                layers = list(range(self.model.num_layers + 1))
                (streams,) = await self.computer._capture([ids], layers)  # noqa: SLF001 (timed capture)
                self._typical_norms = {
                    layer: float(stream[1:].norm(dim=-1).median()) for layer, stream in streams.items()
                }
            return self._typical_norms

    # ---------------------------------------------------------------- requests

    async def rewrite_request(self, path: str, payload: dict, headers) -> dict | None:
        """Resolve ``payload["steering"]`` into ``vllm_xargs.steering``; None when unsteered."""
        xargs = payload.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            return None  # vLLM refuses it itself
        if xargs and CAPTURE_KEY in xargs:
            raise bad_request(f"vllm_xargs.{CAPTURE_KEY}", "reserved for the server's own residual captures")
        if payload.get("steering") is None:
            payload.pop("steering", None)
            return None
        if xargs and STEERING_KEY in xargs:
            raise bad_request("steering", "give either the steering field or vllm_xargs.steering, not both")
        field: SteeringField = parse_steering(payload.pop("steering"))
        add_special_tokens = payload.get("add_special_tokens", True) if path == "/v1/completions" else True
        resolved = await self.resolver.resolve(field, add_special_tokens=bool(add_special_tokens))
        if resolved.actadd_lengths:
            for prompt_len in await self.prompt_lengths(path, payload):
                resolved.check_prompt_length(prompt_len)
        payload["vllm_xargs"] = {**(xargs or {}), STEERING_KEY: resolved.engine_json()}
        if "request_id" not in payload and headers.get("x-request-id") is None:
            payload["request_id"] = uuid.uuid4().hex
        request_id = headers.get("x-request-id") or payload["request_id"]
        metrics.STEERED_REQUESTS.labels(endpoint=STEERED_PATHS[path], mode=resolved.mode).inc()
        logger.info("steered request %s on %s: %s", request_id, path, resolved.summary())
        return payload

    async def prompt_lengths(self, path: str, payload: dict) -> list[int]:
        """Token counts of the prompt(s) exactly as vLLM will render them (chat template
        applied); [] when vLLM would refuse the request anyway (it then says why)."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.renderers.inputs.preprocess import extract_prompt_len

        try:
            if path == "/v1/chat/completions":
                from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

                handler = getattr(self.state, "openai_serving_chat", None)
                if handler is None:
                    return []
                result = await handler.render_chat_request(ChatCompletionRequest.model_validate(payload))
                if isinstance(result, ErrorResponse):
                    return []
                _, engine_inputs = result
            else:
                from vllm.entrypoints.openai.completion.protocol import CompletionRequest

                handler = getattr(self.state, "openai_serving_completion", None)
                if handler is None:
                    return []
                engine_inputs = await handler.render_completion_request(CompletionRequest.model_validate(payload))
                if isinstance(engine_inputs, ErrorResponse):
                    return []
        except Exception as exc:  # noqa: BLE001 - vLLM's handler meets the same problem and answers it
            logger.debug("steer_api: vLLM will refuse this request itself: %s", exc)
            return []
        return [extract_prompt_len(handler.model_config, engine_input) for engine_input in engine_inputs]

    # ---------------------------------------------------------------- vectors

    def lookup(self, name_or_id: str) -> tuple[str, StoredVector]:
        content_id = self.store.resolve(name_or_id)
        return content_id, self.vectors.get(content_id)

    def names_of(self, content_id: str) -> list[str]:
        for cid, _, names in self.store.list():
            if cid == content_id:
                return names
        return []

    async def describe(self, content_id: str, vector: StoredVector, names: list[str], norms: bool = False) -> dict:
        meta = vector.meta
        source = dict(meta.source)
        for key in ("token_ids",):
            if isinstance(source.get(key), list):
                source["text"] = self.tokenizer.decode(source[key])
        if isinstance(source.get("pairs"), list) and source["pairs"] and isinstance(source["pairs"][0], list):
            source["pairs_text"] = [[self.tokenizer.decode(ids) for ids in pair] for pair in source["pairs"]]
        described = {
            "id": content_id,
            "object": "steering.vector",
            "names": names,
            "model": meta.model_fingerprint,
            "served_model": meta.model_fingerprint == self.model.fingerprint,
            "hidden_size": meta.hidden_size,
            "kind": meta.kind,
            "method": meta.method,
            "layers": vector.layers,
            "shape": {str(layer): list(t.shape) for layer, t in sorted(vector.directions.items())},
            "norm": {str(layer): float(t.norm()) for layer, t in sorted(vector.directions.items())},
            "source": source,
            "created": meta.created,
        }
        if norms:
            described["row_norms"] = {
                str(layer): [float(x) for x in t.norm(dim=-1)] for layer, t in sorted(vector.directions.items())
            }
            if meta.model_fingerprint == self.model.fingerprint:
                typical = await self.typical_norms()
                described["typical_token_norm"] = {str(layer): typical.get(layer) for layer in vector.layers}
            else:
                described["typical_token_norm"] = None
        return described

    def save(self, vector: StoredVector, name: str | None) -> str:
        from vector_store.codec import check_name

        if name is not None:
            check_name(name)
        content_id = self.store.put(vector)
        if name is not None:
            self.store.set_name(name, content_id)
        return content_id


# ------------------------------------------------------------------------ middleware


class _TooLarge(Exception):
    pass


class BodyMiddleware:
    """Pure ASGI: caps every request body, and rewrites the ``steering`` field of
    completions and chat requests into ``vllm_xargs`` before vLLM's handlers parse it.

    Added from ``attach_router``, i.e. before vLLM adds its own middlewares, so it runs
    inside them: an ``--api-key`` check comes first."""

    def __init__(self, app, plugin: SteerApiPlugin):
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.plugin.settings.max_body_bytes
        headers = _Headers(scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(scope, receive, send, _too_large(int(declared), limit))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            body = await _read_body(receive, limit)
        except _TooLarge as exc:
            return await _send_error(scope, receive, send, _too_large(exc.args[0], limit, at_least=True))
        if body is None:  # client went away
            return

        path = scope["path"].removeprefix(scope.get("root_path", ""))
        server = self.plugin.server
        if scope["method"] == "POST" and path in STEERED_PATHS and server is not None:
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                payload = None  # vLLM answers malformed JSON itself
            if isinstance(payload, dict):
                try:
                    rewritten = await server.rewrite_request(path, payload, headers)
                except SteeringError as exc:
                    metrics.REJECTED_REQUESTS.labels(status=str(exc.status)).inc()
                    logger.info("refused steering on %s: %s", path, exc.message)
                    return await _send_error(scope, receive, send, exc)
                except SteeringSpecError as exc:
                    metrics.REJECTED_REQUESTS.labels(status="400").inc()
                    return await _send_error(scope, receive, send, SteeringError(400, str(exc)))
                except Exception as exc:  # noqa: BLE001 - a server fault, reported as one
                    logger.exception("steer_api: resolving steering failed")
                    metrics.REJECTED_REQUESTS.labels(status="500").inc()
                    return await _send_error(scope, receive, send, SteeringError(500, f"steering failed: {exc}"))
                if rewritten is not None:
                    body = json.dumps(rewritten).encode()
                    scope = dict(scope)
                    scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                    scope["headers"].append((b"content-length", str(len(body)).encode()))
        elif b'"steering"' in body and not path.startswith(VECTORS_PREFIX) and _has_steering_field(body):
            # vLLM drops unknown fields silently: refuse rather than answer unsteered.
            return await _send_error(scope, receive, send, bad_request(
                "steering", f"not supported on {path}; use /v1/completions or /v1/chat/completions"))
        return await self.app(scope, _replay(body, receive), send)


def _has_steering_field(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and payload.get("steering") is not None


class _Headers:
    def __init__(self, scope):
        self._headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

    def get(self, name: str, default=None):
        return self._headers.get(name.lower(), default)


async def _read_body(receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge(size)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    delivered = False

    async def replay():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then wait for the disconnect, as the server would

    return replay


def _too_large(size: int, limit: int, at_least: bool = False) -> SteeringError:
    amount = f"over {limit}" if at_least else f"{size}"
    return SteeringError(413, f"the request body is {amount} bytes, over this server's limit of {limit} (--max-body-bytes)")


async def _send_error(scope, receive, send, error: SteeringError) -> None:
    await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


# ------------------------------------------------------------------------ vector routes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PromptCoeff(FiniteCoeff):
    prompt: str


class Pair(_Strict):
    positive: str
    negative: str


class ActAddVectorCreate(_Strict):
    """An ActAdd vector: sum of coeff * (padded prompt streams) at ``layer``, ``[k, hidden]``."""

    name: str | None = None
    layer: int
    additions: list[PromptCoeff] = Field(min_length=1)
    pad: str | None = None  # absent: the server's --steering-pad; null: no padding


class ConstantVectorCreate(_Strict):
    """A constant vector: mean over pairs of last-token(positive) - last-token(negative), ``[1, hidden]``."""

    name: str | None = None
    layer: int
    pairs: list[Pair] = Field(min_length=1)


class UploadVectorCreate(_Strict):
    """Given directions: ``{"6": [[hidden floats], ...]}`` (k rows) or ``{"6": [hidden floats]}``."""

    name: str | None = None
    layers: dict[str, list[list[float]] | list[float]] = Field(min_length=1)
    kind: str | None = None  # "actadd" | "constant"; default: constant if every layer has one row


def _validate(model: type[BaseModel], payload: dict):
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = field_path(error["loc"], root="").lstrip(".") or "body"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        raise bad_request(param, message) from None


def vector_router(plugin: SteerApiPlugin) -> APIRouter:
    router = APIRouter()

    def server() -> SteerServer:
        if plugin.server is None:
            raise SteeringError(503, "steering is not initialised on this server")
        return plugin.server

    def errors_as_json(route):
        async def wrapped(*args, **kwargs):
            try:
                return await route(*args, **kwargs)
            except SteeringError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            except VectorNotFound as exc:
                return JSONResponse(SteeringError(404, str(exc)).body(), status_code=404)
            except VectorStoreError as exc:
                return JSONResponse(SteeringError(400, str(exc)).body(), status_code=400)

        wrapped.__signature__ = inspect.signature(route)
        wrapped.__name__ = route.__name__
        wrapped.__doc__ = route.__doc__
        return wrapped

    @router.post(VECTORS_PREFIX, status_code=201)
    @errors_as_json
    async def create_vector(request: Request, name: str | None = None):
        """Create a vector: JSON from contrast prompts (``additions`` or ``pairs``) or given
        directions (``layers``), or a safetensors file (tensors ``layer.N``, ``[k, hidden]``) as
        the raw body with ``?name=``."""
        srv = server()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        if content_type in ("application/octet-stream", "application/x-safetensors", "application/safetensors"):
            vector = _vector_from_safetensors(srv, body)
            content_id = srv.save(vector, name)
        else:
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise bad_request("body", f"not valid JSON ({exc})") from None
            if not isinstance(payload, dict):
                raise bad_request("body", "expected a JSON object")
            if name is not None and "name" not in payload:
                payload["name"] = name
            content_id, name = await _create_from_json(srv, payload)
        content_id, vector = srv.lookup(content_id)
        return JSONResponse(await srv.describe(content_id, vector, srv.names_of(content_id)), status_code=201)

    @router.get(VECTORS_PREFIX)
    @errors_as_json
    async def list_vectors(all: bool = False):  # noqa: A002 - the query parameter's name
        """Named vectors (``?all=true``: also the unnamed ones computed for requests)."""
        srv = server()
        data = []
        for content_id, meta, names in srv.store.list():
            if not names and not all:
                continue
            try:
                vector = srv.vectors.get(content_id)
            except (VectorNotFound, VectorStoreError):
                continue
            data.append({
                "id": content_id,
                "names": names,
                "kind": meta.kind,
                "method": meta.method,
                "model": meta.model_fingerprint,
                "served_model": meta.model_fingerprint == srv.model.fingerprint,
                "layers": vector.layers,
                "shape": {str(layer): list(t.shape) for layer, t in sorted(vector.directions.items())},
                "created": meta.created,
            })
        return {"object": "list", "data": data}

    @router.post(VECTORS_PREFIX + "/import/gguf", status_code=201)
    @errors_as_json
    async def import_gguf_route(request: Request, name: str | None = None):
        """A llama.cpp control vector (the raw file as the body): ``direction.N`` becomes layer N+1."""
        from vector_store.gguf_io import import_gguf

        srv = server()
        body = await request.body()
        if not body:
            raise bad_request("body", "empty; send the GGUF file's bytes")
        vector = import_gguf(body, model_fingerprint=srv.model.fingerprint, hidden_size=srv.model.hidden_size,
                             num_layers=srv.model.num_layers)
        vector = StoredVector(dataclasses.replace(vector.meta, created=time.time()), vector.directions)
        content_id = srv.save(vector, name)
        content_id, vector = srv.lookup(content_id)
        return JSONResponse(await srv.describe(content_id, vector, srv.names_of(content_id)), status_code=201)

    @router.get(VECTORS_PREFIX + "/{name_or_id}")
    @errors_as_json
    async def get_vector(name_or_id: str, norms: bool = False):
        """Metadata; ``?norms=true`` adds each row's L2 norm and a typical token's norm at that layer."""
        srv = server()
        content_id, vector = srv.lookup(name_or_id)
        return await srv.describe(content_id, vector, srv.names_of(content_id), norms=norms)

    @router.delete(VECTORS_PREFIX + "/{name_or_id}")
    @errors_as_json
    async def delete_vector(name_or_id: str):
        """By name: the name goes, and the vector too once no name points at it. By content
        id: the vector and every name pointing at it."""
        srv = server()
        target = srv.store.name_target(name_or_id)
        if target is not None:
            srv.store.delete_name(name_or_id)
            remaining = srv.names_of(target)
            deleted = None
            if not remaining:
                srv.store.delete(target)
                deleted = target
            return {"object": "steering.vector.deleted", "names_removed": [name_or_id], "deleted": deleted}
        content_id = srv.store.resolve(name_or_id)
        names = srv.names_of(content_id)
        srv.store.delete(content_id)
        return {"object": "steering.vector.deleted", "names_removed": names, "deleted": content_id}

    @router.get(VECTORS_PREFIX + "/{name_or_id}/gguf")
    @errors_as_json
    async def export_gguf_route(name_or_id: str):
        """The vector as a llama.cpp control vector file (constant vectors, layers 2..num_layers)."""
        import io

        from vector_store.gguf_io import export_gguf

        srv = server()
        content_id, vector = srv.lookup(name_or_id)
        out = io.BytesIO()
        export_gguf(vector, out, srv.model_type, num_layers=srv.model.num_layers)
        filename = name_or_id if not name_or_id.startswith("v-") else content_id
        return Response(
            out.getvalue(),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{filename}.gguf"'},
        )

    return router


async def _create_from_json(srv: SteerServer, payload: dict) -> tuple[str, str | None]:
    resolver = srv.resolver
    if "additions" in payload:
        spec = _validate(ActAddVectorCreate, payload)
        resolver.check_layer(spec.layer, "layer")
        pad_id = resolver.default_pad_id
        if "pad" in spec.model_fields_set:
            pad_id = None if spec.pad is None else resolver.pad_token_id(spec.pad, "pad")
        prompts = [resolver.prompt_ids(a.prompt, f"additions[{i}].prompt", True) for i, a in enumerate(spec.additions)]
        content_ids = await srv.computer.actadd(prompts, spec.layer, pad_id)
        source = {
            "layer": spec.layer,
            "prompts": [a.prompt for a in spec.additions],
            "coeffs": [a.coeff for a in spec.additions],
            "pad_token_id": pad_id,
            "parts": content_ids,
        }
        content_id = srv.computer.combine(list(zip(content_ids, [a.coeff for a in spec.additions])), source)
    elif "pairs" in payload:
        spec = _validate(ConstantVectorCreate, payload)
        resolver.check_layer(spec.layer, "layer")
        pairs = [
            (resolver.prompt_ids(p.positive, f"pairs[{i}].positive", True),
             resolver.prompt_ids(p.negative, f"pairs[{i}].negative", True))
            for i, p in enumerate(spec.pairs)
        ]
        content_id = await srv.computer.constant(pairs, spec.layer)
    elif "layers" in payload:
        spec = _validate(UploadVectorCreate, payload)
        directions = {}
        for key, rows in spec.layers.items():
            if not key.isdigit():
                raise bad_request(f"layers.{key}", "layer keys are decimal integers")
            layer = int(key)
            resolver.check_layer(layer, f"layers.{key}")
            tensor = torch.tensor(rows, dtype=torch.float32)
            directions[layer] = _checked_rows(srv, tensor, f"layers.{key}")
        vector = StoredVector(_upload_meta(srv, directions, spec.kind, "upload"), directions)
        return srv.save(vector, spec.name), spec.name
    else:
        raise bad_request("body", 'expected "additions" (actadd), "pairs" (constant) or "layers" (upload)')
    if spec.name is not None:
        from vector_store.codec import check_name

        check_name(spec.name)
        srv.store.set_name(spec.name, content_id)
    return content_id, spec.name


def _checked_rows(srv: SteerServer, tensor: torch.Tensor, param: str) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise bad_request(param, f"expected [k, hidden] or [hidden], got shape {list(tensor.shape)}")
    if tensor.shape[1] != srv.model.hidden_size:
        raise bad_request(param, f"rows have {tensor.shape[1]} values, the served model's hidden size is {srv.model.hidden_size}")
    if not bool(torch.isfinite(tensor).all()):
        raise bad_request(param, "holds NaN or infinite values")
    return tensor.contiguous()


def _upload_meta(srv: SteerServer, directions: dict[int, torch.Tensor], kind: str | None, method: str) -> VectorMeta:
    single = all(t.shape[0] == 1 for t in directions.values())
    if kind is None:
        kind = "constant" if single else "actadd"
    if kind not in ("actadd", "constant"):
        raise bad_request("kind", f"expected 'actadd' or 'constant', got {kind!r}")
    if kind == "constant" and not single:
        raise bad_request("kind", "a constant vector has one row per layer")
    return VectorMeta(srv.model.fingerprint, srv.model.hidden_size, kind, method, {}, time.time())


def _vector_from_safetensors(srv: SteerServer, body: bytes) -> StoredVector:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(body)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise bad_request("body", f"not a readable safetensors file ({exc})") from None
    if not tensors:
        raise bad_request("body", "the safetensors file holds no tensors")
    directions = {}
    for key, tensor in tensors.items():
        if not (key.startswith("layer.") and key[6:].isdigit()):
            raise bad_request(f"body[{key!r}]", "tensors are named layer.N (N = the layer whose entering stream they steer)")
        layer = int(key[6:])
        srv.resolver.check_layer(layer, f"body[{key!r}]")
        directions[layer] = _checked_rows(srv, tensor.to(torch.float32), f"body[{key!r}]")
    return StoredVector(_upload_meta(srv, directions, None, "upload"), directions)
