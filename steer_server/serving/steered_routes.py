"""The steered routes: POST /v1/completions, /v1/chat/completions and /v1/responses, ours.

One steered request, top to bottom in this module:

1. FastAPI parses the body into vLLM's own request class extended with a typed ``steering``
   field (``SteeredCompletionRequest`` ...), so ``/openapi.json`` shows it. A bad steering
   field is refused with a 400 naming the field (``SteeringRoute``), in this server's words.
2. ``_steer``: the tenant's steered-request slot is taken (``QuotaKeeper``); under
   ``--max-dose`` a coefficient request first runs as a two-token probe
   (``dose_probe``); the resolver turns the field into the engine's spec
   (``steering.SteeringResolver`` -> ``Resolved``), which goes on the request's own
   ``vllm_xargs``; ActAdd checks that need the rendered prompt travel on the request object
   to the render hook (``render_hook``). The vectors stay pinned in the process cache, and the
   slot held, until the response's last byte.
3. vLLM's serving handler runs with that request; the receipt, when asked for, is added to the
   response object it returns, or to the last event of its stream.

Unsteered requests take the same route and reach vLLM's handler as they are. The routes
replace vLLM's own at start (``install_steered_routes``), and ``steered_route_problems``
proves they are the ones the app serves.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, PrivateAttr, field_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import load_aware_call, validate_json_request, with_cancellation
from vllm.entrypoints.serve.utils.orca_metrics import metrics_header
from vllm.entrypoints.serve.utils.sse_keep_alive import with_sse_keep_alive

from steer_server.serving import metrics
from steer_server.serving.access import Tenant, scope_tenant
from steer_server.serving.dose_probe import coefficient_layers, over_limit, probe_payload
from steer_server.serving.receipts import RECEIPT_FIELD
from steer_server.serving.render_hook import AwaitingPrompt
from steer_server.serving.state import SETTINGS_STATE, SteerIfStarted, SteerServer
from steer_server.serving.steering import (
    SteeringError,
    SteeringField,
    parse_steering,
    quota_refusal,
    store_failure,
)
from steer_vllm.spec import SteeringSpecError
from vector_store import QuotaExceeded, StoredDataDamaged, StoreUnavailable

logger = logging.getLogger("vllm.steer_server")  # under "vllm": printed with vLLM's log handler


class _Steerable(BaseModel):
    """The ``steering`` field, and the ActAdd checks its render waits for (set by ``_steer``)."""

    steering: SteeringField | None = None
    _awaiting: AwaitingPrompt | None = PrivateAttr(default=None)

    @field_validator("steering", mode="before")
    @classmethod
    def _parse(cls, raw: Any) -> SteeringField | None:
        # SteeringError is no ValueError: it leaves pydantic as it is, for SteeringRoute to answer.
        return None if raw is None else parse_steering(raw)

    def await_render(self, awaiting: AwaitingPrompt) -> None:
        self._awaiting = awaiting

    def take_awaiting(self) -> AwaitingPrompt | None:
        """The render hook's: the checks waiting for this request's render, once."""
        awaiting, self._awaiting = self._awaiting, None
        return awaiting


class SteeredCompletionRequest(CompletionRequest, _Steerable):
    pass


class SteeredChatCompletionRequest(ChatCompletionRequest, _Steerable):
    pass


class SteeredResponsesRequest(ResponsesRequest, _Steerable):
    pass


class SteeringRoute(APIRoute):
    """A route whose body's steering field, when invalid, is answered as this server's 400."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except SteeringError as exc:
                return _refusal(request.url.path, exc, scope_tenant(request.scope), request.app)

        return handler


@dataclass
class _Kind:
    """What differs between the three routes."""

    path: str
    request_class: type
    handler_attr: str  # the vLLM serving handler on app.state
    method: str  # its method that serves the request
    dump: dict  # how vLLM dumps this route's response objects
    sse: Callable[[AsyncIterator, Callable[[], Awaitable[dict]] | None], AsyncIterator[str]]
    orca_header: bool  # whether vLLM answers this route with its load-metrics header


async def _text_events(events: AsyncIterator[str], receipt: Callable[[], Awaitable[dict]] | None) -> AsyncIterator[str]:
    """Completions and chat streams (``data: {chunk}`` events, then ``data: [DONE]``): the
    receipt goes into the last chunk, so each event is held until the next one comes."""
    held: str | None = None
    async for event in events:
        if receipt is None:
            yield event
        elif event.startswith("data: {"):
            if held is not None:
                yield held
            held = event
        else:
            if event.strip() == "data: [DONE]" and held is not None:
                chunk = json.loads(held.removeprefix("data: "))
                chunk[RECEIPT_FIELD] = await receipt()
                yield f"data: {json.dumps(chunk)}\n\n"
                held = None
            yield event
    if held is not None:  # a stream cut short: its last chunk as it was
        yield held


async def _response_events(events: AsyncIterator, receipt: Callable[[], Awaitable[dict]] | None) -> AsyncIterator[str]:
    """Responses streams (typed events): the receipt goes into ``response.completed``'s response."""
    async for event in events:
        data = event.model_dump(mode="json", by_alias=True)
        if receipt is not None and data.get("type") == "response.completed":
            data["response"][RECEIPT_FIELD] = await receipt()
        yield f"event: {getattr(event, 'type', 'unknown')}\ndata: {json.dumps(data)}\n\n"


# Each steered path's route, keyed by its ``endpoint`` label in metrics.STEERED_PATHS (the one
# list of steered paths).
_BY_LABEL = {
    "completions": (SteeredCompletionRequest, "openai_serving_completion", "create_completion", {}, _text_events, True),
    "chat": (SteeredChatCompletionRequest, "openai_serving_chat", "create_chat_completion", {}, _text_events, True),
    "responses": (SteeredResponsesRequest, "openai_serving_responses", "create_responses",
                  {"mode": "json", "by_alias": True}, _response_events, False),
}
KINDS = {path: _Kind(path, *_BY_LABEL[label]) for path, label in metrics.STEERED_PATHS.items()}


async def serve(kind: _Kind, request, raw_request: Request, receipt: Callable[[], Awaitable[dict]] | None = None,
                release: Callable[[], Awaitable[None]] | None = None) -> Response:
    """vLLM's handler for ``request``, its answer as a response; ``receipt`` (when given) is
    added to it. ``release`` runs once the response is sent, or at once if none is made."""
    handler = getattr(raw_request.app.state, kind.handler_attr, None)
    if handler is None:
        raise NotImplementedError(f"the served model does not support {kind.path}")
    result = await getattr(handler, kind.method)(request, raw_request)
    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(**kind.dump), status_code=result.error.code)
    if not hasattr(result, "__aiter__"):
        body = result.model_dump(**kind.dump)
        if receipt is not None:
            body[RECEIPT_FIELD] = await receipt()
        headers = metrics_header(raw_request.headers.get("endpoint-load-metrics-format", "")) if kind.orca_header else None
        return JSONResponse(body, headers=headers)
    events = kind.sse(result, receipt)
    if kind.orca_header:  # vLLM keeps these streams alive with comments when asked to
        interval = getattr(getattr(raw_request.app.state, "args", None), "sse_keep_alive_interval", 0)
        events = with_sse_keep_alive(events, float(interval))
    return _HeldStream(events, release)


class _HeldStream(StreamingResponse):
    """A stream that gives back what its request holds (vectors, a quota slot) after its last
    byte, or when the client goes away."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], Awaitable[None]] | None):
        super().__init__(events, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._release is not None:
                await self._release()


def _refusal(path: str, error: SteeringError, tenant: str, app) -> JSONResponse:
    labelled = getattr(app.state, SETTINGS_STATE).metrics_tenant_label
    metrics.note_refusal(path, error, metrics.tenant_label(tenant, labelled))
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _steer(kind: _Kind, request, raw_request: Request, server: SteerServer | None, tenant: str) -> Response:
    if request.steering is None:
        return await serve(kind, request, raw_request)
    if server is None:
        return _refusal(kind.path, SteeringError(503, "steering is not initialised on this server", "steering"),
                        tenant, raw_request.app)
    try:
        slot = await server.quotas.enter_steered(tenant)
    except QuotaExceeded as exc:
        return _refusal(kind.path, quota_refusal(exc), tenant, raw_request.app)
    except (StoreUnavailable, StoredDataDamaged) as exc:
        return _refusal(kind.path, store_failure("steering", exc), tenant, raw_request.app)
    holds = _Holds(server, tenant, slot)
    response: Response | None = None
    try:
        response = await _steered_response(kind, request, raw_request, server, tenant, holds)
        return response
    finally:
        if not isinstance(response, _HeldStream):  # a stream gives them back after its last byte
            await holds.release()


@dataclass
class _Holds:
    """What a steered request holds until its response is sent: its tenant's slot, its vectors
    pinned in the process cache."""

    server: SteerServer
    tenant: str
    slot: Any
    vectors: dict = field(default_factory=dict)

    def pin(self, vectors: dict) -> None:
        self.server.store.vectors.pin(vectors)
        self.vectors = vectors

    async def release(self) -> None:
        self.server.store.vectors.unpin(self.vectors)
        self.vectors = {}
        await self.server.quotas.leave_steered(self.tenant, self.slot)


async def _steered_response(kind: _Kind, request, raw_request: Request, server: SteerServer, tenant: str,
                            holds: _Holds) -> Response:
    payload = await raw_request.json()  # the body as sent: the dose probe's and the anchor's source
    try:
        if server.settings.max_dose is not None and coefficient_layers(payload["steering"]):
            refusal = await _check_dose(kind, raw_request, server, payload, tenant)
            if refusal is not None:
                raise refusal
        resolved = await server.steer_request(kind.path, request, payload, raw_request.headers, tenant=tenant)
    except SteeringError as exc:
        return _refusal(kind.path, exc, tenant, raw_request.app)
    except SteeringSpecError as exc:
        return _refusal(kind.path, SteeringError(400, str(exc)), tenant, raw_request.app)
    except QuotaExceeded as exc:  # the capture of a steering prompt, or storing its vector
        return _refusal(kind.path, quota_refusal(exc), tenant, raw_request.app)
    except Exception as exc:  # noqa: BLE001 - a server fault, reported as one
        logger.exception("steer_api: resolving steering failed")
        return _refusal(kind.path, SteeringError(500, f"steering failed: {exc}"), tenant, raw_request.app)
    holds.pin(resolved.vectors)
    receipt = (lambda: server.take_receipt(resolved)) if resolved.engine.receipt is not None else None
    return await serve(kind, request, raw_request, receipt, holds.release)


async def _check_dose(kind: _Kind, raw_request: Request, server: SteerServer, payload: dict,
                      tenant: str) -> SteeringError | None:
    """Run ``payload`` as its dose probe; the refusal when a coefficient went over ``--max-dose``.
    A probe that fails is not a verdict: the request itself then meets the same error and
    reports it."""
    probe_body = probe_payload(kind.path, payload)
    probe = kind.request_class.model_validate(probe_body)
    # The probe is a request of its own: the client's X-Request-Id stays the request's.
    scope = {**raw_request.scope, "headers": [(k, v) for k, v in raw_request.scope["headers"]
                                              if k.lower() != b"x-request-id"]}
    probe_request = Request(scope, raw_request.receive)
    resolved = await server.steer_request(kind.path, probe, probe_body, probe_request.headers, counted=False,
                                          tenant=tenant)
    with server.store.vectors.pinned_while(resolved.vectors):
        response = await serve(kind, probe, probe_request, lambda: server.take_receipt(resolved))
    if response.status_code != 200:
        return None
    receipt = json.loads(response.body).get(RECEIPT_FIELD) or {}
    return over_limit(payload["steering"], receipt, server.settings.max_dose)


def _route(kind: _Kind):
    # The body parameter's annotation is the route's typed request: FastAPI parses it, and
    # /openapi.json shows its steering field.
    async def create(request, raw_request: Request, server: SteerIfStarted, tenant: Tenant) -> Response:
        return await _steer(kind, request, raw_request, server, tenant)

    create.__annotations__ = {"request": kind.request_class, "raw_request": Request, "server": SteerIfStarted,
                              "tenant": Tenant, "return": Response}
    create.__name__ = kind.method
    return with_cancellation(load_aware_call(create))


def install_steered_routes(app: FastAPI) -> None:
    """Put the steered routes in the places of vLLM's, keeping vLLM's documented responses."""
    router = APIRouter(route_class=SteeringRoute)
    for index, route in enumerate(list(app.router.routes)):
        if isinstance(route, APIRoute) and route.path in KINDS and "POST" in route.methods:
            kind = KINDS[route.path]
            router.add_api_route(kind.path, _route(kind), methods=["POST"], responses=route.responses,
                                 dependencies=[Depends(validate_json_request)])
            app.router.routes[index] = router.routes[-1]


def steered_route_problems(app: FastAPI) -> list[str]:
    """The steered paths a route other than ours would answer (unsteered, the steering field
    dropped): the first POST route at each path must be a ``SteeringRoute``."""
    found = []
    for path in KINDS:
        first = next((route for route in app.router.routes
                      if isinstance(route, APIRoute) and route.path == path and "POST" in route.methods), None)
        if first is not None and not isinstance(first, SteeringRoute):
            found.append(f"POST {path} is answered by {first.endpoint.__module__}.{first.endpoint.__name__}, "
                         "not by steer-server's steered route")
    return found
