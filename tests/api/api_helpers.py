"""Shared bits of the tests/api tests (not a test module)."""
from __future__ import annotations

import json
import re
import subprocess

import httpx
import openai

from steer_server.server_process import steer_server_command

BOS = "<|endoftext|>"  # SmolLM2's tokenizer adds no BOS; this is the one to prepend by hand

LOVE_HATE = {
    "additions": [
        {"prompt": "Love", "coeff": 8, "layer": 4},
        {"prompt": "Hate", "coeff": -8, "layer": 4},
    ]
}


# Short contrast pairs (positive and negative sentiment, same form), for vectors made from pairs.
SENTIMENT_PAIRS = [
    {"positive": "I loved the warm soup", "negative": "I hated the cold soup"},
    {"positive": "What a wonderful sunny day", "negative": "What an awful rainy day"},
    {"positive": "The staff were kind and helpful", "negative": "The staff were rude and useless"},
    {"positive": "This book is a joy", "negative": "This book is a chore"},
    {"positive": "We won the final, such joy!", "negative": "We lost the final, such misery."},
]


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300)


def cli(server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``steer-server ARGS`` against ``server``, as a user runs it."""
    command = steer_server_command(*args, "--url", server.url, "--api-key", server.api_key)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""})
    if check:
        assert result.returncode == 0, result.stderr
    return result


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
