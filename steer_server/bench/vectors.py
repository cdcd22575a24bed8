"""The K steering configurations a load uses: random unit vectors uploaded through the
server's vector routes before the clock starts (so a measurement prices serving, not vector
computation), one ``steering`` request field per vector, and their deletion afterwards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import numpy as np

from steer_server.bench import BenchError
from steer_server.client import VECTORS_PATH, auth_headers, error_message

# actadd and constant add a vector; ablate and clamp project the stream on one (at the layer);
# dose adds one at a relative dose to the answer's tokens only; window adds one to generated
# tokens 4..31 and ablates its direction in the prompt (three schedule segments at one layer).
MODES = ("actadd", "constant", "ablate", "clamp", "dose", "window")
BENCH_DOSE = 0.1  # where the default model stays fluent (README, "dose")
WINDOW = {"start": 4, "end": 32}


@dataclass
class SteeringConfigs:
    names: list[str]
    fields: list[dict]  # the `steering` request field that uses names[i]
    hidden_size: int
    upload_s: float  # not part of any measurement


def steering_field(name: str, mode: str, coeff: float) -> dict:
    """The request field for one vector: ``coeff`` scales an addition, or is the clamp value
    (the dose mode's strength is ``BENCH_DOSE``)."""
    if mode == "ablate":
        return {"ablate": [{"vector": name}]}
    if mode == "clamp":
        return {"clamp": [{"vector": name, "value": coeff}]}
    if mode == "dose":
        return {"additions": [{"vector": name, "dose": BENCH_DOSE, "positions": "generated"}], "mode": "constant"}
    if mode == "window":
        return {"additions": [{"vector": name, "coeff": coeff, "positions": WINDOW}], "mode": "constant",
                "ablate": [{"vector": name, "positions": "prompt"}]}
    return {"additions": [{"vector": name, "coeff": coeff}], "mode": mode}


def upload_configs(url: str, api_key: str | None, *, count: int, mode: str, layer: int, rows: int, coeff: float,
                   seed: int, prefix: str) -> SteeringConfigs:
    """Upload ``count`` distinct random vectors at one layer (``rows`` unit rows for actadd, one
    for constant). A probe computed from a contrast pair first tells the served model's hidden
    size, and that the steering routes and the layer exist; it is deleted again."""
    started = time.perf_counter()
    names: list[str] = []
    with httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=600) as http:
        probe = f"{prefix}-probe"
        response = http.post(VECTORS_PATH, json={"name": probe, "layer": layer,
                                                 "pairs": [{"positive": "Love", "negative": "Hate"}]})
        if response.status_code == 404:
            raise BenchError(f"{url} has no steering routes ({VECTORS_PATH}): is it a steer-server?")
        if response.status_code != 201:
            raise BenchError(f"creating a probe vector at layer {layer}: HTTP {response.status_code}: "
                             f"{error_message(response)}")
        hidden = int(response.json()["hidden_size"])
        http.delete(f"{VECTORS_PATH}/{probe}")
        rng = np.random.default_rng([seed, count, MODES.index(mode)])
        for i in range(count):
            name = f"{prefix}-{mode}-{i}"
            direction = rng.standard_normal((rows if mode == "actadd" else 1, hidden)).astype(np.float32)
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            kind = "actadd" if mode == "actadd" else "constant"
            body = {"name": name, "kind": kind, "layers": {str(layer): direction.round(5).tolist()}}
            response = http.post(VECTORS_PATH, json=body)
            if response.status_code != 201:
                delete_configs(url, api_key, names)
                raise BenchError(f"uploading vector {name}: HTTP {response.status_code}: {error_message(response)}")
            names.append(name)
    return SteeringConfigs(names, [steering_field(n, mode, coeff) for n in names], hidden,
                           time.perf_counter() - started)


def delete_configs(url: str, api_key: str | None, names: list[str]) -> None:
    with httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=60) as http:
        for name in names:
            try:
                http.delete(f"{VECTORS_PATH}/{name}")
            except httpx.HTTPError:
                pass  # the server went away; nothing left to clean


def check_steered_request(url: str, api_key: str | None, model: str, prompt, field: dict) -> None:
    """One small steered completion, so a server that refuses the steering says why here, in its
    own words (vLLM's load generator keeps only the HTTP reason of a failed request)."""
    with httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=600) as http:
        response = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1,
                                                      "steering": field})
    if response.status_code != 200:
        raise BenchError(f"a steered request was refused: HTTP {response.status_code}: {error_message(response)}")
