"""Shared bits of the tests/api tests (not a test module)."""
from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import numpy as np
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


class CreateBurst:
    """Threads creating distinct named vectors (random float32 rows at one layer) through
    the HTTP API as fast as the server answers; ``acknowledged`` keeps what got a 201:
    name -> (content id, rows). Anything else (refused, connection lost) is not counted."""

    def __init__(self, url: str, api_key: str, prefix: str, hidden: int, layer: int, threads: int = 4):
        self.url, self.api_key, self.prefix, self.hidden, self.layer = url, api_key, prefix, hidden, layer
        self.acknowledged: dict[str, tuple[str, np.ndarray]] = {}
        self.other: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def wait_for(self, count: int, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.acknowledged) < count:
            assert time.monotonic() < deadline, f"only {len(self.acknowledged)} creates acknowledged: {self.other[-3:]}"
            time.sleep(0.02)

    def _run(self, thread: int) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30) as http:
            i = 0
            while not self._stop.is_set():
                name = f"{self.prefix}-{thread}-{i}"
                rows = np.random.default_rng([thread, i]).standard_normal((1, self.hidden)).astype(np.float32)
                i += 1
                try:
                    response = http.post("/v1/steering/vectors",
                                         json={"name": name, "layers": {str(self.layer): rows.tolist()}})
                except httpx.HTTPError as error:
                    self.other.append(f"{name}: {error!r}")
                    time.sleep(0.05)
                    continue
                if response.status_code == 201:
                    self.acknowledged[name] = (response.json()["id"], rows)
                else:
                    self.other.append(f"{name}: {response.status_code} {response.text[:200]}")
