"""The server's steering state once the engine is up (``SteerServer``: model, tokenizer,
vector store, computer, resolver, quotas), and the FastAPI dependencies through which the
routes get it and the server's settings.

``SteerApiPlugin.init_state`` (``steer_server.serving.api``) starts it and puts it on the
app's state; a route asks for it with a parameter (``server: Steer``) and is answered 503
until it is there.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from typing import Annotated

from fastapi import Depends, Request

from steer_server.serving import metrics
from steer_server.serving.anchor import last_user_text
from steer_server.serving.quotas import QuotaKeeper, Quotas, read_quotas_file
from steer_server.serving.receipts import receipt_body
from steer_server.serving.render_hook import AwaitingPrompt, render_hook_problems
from steer_server.serving.steering import Resolved, SteeringError, SteeringField, SteeringResolver, bad_request
from steer_server.settings import Settings
from steer_vllm.self_test import SelfTestFailed, prove_steering
from steer_vllm.spec import STEERING_KEY
from steer_vllm.validate import ModelLimits
from vector_store import StoredVector, VectorStoreError
from vector_store.async_access import AsyncStore

logger = logging.getLogger("vllm.steer_server")  # under "vllm": printed with vLLM's log handler

# Where the app's state holds them (set by SteerApiPlugin).
SERVER_STATE = "steer_server"
SETTINGS_STATE = "steer_settings"
KEYS_STATE = "steer_keys"  # ApiKeys: every key of the server, as configured
KEY_ROLES_STATE = "steer_key_roles"  # KeyRoles over them

# Captured once per server to give "a typical token's norm" at each layer.
REFERENCE_TEXT = (
    "The museum opens at nine in the morning and closes at six. Visitors can walk through rooms of "
    "old maps, ship models and paintings of the harbour, and a small cafe on the ground floor serves "
    "coffee, soup and sandwiches. Guided tours start every hour from the main hall."
)


def _nothing() -> None:
    pass



class _CountingStore:
    """The store, with computation-cache lookups counted for /metrics."""

    def __init__(self, store: AsyncStore):
        self._store = store

    async def cached_computation(self, key: str):
        content_id = await self._store.cached_computation(key)
        (metrics.VECTOR_CACHE_HITS if content_id is not None else metrics.VECTOR_CACHE_MISSES).inc()
        return content_id

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class SteerServer:
    """Everything the routes need once the engine is up: model, tokenizer, store, computer."""

    def __init__(self, *, engine_client, state, settings: Settings, store: AsyncStore, computer, limits: ModelLimits,
                 tokenizer, model_dir: str, model_type: str, default_pad_id: int | None, quotas: QuotaKeeper):
        self.engine_client = engine_client
        self.quotas = quotas
        self.state = state
        self.settings = settings
        self.store = store
        self.computer = computer
        self.model = computer.model
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.model_type = model_type
        self.resolver = SteeringResolver(
            computer=computer,
            limits=limits,
            tokenize=self.tokenize,
            default_pad_id=default_pad_id,
            max_additions=settings.max_additions,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_dose=settings.max_dose,
        )
        self._typical_norms: dict[int, float] | None = None
        self._typical_lock = asyncio.Lock()

    @classmethod
    async def start(cls, engine_client, state, settings: Settings) -> "SteerServer":
        from steer_vllm import SteeringNotInstalled, check_engine_async
        from steer_vllm.capture import capture_residuals_async
        from vector_store import open_store
        from vector_store.compute import ModelInfo, VectorComputer
        from vector_store.keys import model_fingerprint

        try:
            await check_engine_async(engine_client)
        except SteeringNotInstalled as exc:
            raise RuntimeError(f"steer-server cannot start: {exc}") from None
        missing = render_hook_problems(state)
        if missing:
            raise RuntimeError("steer-server cannot start: ActAdd prompts could not be checked as vLLM renders them: "
                               + "; ".join(missing))

        model_config = engine_client.model_config
        model_dir = model_config.model
        try:
            fingerprint = model_fingerprint(model_dir, cache_home=settings.cache_home)
        except VectorStoreError as exc:
            raise RuntimeError(
                f"steer-server cannot start: the model must be a local Hugging Face directory ({exc})"
            ) from None
        model = ModelInfo(
            fingerprint=fingerprint,
            hidden_size=model_config.get_hidden_size(),
            num_layers=model_config.hf_text_config.num_hidden_layers,
        )
        quotas = read_quotas_file(settings.quotas_file) if settings.quotas_file is not None else Quotas()
        # $STEER_STORE, set by `steer-server serve --store`
        store = AsyncStore(open_store(settings.store_location, timeout_s=settings.store_timeout_s),
                           timeout_s=settings.store_timeout_s,
                           fresh_s=settings.store_fresh_s,
                           limits_of=lambda tenant: quotas.of(tenant).store_limits)
        keeper = QuotaKeeper(quotas, store)
        tokenizer = engine_client.get_tokenizer()
        if inspect.isawaitable(tokenizer):
            tokenizer = await tokenizer

        async def capture(token_id_lists: list[list[int]], layers: list[int]):
            started = time.perf_counter()
            try:
                return await capture_residuals_async(engine_client, token_id_lists, layers)
            finally:
                metrics.CAPTURE_SECONDS.observe(time.perf_counter() - started)

        computer = VectorComputer(_CountingStore(store), capture, model, max_prompt_tokens=settings.max_prompt_tokens,
                                  charge=keeper.charge_tokens)
        limits = ModelLimits.of(engine_client.vllm_config, settings, fingerprint)
        server = cls(
            engine_client=engine_client,
            state=state,
            settings=settings,
            store=store,
            computer=computer,
            limits=limits,
            tokenizer=tokenizer,
            model_dir=model_dir,
            model_type=getattr(model_config.hf_config, "model_type", None) or "unknown",
            default_pad_id=None,
            quotas=keeper,
        )
        if settings.pad is not None:
            try:
                server.resolver.default_pad_id = server.resolver.pad_token_id(settings.pad)
            except SteeringError as exc:
                raise RuntimeError(f"steer-server cannot start: --steering-pad {exc.message}") from None
        try:
            statuses = await prove_steering(engine_client, model, server.tokenize)
        except (SteeringNotInstalled, SelfTestFailed) as exc:
            raise RuntimeError(f"steer-server cannot start: {exc}") from None
        logger.info(
            "steer_api: steering proven end to end in %d worker(s) and %d engine(s) (self-test passed); "
            "model %s (%d layers, hidden %d); steering table %d rows (--steering-table-rows); store %r "
            "(timeout %g s, names trusted %g s); pad %r (token %s); max %d additions, steering prompts up to "
            "%d tokens, bodies up to %d bytes",
            len(statuses["workers"]), len(statuses["engines"]), fingerprint, model.num_layers, model.hidden_size,
            limits.table_capacity + 1, store, settings.store_timeout_s, settings.store_fresh_s,
            settings.pad, server.resolver.default_pad_id, settings.max_additions, settings.max_prompt_tokens,
            settings.max_body_bytes,
        )
        return server

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def chat_prompt_ids(self, text: str) -> list[int]:
        """``text`` as a chat's one user turn, rendered by the served model's own chat template
        with the assistant's turn opened: the prompt a chat request with that message gets."""
        try:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True)
        except ValueError as exc:  # transformers: no chat template
            raise bad_request("template", f"the served model's tokenizer cannot render a chat ({exc})") from None
        # The template writes the special tokens itself, as vLLM's chat rendering assumes.
        return self.tokenize(rendered, add_special_tokens=False)

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

    async def steer_request(self, path: str, request, payload: dict, headers, counted: bool = True, *,
                            tenant: str) -> Resolved:
        """Resolve ``request.steering`` (present) with the vectors of ``tenant`` (the caller's)
        into the request's ``vllm_xargs.steering``. ActAdd checks that need the rendered prompt
        go on the request for the render hook. ``payload``: the body as sent (a chat's user
        text). ``counted``: whether the request is a steered request for metrics and logs (a
        dose probe is not)."""
        field: SteeringField = request.steering
        if field.anchor is not None and path == "/v1/completions":
            raise bad_request("steering.anchor", "applies to chat and responses; completions steer from the prompt's first token")
        add_special_tokens = request.add_special_tokens if path == "/v1/completions" else True
        resolved = await self.resolver.for_tenant(tenant).resolve(field, add_special_tokens=bool(add_special_tokens))
        if resolved.waits_for_prompt:  # ActAdd lengths and a chat's anchor wait for the rendered prompt
            to_user = path != "/v1/completions" and field.anchor != "template"
            resolved.engine = resolved.engine.model_copy(update={"anchor_to": "user" if to_user else "prompt"})
        request.vllm_xargs = {**(request.vllm_xargs or {}), STEERING_KEY: resolved.engine_json()}
        request_id = headers.get("x-request-id") or request.request_id
        label = metrics.tenant_label(tenant, self.settings.metrics_tenant_label)
        accepted = functools.partial(self._accepted, path, request_id, resolved, label) if counted else _nothing
        if resolved.engine.anchor_to is None:
            accepted()
        else:
            request.await_render(AwaitingPrompt(resolved, last_user_text(path, payload), self._decode, accepted,
                                                functools.partial(metrics.note_refusal, path, tenant_label=label)))
        return resolved

    @staticmethod
    def _accepted(path: str, request_id: str, resolved: Resolved, tenant_label: str) -> None:
        metrics.count_steered(metrics.STEERED_PATHS[path], resolved.mode, operations=resolved.operations(), tenant=tenant_label)
        logger.info("steered request %s on %s: %s", request_id, path, resolved.summary())

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    async def take_receipt(self, resolved: Resolved) -> dict:
        """What the workers applied for a finished request that asked for a receipt."""
        from steer_vllm.rpc import workers_rpc_async
        from steer_vllm.receipts import TAKE_RECEIPT_RPC, merge_worker_receipts

        per_worker = await workers_rpc_async(self.engine_client, TAKE_RECEIPT_RPC, (resolved.engine.receipt,))
        return receipt_body(resolved.engine, merge_worker_receipts(per_worker), resolved.calibrated)

    # ---------------------------------------------------------------- vectors

    async def lookup(self, name_or_id: str, tenant: str) -> tuple[str, StoredVector]:
        content_id = await self.store.resolve(name_or_id, tenant=tenant)
        return content_id, await self.store.get(content_id)

    async def names_of(self, content_id: str, tenant: str) -> list[str]:
        return await self.store.names_of(content_id, tenant=tenant)

    async def describe(self, content_id: str, vector: StoredVector, tenant: str, norms: bool = False) -> dict:
        """The vector as the API shows it to ``tenant``: its names and calibration are the tenant's."""
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
            "names": await self.names_of(content_id, tenant),
            "model": meta.model_fingerprint,
            "served_model": meta.model_fingerprint == self.model.fingerprint,
            "hidden_size": meta.hidden_size,
            "kind": meta.kind,
            "method": meta.method,
            "layers": vector.layers,
            "shape": {str(layer): list(t.shape) for layer, t in sorted(vector.directions.items())},
            "norm": {str(layer): float(t.norm()) for layer, t in sorted(vector.directions.items())},
            "stats": meta.stats,
            "calibration": await self.store.calibration(content_id, tenant=tenant),
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

    async def save(self, vector: StoredVector, name: str | None, tenant: str) -> str:
        from vector_store.codec import check_name

        if name is not None:
            check_name(name)
        content_id = await self.store.put(vector, tenant=tenant)
        if name is not None:
            await self.store.set_name(name, content_id, tenant=tenant)
        return content_id


# ---------------------------------------------------------------- the routes' dependencies


def server_settings(request: Request) -> Settings:
    """The process's settings, as the plugin loaded them once."""
    return getattr(request.app.state, SETTINGS_STATE)


def server_if_started(request: Request) -> SteerServer | None:
    """The steering state; None on a server without an engine (render-only)."""
    return getattr(request.app.state, SERVER_STATE, None)


def started_server(request: Request) -> SteerServer:
    """The steering state, or the request's 503 while there is none."""
    server = server_if_started(request)
    if server is None:
        raise SteeringError(503, "steering is not initialised on this server")
    return server


# A route's parameters: ``server: Steer``, ``settings: ServerSettings``.
Steer = Annotated[SteerServer, Depends(started_server)]
SteerIfStarted = Annotated[SteerServer | None, Depends(server_if_started)]
ServerSettings = Annotated[Settings, Depends(server_settings)]
