"""Quotas through real HTTP, on the session's tiny server (``conftest.QUOTAS``: team-q may store 3
vectors, capture 60 tokens a minute and run 1 steered request at once; team-r may store 1000
bytes). At a quota: 429 naming it and its limit (``Retry-After`` for the rate and the in-flight
slot), nothing stored; meanwhile the tenant's unsteered requests and other tenants' steering
flow. Redis-backed quotas across replicas: tests/replicas/test_replicas.py."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from api_helpers import error_of
from conftest import QUOTAS, TENANT_KEYS, TinyServer, http_client

from fleet_processes import after_the_slot_returns, held_body, stream_held_open

from vector_store.codec import encode
from vector_store.sqlite import SqliteVectorStore

pytestmark = pytest.mark.slow

ROUTE = "/v1/steering/vectors"
HIDDEN, LAYER = 128, 2


@pytest.fixture(scope="module")
def clients(tiny_server: TinyServer) -> Iterator[dict[str, httpx.Client]]:
    made = {tenant: http_client(tiny_server, roles["admin"]) for tenant, roles in TENANT_KEYS.items()}
    yield made
    for client in made.values():
        client.close()


def upload(client: httpx.Client, name: str, seed: int) -> httpx.Response:
    rows = np.random.default_rng(seed).normal(size=HIDDEN).astype(np.float32).tolist()
    return client.post(ROUTE, json={"name": name, "layers": {str(LAYER): [rows]}})


def assert_quota_refusal(response: httpx.Response, quota: str, limit: int, retry: bool) -> None:
    assert response.status_code == 429, response.text
    error = error_of(response)
    assert error["type"] == "RateLimitError" and error["code"] == 429
    assert f"quota '{quota}'" in error["message"] and str(limit) in error["message"], error
    if retry:
        assert 1 <= int(response.headers["retry-after"]) <= 60
    else:
        assert "retry-after" not in response.headers


def emptied(client: httpx.Client) -> httpx.Client:
    """The tenant's library emptied (its vectors quota then free), the client handed back."""
    for entry in client.get(ROUTE, params={"all": True, "limit": 1000}).json()["data"]:
        assert client.delete(f"{ROUTE}/{entry['id']}").status_code == 200
    return client


def completion(client: httpx.Client, model: str, steering: dict | None = None, **fields) -> httpx.Response:
    body = {"model": model, "prompt": "The weather today", "max_tokens": 2, "temperature": 0, **fields}
    return client.post("/v1/completions", json=body | ({"steering": steering} if steering else {}))


def test_the_vectors_quota_refuses_the_fourth_vector_and_frees_with_a_delete(tiny_server, clients):
    limit = QUOTAS["team-q"]["vectors"]
    names = [f"q-{uuid.uuid4().hex[:6]}" for _ in range(limit + 1)]
    for i, name in enumerate(names[:limit]):
        assert upload(clients["team-q"], name, seed=100 + i).status_code == 201
    refused = upload(clients["team-q"], names[limit], seed=100 + limit)
    assert_quota_refusal(refused, "vectors", limit, retry=False)
    store = SqliteVectorStore(tiny_server.store)
    assert store.usage(tenant="team-q").vectors == limit and store.name_target(names[limit], tenant="team-q") is None
    # A vector the tenant already holds is no new reference: storing it again is allowed.
    assert upload(clients["team-q"], names[0], seed=100).status_code == 201
    # Other tenants store on; the tenant's own steering and plain requests flow.
    assert upload(clients["team-a"], names[limit], seed=100 + limit).status_code == 201
    assert completion(clients["team-q"], tiny_server.model).status_code == 200
    steered = completion(clients["team-q"], tiny_server.model, {"additions": [{"vector": names[0], "coeff": 1.0}]})
    assert steered.status_code == 200, steered.text
    assert clients["team-q"].delete(f"{ROUTE}/{names[1]}").status_code == 200
    assert upload(clients["team-q"], names[limit], seed=100 + limit).status_code == 201


def test_the_bytes_quota_counts_the_stored_tensors(tiny_server, clients):
    limit = QUOTAS["team-r"]["bytes"]
    first = upload(clients["team-r"], "r-first", seed=200)
    assert first.status_code == 201, first.text
    stored = SqliteVectorStore(tiny_server.store).get(first.json()["id"])
    size = len(encode(stored).tensor_bytes)
    assert size <= limit < 2 * size  # the test's premise: one fits, two do not
    assert_quota_refusal(upload(clients["team-r"], "r-second", seed=201), "bytes", limit, retry=False)
    assert SqliteVectorStore(tiny_server.store).usage(tenant="team-r") == (1, size)


def test_a_sweep_within_the_quotas_runs_its_cells_one_at_a_time(tiny_server, clients):
    """team-q may run 1 steered request at once: its sweep sends its cells within that, so its
    own cells are never refused (the route's concurrency is otherwise 8)."""
    sweep = {"steering": {"prompts": [{"prompt": " weddings", "weight": 1}]}, "prompts": ["The weather today"],
             "layers": [LAYER], "coeffs": [1.0, 2.0], "samples": 1, "max_tokens": 4, "temperature": 0}
    response = emptied(clients["team-q"]).post("/v1/steering/sweeps", json=sweep)  # (its prompt vector is stored)
    assert response.status_code == 200, response.text
    assert len(response.json()["cells"]) == 3


def test_the_capture_quota_is_a_rate_with_retry_after(tiny_server, clients):
    limit = QUOTAS["team-q"]["capture_tokens_per_minute"]
    emptied(clients["team-q"])
    refused = None
    for attempt in range(6):  # ~30 tokens each: the minute's 60 run out within 3, even across one window's end
        words = " ".join(f"w{uuid.uuid4().hex[:5]}" for _ in range(3))
        response = clients["team-q"].post(ROUTE, json={"layer": LAYER, "pairs": [
            {"positive": f"Calm {words}", "negative": f"Angry {words}"}]})
        if response.status_code == 429:
            refused = response
            break
        assert response.status_code in (201, 429), response.text
        # (a stored pair vector counts against the vectors quota too: drop it)
        clients["team-q"].delete(f"{ROUTE}/{response.json()['id']}")
    assert refused is not None, "the capture quota never refused"
    assert_quota_refusal(refused, "capture_tokens_per_minute", limit, retry=True)
    # A steering prompt needs a capture too; unsteered requests and other tenants do not wait.
    # (longer than the refused pair, so it cannot fit what is left of the minute either)
    longer = f"Calm {words} Angry {words} and more"
    prompt_steered = completion(clients["team-q"], tiny_server.model,
                                {"additions": [{"prompt": longer, "coeff": 1.0, "layer": LAYER}]},
                                prompt="The weather today is " * 20)
    assert_quota_refusal(prompt_steered, "capture_tokens_per_minute", limit, retry=True)
    assert completion(clients["team-q"], tiny_server.model).status_code == 200
    other = clients["team-a"].post(ROUTE, json={"layer": LAYER, "pairs": [
        {"positive": f"Calm {uuid.uuid4().hex}", "negative": "Angry"}]})
    assert other.status_code == 201, other.text


def test_a_sweep_larger_than_the_minute_is_refused_without_retry(tiny_server, clients):
    sweep = {"steering": {"prompts": [{"prompt": " weddings", "weight": 1}]}, "prompts": ["The weather today"],
             "layers": [LAYER], "coeffs": [1.0], "samples": 2, "max_tokens": 24}
    # (1 unsteered + 1 steered cell) x 1 prompt x 2 samples x 24 tokens = 96 > 60
    assert_quota_refusal(clients["team-q"].post("/v1/steering/sweeps", json=sweep), "capture_tokens_per_minute",
                         QUOTAS["team-q"]["capture_tokens_per_minute"], retry=False)
    allowed = clients["team-a"].post("/v1/steering/sweeps", json=sweep)
    assert allowed.status_code == 200, allowed.text


def test_one_steered_request_in_flight_refuses_the_next_until_it_ends(tiny_server, clients):
    limit = QUOTAS["team-q"]["steered_in_flight"]
    name = f"q-flight-{uuid.uuid4().hex[:6]}"
    assert upload(clients["team-a"], name, seed=300).status_code == 201  # team-a's: team-q's vectors may be full
    mine = f"q-mine-{uuid.uuid4().hex[:6]}"
    made = upload(emptied(clients["team-q"]), mine, seed=300)
    assert made.status_code == 201, made.text
    steering = {"additions": [{"vector": mine, "coeff": 1.0}]}
    long_body = held_body(tiny_server.model, "Once", steering)
    for _ in range(3):
        with stream_held_open(clients["team-q"], long_body) as status:
            assert status == 200
            second = completion(clients["team-q"], tiny_server.model, steering)
            assert completion(clients["team-q"], tiny_server.model).status_code == 200
            other = completion(clients["team-a"], tiny_server.model, {"additions": [{"vector": name, "coeff": 1.0}]})
            assert other.status_code == 200, other.text
        if second.status_code == 429:
            break
        assert second.status_code == 200, second.text
    assert_quota_refusal(second, "steered_in_flight", limit, retry=True)
    assert after_the_slot_returns(lambda: completion(clients["team-q"], tiny_server.model, steering)).status_code == 200
