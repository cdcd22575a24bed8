"""Tenants through real HTTP: the session's tiny server runs with a keys file of three tenants
(``conftest.TENANT_KEYS``; API_KEY is the default tenant's admin). One tenant's vectors are
invisible to another by name and by content id, through every route that reads a vector (the
vector routes, GGUF export, steering on all three paths, the sweep and calibration routes), and a
request that names another tenant's vector is answered exactly as one naming no vector at all.
Content is stored once: shared by tenants that store the same tensors, and collected (checked in
the store on disk) when the last tenant deletes it."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from api_helpers import error_of
from conftest import API_KEY, TENANT_KEYS, TinyServer, http_client

from fleet_processes import metric_samples
from vector_store.base import VectorNotFound
from vector_store.sqlite import SqliteVectorStore

pytestmark = pytest.mark.slow

ROUTE = "/v1/steering/vectors"
HIDDEN, LAYER = 128, 2


@pytest.fixture(scope="module")
def clients(tiny_server: TinyServer) -> Iterator[dict[str, httpx.Client]]:
    """"a", "b": the tenants' admin keys; "a-inference", "b-inference": their inference keys;
    "default": API_KEY."""
    keys = {"default": API_KEY}
    for tenant, roles in TENANT_KEYS.items():
        short = tenant.removeprefix("team-")
        keys[short], keys[f"{short}-inference"] = roles["admin"], roles["inference"]
    made = {who: http_client(tiny_server, key) for who, key in keys.items()}
    yield made
    for client in made.values():
        client.close()


def rows(seed: int) -> list[float]:
    return np.random.default_rng(seed).normal(size=HIDDEN).astype(np.float32).tolist()


def create(client: httpx.Client, name: str | None, seed: int) -> str:
    body = {"layers": {str(LAYER): [rows(seed)]}} | ({"name": name} if name else {})
    response = client.post(ROUTE, json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def listed(client: httpx.Client, everything: bool = False) -> dict[str, list[str]]:
    """id -> names, over every page of the caller's listing."""
    found, after = {}, None
    while True:
        page = client.get(ROUTE, params={"all": everything, "limit": 2} | ({"after": after} if after else {})).json()
        found |= {entry["id"]: entry["names"] for entry in page["data"]}
        if not page["has_more"]:
            return found
        after = page["next_cursor"]


def steer(client: httpx.Client, model: str, steering: dict, path: str = "completions") -> httpx.Response:
    if path == "completions":
        body = {"prompt": "The weather today", "max_tokens": 2, "temperature": 0}
    elif path == "chat/completions":
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "temperature": 0}
    else:
        body = {"input": "Hello", "max_output_tokens": 2, "temperature": 0}
    return client.post(f"/v1/{path}", json={"model": model, "steering": steering, **body})


def unknown_answer(response: httpx.Response, asked: str, absent: str) -> tuple[int, dict]:
    """The response with the asked-for name or id replaced by one that names nothing stored:
    what a tenant gets for another's vector must be what it gets for no vector at all."""
    error = error_of(response)
    return response.status_code, {**error, "message": error["message"].replace(asked, absent)}


@pytest.fixture(scope="module")
def a_vector(clients) -> dict:
    """Tenant A's vector named "mood", and B's own, different "mood"."""
    name = f"mood-{uuid.uuid4().hex[:6]}"
    return {"name": name, "a": create(clients["a"], name, seed=1), "b": create(clients["b"], name, seed=2)}


def test_names_and_listings_are_each_tenants_own(clients, a_vector):
    name, a_id, b_id = a_vector["name"], a_vector["a"], a_vector["b"]
    assert a_id != b_id
    assert clients["a"].get(f"{ROUTE}/{name}").json()["id"] == a_id
    assert clients["b"].get(f"{ROUTE}/{name}").json()["id"] == b_id
    assert clients["a-inference"].get(f"{ROUTE}/{name}").json()["id"] == a_id  # a tenant's keys share its library
    a_listing, b_listing = listed(clients["a"], everything=True), listed(clients["b"], everything=True)
    assert a_listing[a_id] == [name] and b_id not in a_listing
    assert b_listing[b_id] == [name] and a_id not in b_listing
    assert a_id not in listed(clients["default"], everything=True)


@pytest.mark.parametrize("route", ["{}", "{}/gguf", "{}?norms=true"])
def test_another_tenants_vector_is_not_found_by_name_or_id(clients, a_vector, route):
    absent, a_id = "v-" + "0" * 40, a_vector["a"]  # B has a "mood" of its own: A's is reachable only by id
    response = clients["b"].get(f"{ROUTE}/" + route.format(a_id))
    assert response.status_code == 404, response.text
    missing = clients["b"].get(f"{ROUTE}/" + route.format(absent))
    assert unknown_answer(response, a_id, absent) == (missing.status_code, error_of(missing))
    only_a = f"only-a-{uuid.uuid4().hex[:6]}"
    create(clients["a"], only_a, seed=3)
    response = clients["b"].get(f"{ROUTE}/" + route.format(only_a))
    missing = clients["b"].get(f"{ROUTE}/" + route.format("no-such-name"))
    assert unknown_answer(response, only_a, "no-such-name") == (missing.status_code, error_of(missing))


def test_another_tenant_cannot_delete_or_rename_onto_a_vector(clients, a_vector):
    a_id = a_vector["a"]
    for who in ("b", "default"):
        response = clients[who].delete(f"{ROUTE}/{a_id}")
        assert response.status_code == 404, response.text
    # Naming A's content id from B's side: B does not reference it, so it cannot point a name at it.
    response = clients["b"].put(f"{ROUTE}/{a_id}/calibration", json={"layer": LAYER, "dose": 0.5})
    assert response.status_code == 404, response.text
    assert clients["a"].get(f"{ROUTE}/{a_id}").json()["names"] == [a_vector["name"]]
    assert clients["a"].get(f"{ROUTE}/{a_id}").json()["calibration"] is None


@pytest.mark.parametrize("path", ["completions", "chat/completions", "responses"])
def test_steering_with_another_tenants_vector_is_not_found(tiny_server, clients, a_vector, path):
    a_id, absent = a_vector["a"], "v-" + "0" * 40
    for steering_of in (lambda vector: {"additions": [{"vector": vector, "coeff": 1.0, "layer": LAYER}]},
                        lambda vector: {"ablate": [{"vector": vector}]}):
        response = steer(clients["b-inference"], tiny_server.model, steering_of(a_id), path)
        assert response.status_code == 404, response.text
        missing = steer(clients["b-inference"], tiny_server.model, steering_of(absent), path)
        assert unknown_answer(response, a_id, absent) == (missing.status_code, error_of(missing))
        assert steer(clients["a-inference"], tiny_server.model, steering_of(a_id), path).status_code == 200


def test_vllm_xargs_cannot_carry_another_tenants_vector(tiny_server, clients, a_vector):
    """The engine's own field is the server's to write: a client's is refused, whatever it names."""
    engine_spec = '{"additions": [{"vector": "%s", "layer": %d, "coeff": 1.0}]}' % (a_vector["a"], LAYER)
    response = clients["b"].post("/v1/completions", json={"model": tiny_server.model, "prompt": "Hi", "max_tokens": 1,
                                                          "vllm_xargs": {"steering": engine_spec}})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == "vllm_xargs.steering"


def test_the_sweep_and_calibrate_routes_see_only_the_callers_vectors(tiny_server, clients, a_vector):
    a_id = a_vector["a"]
    sweep = {"steering": {"vector": a_id}, "prompts": ["The weather today"], "layers": [LAYER], "coeffs": [1.0],
             "samples": 1, "max_tokens": 2, "temperature": 0}
    response = clients["b"].post("/v1/steering/sweeps", json=sweep)
    assert response.status_code == 404, response.text
    assert a_id in error_of(response)["message"]
    assert clients["a"].post("/v1/steering/sweeps", json=sweep).status_code == 200
    response = clients["b"].post(f"{ROUTE}/{a_id}/calibrate", json={"layers": [LAYER], "doses": [0.5],
                                                                     "lexicon": ["sun"], "store": False})
    assert response.status_code == 404, response.text


def test_the_playground_labels_the_callers_tenant(tiny_server, clients):
    for who, tenant in (("a-inference", "team-a"), ("b", "team-b"), ("default", "default")):
        page = clients[who].get("/playground")
        assert page.status_code == 200
        assert f'"tenant": "{tenant}"' in page.text


def test_shared_content_is_stored_once_and_collected_after_its_last_tenant(tiny_server, clients):
    store = SqliteVectorStore(tiny_server.store)
    a_id = create(clients["a"], "shared-a", seed=40)
    assert create(clients["b"], "shared-b", seed=40) == a_id  # the same tensors: the same content
    blob = store.blob_dir / f"{a_id}.safetensors"
    assert blob.exists()
    # A drops it: B still steers with it; A no longer finds it.
    deleted = clients["a"].delete(f"{ROUTE}/shared-a")
    assert deleted.status_code == 200 and deleted.json()["deleted"] == a_id
    assert clients["a"].get(f"{ROUTE}/{a_id}").status_code == 404
    assert steer(clients["b"], tiny_server.model, {"additions": [{"vector": "shared-b", "coeff": 1.0}]}).status_code == 200
    assert store.get(a_id).layers == [LAYER] and blob.exists()
    # B drops it too: nobody references it, so it is gone from the store.
    assert clients["b"].delete(f"{ROUTE}/{a_id}").status_code == 200
    with pytest.raises(VectorNotFound):
        store.get(a_id)
    assert not blob.exists()


def test_a_computation_made_by_one_tenant_is_the_others_when_it_asks(tiny_server, clients):
    pairs = [{"positive": f"Calm {uuid.uuid4().hex[:4]}", "negative": "Angry"}]
    made_a = clients["a"].post(ROUTE, json={"name": "calm", "layer": LAYER, "pairs": pairs})
    made_b = clients["b"].post(ROUTE, json={"name": "calm", "layer": LAYER, "pairs": pairs})
    assert made_a.status_code == made_b.status_code == 201, (made_a.text, made_b.text)
    content_id = made_a.json()["id"]
    assert made_b.json()["id"] == content_id  # answered by the cache, and now B's too
    assert listed(clients["b"])[content_id] == ["calm"]
    assert clients["a"].delete(f"{ROUTE}/calm").status_code == 200
    assert clients["b"].get(f"{ROUTE}/calm").json()["id"] == content_id


def test_calibrations_are_each_tenants_own(tiny_server, clients):
    content_id = create(clients["a"], "cal-a", seed=50)
    assert create(clients["b"], "cal-b", seed=50) == content_id
    response = clients["a"].put(f"{ROUTE}/cal-a/calibration", json={"layer": LAYER, "dose": 0.5})
    assert response.status_code == 200, response.text
    assert clients["a"].get(f"{ROUTE}/cal-a").json()["calibration"]["dose"] == 0.5
    assert clients["b"].get(f"{ROUTE}/cal-b").json()["calibration"] is None
    assert steer(clients["a"], tiny_server.model, {"additions": [{"vector": "cal-a"}]}).status_code == 200
    refused = steer(clients["b"], tiny_server.model, {"additions": [{"vector": "cal-b"}]})
    assert refused.status_code == 400 and "no calibrated default" in error_of(refused)["message"]


def test_inference_keys_write_nothing_in_their_own_tenant(clients):
    response = clients["a-inference"].post(ROUTE, json={"name": "nope", "layers": {str(LAYER): [rows(9)]}})
    assert response.status_code == 403
    assert "'inference' role" in error_of(response)["message"]


def test_steering_metrics_carry_the_tenant(tiny_server, clients, a_vector):
    """The tiny server runs with --metrics-tenant-label."""
    def count(tenant: str) -> float:
        samples = metric_samples(httpx.get(tiny_server.url + "/metrics").text)
        return sum(value for key, value in samples.items()
                   if key.startswith("steer_requests_total{") and f'tenant="{tenant}"' in key)

    before = count("team-b")
    assert steer(clients["b"], tiny_server.model, {"additions": [{"vector": a_vector["name"], "coeff": 1.0}]}).status_code == 200
    assert count("team-b") - before == 1


def test_a_long_unknown_name_is_not_echoed_whole(tiny_server, clients):
    name = "n" * 10_000
    for response in (steer(clients["a"], tiny_server.model, {"additions": [{"vector": name, "coeff": 1.0}]}),
                     clients["a"].get(f"{ROUTE}/{name}")):
        assert response.status_code == 404
        message = error_of(response)["message"]
        assert "(10000 characters)" in message and len(message) < 300, message
