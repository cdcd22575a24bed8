"""Steering receipts on the wire: what the engine applied, added to the response.

A request with ``"steering": {..., "receipt": true}`` gets ``"steering_receipt"``: per
steered layer, the operations there, how many prompt and generated tokens were steered,
and the relative dose ``‖Δh‖/‖h‖`` (mean and max) measured on the stream; a layer
steered by doses also lists the doses its additions asked for. Non-streaming responses carry it
beside ``usage``; streams carry it in their last chunk (chat and completions: the chunk
before ``[DONE]``; responses: the ``response`` of ``response.completed``).
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

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


class ReceiptAttacher:
    """Wraps an ASGI ``send``: the successful response gets the receipt ``fetch()`` gives."""

    def __init__(self, send, fetch: Callable[[], Awaitable[dict]]):
        self._send = send
        self._fetch = fetch
        self._start: dict | None = None
        self._mode = "pass"  # "pass" | "json" | "stream"
        self._body = b""
        self._held: bytes | None = None  # the last complete event of a stream, not yet sent

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"").decode("latin-1")
            if message["status"] != 200:
                return await self._send(message)
            if content_type.startswith("text/event-stream"):
                self._mode = "stream"
                return await self._send(message)
            self._mode, self._start = "json", message  # sent once the body's length is known
            return None
        if message["type"] != "http.response.body" or self._mode == "pass":
            return await self._send(message)
        self._body += message.get("body", b"")
        more = message.get("more_body", False)
        if self._mode == "json":
            if not more:
                await self._finish_json()
            return None
        return await self._stream(more)

    async def _finish_json(self) -> None:
        payload = json.loads(self._body)
        payload[RECEIPT_FIELD] = await self._fetch()
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in self._start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, more: bool) -> None:
        *events, self._body = self._body.split(b"\n\n")
        out = b""
        for event in events:
            if event.strip() == b"data: [DONE]":
                out += await self._with_receipt(self._held) + b"data: [DONE]\n\n"
                self._held = None
                continue
            if self._held is not None:
                out += self._held + b"\n\n"
            self._held = event
        if not more:
            if self._held is not None:  # a stream without [DONE] (responses): its last event
                out += await self._with_receipt(self._held)
                self._held = None
            out += self._body
        if out or not more:
            await self._send({"type": "http.response.body", "body": out, "more_body": more})

    async def _with_receipt(self, event: bytes | None) -> bytes:
        if event is None:
            return b""
        lines = event.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data: "):
                data = json.loads(line[6:])
                target = data["response"] if data.get("type") == "response.completed" else data
                target[RECEIPT_FIELD] = await self._fetch()
                lines[i] = b"data: " + json.dumps(data).encode()
        return b"\n".join(lines) + b"\n\n"
