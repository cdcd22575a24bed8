"""``--max-dose`` for coefficient steering: a two-token probe before the request itself.

A dose is checked when it is given. A coefficient's dose ``‖Δh‖ / ‖h‖`` is only known once
the model has run, so a coefficient request on a server with ``--max-dose`` first runs as a
probe: the same request and steering, one sequence, two tokens (the prompt and the first
generated token are steered), not streamed, with a receipt. If the receipt's largest dose at
a layer a coefficient steers is over the limit, the request is refused with a 400 naming that
addition before anything is sent; otherwise the request runs as asked. The price is one more
prefill for coefficient requests on such servers, and the check covers the first two
positions' steps: later tokens' streams, and so their doses, can differ.
"""
from __future__ import annotations

import asyncio
import copy
import json
import uuid

from steer_server.serving.access import scope_tenant
from steer_server.serving.receipts import RECEIPT_FIELD, ReceiptAttacher
from steer_server.serving.render_hook import awaiting_prompt
from steer_server.serving.steering import SteeringError, bad_request, parse_steering

PROBE_TOKENS = 2  # the prompt's step and the first generated token's
# Where each route takes its token limit; the probe's replaces the request's.
_MAX_TOKENS_KEY = {"/v1/completions": "max_tokens", "/v1/chat/completions": "max_completion_tokens",
                   "/v1/responses": "max_output_tokens"}
# What would make the probe stream, sample more than once, or refuse two tokens.
_DROPPED = ("stream_options", "best_of", "min_tokens", "max_tokens", "max_completion_tokens", "max_output_tokens")


def coefficient_layers(steering: dict) -> bool:
    """Whether the request's steering has any addition given by ``coeff``."""
    additions = steering.get("additions") if isinstance(steering, dict) else None
    return isinstance(additions, list) and any(isinstance(a, dict) and a.get("coeff") is not None for a in additions)


def probe_payload(path: str, payload: dict) -> dict:
    """The request as a probe: one sequence, ``PROBE_TOKENS`` tokens, whole, with a receipt."""
    probe = copy.deepcopy(payload)
    for key in _DROPPED:
        probe.pop(key, None)
    probe.update({_MAX_TOKENS_KEY[path]: PROBE_TOKENS, "stream": False, "n": 1})
    probe["request_id"] = "dose-probe-" + uuid.uuid4().hex
    if path == "/v1/responses":
        probe["store"] = False
    probe["steering"] = {**probe["steering"], "receipt": True}
    return probe


def over_limit(steering: dict, receipt: dict, max_dose: float) -> SteeringError | None:
    """The refusal for the first coefficient addition whose layer took a dose over ``max_dose``."""
    field = parse_steering(steering)
    for layer in receipt.get("layers", []):
        if layer.get("dose_max") is None or layer["dose_max"] <= max_dose:
            continue
        for i, addition in enumerate(field.additions):
            if addition.coeff is not None and addition.layer in (None, layer["layer"]):
                return bad_request(
                    f"steering.additions[{i}].coeff",
                    f"{addition.coeff:g} gave a dose of {layer['dose_max']:.3g} at layer {layer['layer']} on the first "
                    f"step, over this server's limit of {max_dose:g} (--max-dose); lower it or give a dose")
    return None


class _Collected:
    """An ASGI ``send`` that keeps the response."""

    def __init__(self):
        self.status = 0
        self.body = b""

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


async def check_dose(app, scope: dict, server, path: str, payload: dict, headers) -> SteeringError | None:
    """Run the probe of ``payload`` (its ``steering`` field not yet resolved) through ``app``;
    the refusal when a coefficient went over ``--max-dose``. A probe that fails is not a
    verdict: the request itself then meets the same error and reports it."""
    probe = probe_payload(path, payload)
    resolved, awaiting = await server.rewrite_request(path, probe, headers, counted=False, tenant=scope_tenant(scope))
    body = json.dumps(probe).encode()
    probe_scope = dict(scope)
    probe_scope["headers"] = [(k, v) for k, v in scope["headers"]
                              if k.lower() not in (b"content-length", b"x-request-id")]
    probe_scope["headers"].append((b"content-length", str(len(body)).encode()))
    collected = _Collected()
    delivered = False

    async def receive():
        nonlocal delivered
        if delivered:  # vLLM listens for a disconnect until the answer is ready: none comes
            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    vectors = server.store.vectors
    vectors.pin(resolved.vectors)
    try:
        with awaiting_prompt(awaiting):
            await app(probe_scope, receive, ReceiptAttacher(collected, lambda: server.take_receipt(resolved)))
    finally:
        vectors.unpin(resolved.vectors)
    if collected.status != 200:
        return None
    receipt = json.loads(collected.body).get(RECEIPT_FIELD) or {}
    return over_limit(payload["steering"], receipt, server.settings.max_dose)
