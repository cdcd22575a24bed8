"""``--max-dose`` for coefficient steering: a two-token probe before the request itself.

A dose is checked when it is given. A coefficient's dose ``‖Δh‖ / ‖h‖`` is only known once
the model has run, so a coefficient request on a server with ``--max-dose`` first runs as a
probe: the same request and steering, one sequence, two tokens (the prompt and the first
generated token are steered), not streamed, with a receipt. If the receipt's largest dose at
a layer a coefficient steers is over the limit, the request is refused with a 400 naming that
addition before anything is sent; otherwise the request runs as asked. The price is one more
prefill for coefficient requests on such servers, and the check covers the first two
positions' steps: later tokens' streams, and so their doses, can differ.

This module says what the probe is and reads its verdict; ``steered_routes`` runs it.
"""
from __future__ import annotations

import copy
import uuid

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
