"""Fail closed at the HTTP edge: damaged stored vectors give a 503 naming the store while
vectors already in use keep working; the engine's own request keys (captures, engine
steering, vector content) are refused on every entrypoint, and a `steering` field is
either applied or refused, never ignored."""
from __future__ import annotations

import json

import pytest
import torch
from api_helpers import error_of

from steer_server.default_model import default_model_dir
from vector_store import StoredVector, VectorMeta
from vector_store.keys import model_fingerprint
from vector_store.sqlite import SqliteVectorStore

pytestmark = pytest.mark.slow

HIDDEN = 576  # SmolLM2-135M


def put(server, name: str, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    vector = StoredVector(VectorMeta(model_fingerprint(default_model_dir()), HIDDEN, "constant"),
                          {12: 6 * torch.randn(1, HIDDEN, generator=gen)})
    store = SqliteVectorStore(server.store)
    content_id = store.put(vector)
    store.set_name(name, content_id)
    return content_id


def blob(server, content_id: str):
    return server.store / "blobs" / f"{content_id}.safetensors"


def complete(http, server, steering=None):
    body = {"model": server.model, "prompt": "The best thing about Sundays is", "max_tokens": 8, "temperature": 0}
    if steering is not None:
        body["steering"] = steering
    return http.post("/v1/completions", json=body)


def by_name(name: str) -> dict:
    return {"mode": "constant", "additions": [{"vector": name, "coeff": 1.0}]}


def test_damaged_embedded_store_fails_only_what_needs_it(server, http):
    plain = complete(http, server).json()["choices"][0]["text"]
    put(server, "in-use", 1)
    first = complete(http, server, by_name("in-use"))
    assert first.status_code == 200 and first.json()["choices"][0]["text"] != plain
    blob(server, SqliteVectorStore(server.store).resolve("in-use")).unlink()
    again = complete(http, server, by_name("in-use"))
    assert again.status_code == 200, again.text  # held in memory since it was first used
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]

    blob(server, put(server, "lost-blob", 2)).unlink()
    corrupt = put(server, "corrupt-blob", 3)
    data = bytearray(blob(server, corrupt).read_bytes())
    data[-8:] = b"\xff" * 8
    blob(server, corrupt).write_bytes(bytes(data))
    for name, words in (("lost-blob", "missing"), ("corrupt-blob", "corrupted")):
        refused = complete(http, server, by_name(name))
        assert refused.status_code == 503, refused.text
        error = error_of(refused)
        assert "vector store" in error["message"] and str(server.store) in error["message"], error
        assert words in error["message"] and error["param"] == "steering.additions[0].vector"
    assert complete(http, server).json()["choices"][0]["text"] == plain


def post_routes(http) -> list[str]:
    return sorted(path for path, item in http.get("/openapi.json").json()["paths"].items() if "post" in item)


def any_body(server, **fields) -> dict:
    """A body that fits every generating entrypoint's required fields."""
    text = "Hello there, how are you today?"
    return {"model": server.model, "prompt": text, "messages": [{"role": "user", "content": text}], "input": text,
            "max_tokens": 2, "max_output_tokens": 16, **fields}


def test_every_entrypoint_refuses_the_engines_own_keys(server, http):
    routes = post_routes(http)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize"} <= set(routes)
    capture = json.dumps({"id": "x", "layers": [1, 2, 3]})
    for key, value in (("steering_capture", capture), ("steering", '{"additions": []}'), ("steering_vectors", "x")):
        for path in routes:
            response = http.post(path, json=any_body(server, vllm_xargs={key: value}))
            assert response.status_code == 400, (path, key, response.status_code, response.text)
            if not path.startswith("/v1/steering/"):
                assert f"vllm_xargs.{key}: reserved for the server itself" in error_of(response)["message"], (path, key)


def test_steering_is_applied_or_refused_on_every_entrypoint(server, http):
    steering = {"additions": [{"prompt": "Love", "coeff": 8, "layer": 4}, {"prompt": "Hate", "coeff": -8, "layer": 4}]}
    for path in post_routes(http):
        response = http.post(path, json=any_body(server, steering=steering, temperature=0, max_tokens=12))
        if path in ("/v1/completions", "/v1/chat/completions"):
            assert response.status_code == 200, (path, response.text)
            plain = http.post(path, json=any_body(server, temperature=0, max_tokens=12))
            assert response.json()["choices"] != plain.json()["choices"], path
        else:
            assert response.status_code == 400, (path, response.status_code, response.text)
            if not path.startswith("/v1/steering/"):
                assert error_of(response)["message"] == f"steering: not supported on {path}; use /v1/completions or /v1/chat/completions"


def test_startup_log_states_what_was_proven_and_chosen(server):
    log = server.log.read_text(errors="replace")
    assert "steering proven end to end" in log and "self-test passed" in log
    assert "steering table" in log and "(--steering-table-rows)" in log
