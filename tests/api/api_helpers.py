"""Shared bits of the tests/api tests (not a test module)."""
from __future__ import annotations

import json
import re

import httpx
import openai

BOS = "<|endoftext|>"  # SmolLM2's tokenizer adds no BOS; this is the one to prepend by hand

LOVE_HATE = {
    "additions": [
        {"prompt": "Love", "coeff": 8, "layer": 4},
        {"prompt": "Hate", "coeff": -8, "layer": 4},
    ]
}


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300)


def raw_post(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST with Python's json (it writes NaN/Infinity, which the SDK and httpx refuse)."""
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN|[+-]Inf)$")


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values
