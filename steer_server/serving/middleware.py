"""steer_api's request-body middleware: pure ASGI, in front of every route.

This module's job: cap every request body at ``--max-body-bytes`` (413 beyond it), refuse a
``steering`` field on any path but the steered routes' (vLLM would drop it silently and
answer unsteered), and refuse the engine's own ``vllm_xargs`` keys on every path: clients
steer only through the typed field, which the steered routes (``steered_routes``) read.
It reads bodies and never changes them. Added to vLLM's app by
``steer_server.serving.api.SteerApiPlugin.attach_router``.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from steer_server.serving import metrics
from steer_server.serving.access import scope_tenant
from steer_server.client import SWEEPS_PATH, VECTORS_PATH
from steer_server.serving.steering import SteeringError, bad_request
from steer_vllm.content import VECTORS_KEY
from steer_vllm.spec import CAPTURE_KEY, STEERING_KEY

if TYPE_CHECKING:
    from steer_server.settings import Settings

logger = logging.getLogger("vllm.steer_server")  # under "vllm": printed with vLLM's log handler

# vllm_xargs keys the engine reads; only the server itself may set them.
RESERVED_XARGS = (STEERING_KEY, CAPTURE_KEY, VECTORS_KEY)


class _TooLarge(Exception):
    pass


class BodyMiddleware:
    """Pure ASGI: caps every request body, and refuses steering where it would be dropped.

    Added from ``attach_router``, i.e. before vLLM adds its own middlewares, so it runs
    inside them: an ``--api-key`` check comes first."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.settings.max_body_bytes
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
        label = metrics.tenant_label(tenant, self.settings.metrics_tenant_label)
        # Only bodies that can name a steering key are parsed here; a key spelled with JSON
        # escapes ("\u0073teering") must not slip past, so escaped bodies are parsed too.
        try:
            payload = _json_object(body) if b"steering" in body or b"\\u" in body else None
        except RecursionError:  # fail closed: a body that may steer and cannot be read is refused
            return await _refuse(scope, receive, send, path,
                                 bad_request("body", "JSON nested deeper than this server parses"), label)
        if payload is None or path.startswith((VECTORS_PATH, SWEEPS_PATH)):  # their own "steering" fields
            return await self.app(scope, _replay(body, receive), send)
        refusal = _reserved_xargs(payload)
        if refusal is None and payload.get("steering") is not None and (
                scope["method"] != "POST" or path not in metrics.STEERED_PATHS):
            refusal = bad_request("steering", f"not supported on {path}; use {', '.join(metrics.STEERED_PATHS)}")
        if refusal is not None:
            return await _refuse(scope, receive, send, path, refusal, label)
        return await self.app(scope, _replay(body, receive), send)


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


async def _refuse(scope, receive, send, path: str, error: SteeringError, tenant_label: str) -> None:
    metrics.note_refusal(path, error, tenant_label)
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
