"""steer_api's request-body middleware: pure ASGI, in front of vLLM's handlers.

This module's job: cap every request body at ``--max-body-bytes`` (413 beyond it), and on
POST /v1/completions, /v1/chat/completions and /v1/responses rewrite the ``steering`` field into
``vllm_xargs.steering`` (through ``SteerServer.rewrite_request``) before vLLM parses the
request, keeping the request's vectors pinned in the process cache until vLLM is done
with it. A ``steering`` field on any other path is refused rather than silently dropped,
and so are the engine's own ``vllm_xargs`` keys on every path: clients steer only
through the typed field. Added to vLLM's app by ``steer_server.serving.api.SteerApiPlugin.attach_router``.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from steer_server.serving import metrics
from steer_server.serving.access import scope_tenant
from steer_server.client import VECTORS_PATH
from steer_server.serving.dose_probe import check_dose, coefficient_layers
from steer_server.serving.receipts import ReceiptAttacher
from steer_server.serving.render_hook import awaiting_prompt
from steer_server.serving.steering import SteeringError, bad_request, quota_refusal, store_failure
from steer_server.serving.sweep_route import SWEEPS_PATH
from steer_vllm.content import VECTORS_KEY
from steer_vllm.spec import CAPTURE_KEY, STEERING_KEY, SteeringSpecError
from vector_store import QuotaExceeded, StoredDataDamaged, StoreUnavailable

if TYPE_CHECKING:
    from steer_server.serving.api import SteerApiPlugin

logger = logging.getLogger("vllm.steer_server")  # under "vllm": printed with vLLM's log handler

STEERED_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/responses": "responses"}
# vllm_xargs keys the engine reads; only the server itself may set them.
RESERVED_XARGS = (STEERING_KEY, CAPTURE_KEY, VECTORS_KEY)


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
        headers = Headers(scope=scope)
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
        tenant = scope_tenant(scope)
        label = metrics.tenant_label(tenant, self.plugin.settings.metrics_tenant_label)
        # Only bodies that can name a steering key are parsed here; a key spelled with JSON
        # escapes ("\u0073teering") must not slip past, so escaped bodies are parsed too.
        try:
            payload = _json_object(body) if b"steering" in body or b"\\u" in body else None
        except RecursionError:  # fail closed: a body that may steer and cannot be read is refused
            return await _refuse(scope, receive, send, path,
                                 bad_request("body", "JSON nested deeper than this server parses"), label)
        if payload is None or path.startswith((VECTORS_PATH, SWEEPS_PATH)):  # their own "steering" fields
            return await self.app(scope, _replay(body, receive), send)
        server = self.plugin.server
        steering = payload.get("steering")
        refusal = _reserved_xargs(payload)
        if refusal is None and steering is not None:
            if scope["method"] != "POST" or path not in STEERED_PATHS:
                # vLLM drops unknown fields silently: refuse rather than answer unsteered.
                refusal = bad_request("steering", f"not supported on {path}; use {', '.join(STEERED_PATHS)}")
            elif server is None:
                refusal = SteeringError(503, "steering is not initialised on this server", "steering")
        if refusal is not None:
            return await _refuse(scope, receive, send, path, refusal, label)
        if steering is None:
            return await self.app(scope, _replay(body, receive), send)
        try:
            slot = await server.quotas.enter_steered(tenant)
        except QuotaExceeded as exc:
            return await _refuse(scope, receive, send, path, quota_refusal(exc), label)
        except (StoreUnavailable, StoredDataDamaged) as exc:
            return await _refuse(scope, receive, send, path, store_failure("steering", exc), label)
        try:
            return await self._steer(scope, receive, send, server, path, payload, tenant, label)
        finally:
            await server.quotas.leave_steered(tenant, slot)

    async def _steer(self, scope, receive, send, server, path: str, payload: dict, tenant: str, label: str):
        """Resolve the steering into the body vLLM reads, and answer the request with it."""
        headers = Headers(scope=scope)
        try:
            if server.settings.max_dose is not None and coefficient_layers(payload["steering"]):
                refusal = await check_dose(self.app, scope, server, path, payload, headers)
                if refusal is not None:
                    raise refusal
            resolved, awaiting = await server.rewrite_request(path, payload, headers, tenant=tenant)
        except SteeringError as exc:
            return await _refuse(scope, receive, send, path, exc, label)
        except SteeringSpecError as exc:
            return await _refuse(scope, receive, send, path, SteeringError(400, str(exc)), label)
        except QuotaExceeded as exc:  # the capture of a steering prompt, or storing its vector
            return await _refuse(scope, receive, send, path, quota_refusal(exc), label)
        except Exception as exc:  # noqa: BLE001 - a server fault, reported as one
            logger.exception("steer_api: resolving steering failed")
            return await _refuse(scope, receive, send, path, SteeringError(500, f"steering failed: {exc}"), label)
        body = json.dumps(payload).encode()
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope["headers"].append((b"content-length", str(len(body)).encode()))
        if resolved.engine.receipt is not None:
            send = ReceiptAttacher(send, lambda: server.take_receipt(resolved))
        vectors = server.store.vectors
        vectors.pin(resolved.vectors)
        try:
            with awaiting_prompt(awaiting):
                return await self.app(scope, _replay(body, receive), send)
        finally:
            vectors.unpin(resolved.vectors)


def _json_object(body: bytes) -> dict | None:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # vLLM answers malformed JSON itself
    return payload if isinstance(payload, dict) else None


def _reserved_xargs(payload: dict) -> SteeringError | None:
    xargs = payload.get("vllm_xargs")
    if isinstance(xargs, dict):
        for key in RESERVED_XARGS:
            if key in xargs:
                return bad_request(f"vllm_xargs.{key}", "reserved for the server itself; steer with the steering field")
    return None


def note_refusal(path: str, error: SteeringError, tenant_label: str = "") -> None:
    metrics.count_rejected(error.status, error.reason, tenant_label)
    logger.info("refused steering on %s: %s", path, error.message)


async def _refuse(scope, receive, send, path: str, error: SteeringError, tenant_label: str) -> None:
    note_refusal(path, error, tenant_label)
    await _send_error(scope, receive, send, error)


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
    await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)
