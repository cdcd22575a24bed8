"""Ramp and soak tests of a steer-server deployment with locust (``pip install steer-server[bench]``).

    locust -f steer_server/bench/locustfile.py --host http://HOST:8000 --api-key KEY \\
        --headless --users 64 --spawn-rate 0.5 --run-time 20m --csv out/ramp        # ramp to 64 users
    locust -f steer_server/bench/locustfile.py --host http://HOST:8000 --api-key KEY \\
        --headless --users 32 --spawn-rate 32 --run-time 4h --csv out/soak          # soak at 32

Each simulated user sends one ``/v1/completions`` request after another; a fraction of them
(``--steered-fraction``) carry a ``steering`` field that uses one of ``--vectors`` random unit
vectors, uploaded when the test starts and deleted when it stops (as ``steer-server bench``
does). Locust's statistics (and its CSV files) keep the two kinds apart under the names
``steered`` and ``unsteered``. A request counts as failed unless it is answered 200 with
exactly ``--max-tokens`` tokens; the failure message is the server's.
"""
from __future__ import annotations

import random
import uuid

from locust import HttpUser, constant, events, task
from locust.runners import MasterRunner

from steer_server.bench.vectors import MODES, delete_configs, upload_configs
from steer_server.client import auth_headers, default_api_key, error_message

# Ordinary tokens in any tokenizer of at least 32k entries: a prompt is a list of random ids,
# unique per request, so no request reuses another's prefix cache.
TOKEN_ID_RANGE = (1000, 20000)


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("steer-server")
    group.add_argument("--api-key", default=default_api_key() or "", help="the server's --api-key")
    group.add_argument("--steered-fraction", type=float, default=0.5, help="share of steered requests")
    group.add_argument("--vectors", type=int, default=8, help="distinct steering vectors (K)")
    group.add_argument("--steer-mode", choices=MODES, default="actadd")
    group.add_argument("--steer-layer", type=int, default=2)
    group.add_argument("--rows", type=int, default=4, help="rows of each actadd vector")
    group.add_argument("--coeff", type=float, default=4.0)
    group.add_argument("--prompt-tokens", type=int, default=32)
    group.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")


class _Shared:
    """What every user of this process reads: the model, the steering fields, the vectors' names."""

    model: str = ""
    fields: list[dict] = []
    names: list[str] = []


@events.test_start.add_listener
def _upload(environment, **_kwargs) -> None:
    if isinstance(environment.runner, MasterRunner):
        return  # workers send the load; each uploads its own vectors
    options = environment.parsed_options
    import httpx

    models = httpx.get(environment.host.rstrip("/") + "/v1/models", headers=auth_headers(options.api_key), timeout=60)
    models.raise_for_status()
    _Shared.model = models.json()["data"][0]["id"]
    if options.steered_fraction > 0:
        configs = upload_configs(environment.host.rstrip("/"), options.api_key, count=options.vectors,
                                 mode=options.steer_mode, layer=options.steer_layer, rows=options.rows,
                                 coeff=options.coeff, seed=0, prefix="locust-" + uuid.uuid4().hex[:8])
        _Shared.fields, _Shared.names = configs.fields, configs.names


@events.test_stop.add_listener
def _delete(environment, **_kwargs) -> None:
    if _Shared.names:
        delete_configs(environment.host.rstrip("/"), environment.parsed_options.api_key, _Shared.names)
        _Shared.names = []


class SteerUser(HttpUser):
    wait_time = constant(0)  # a closed loop: the next request when the last is answered

    @task
    def completion(self) -> None:
        options = self.environment.parsed_options
        steered = bool(_Shared.fields) and random.random() < options.steered_fraction
        body = {"model": _Shared.model, "max_tokens": options.max_tokens, "ignore_eos": True,
                "prompt": [random.randrange(*TOKEN_ID_RANGE) for _ in range(options.prompt_tokens)]}
        if steered:
            body["steering"] = random.choice(_Shared.fields)
        with self.client.post("/v1/completions", json=body, headers=auth_headers(options.api_key),
                              name="steered" if steered else "unsteered", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {error_message(response)}")
            elif response.json()["usage"]["completion_tokens"] != options.max_tokens:
                response.failure(f"{response.json()['usage']['completion_tokens']} tokens, "
                                 f"expected {options.max_tokens}")
