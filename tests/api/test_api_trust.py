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


def any_body(server, path: str = "", **fields) -> dict:
    """A body that fits every generating entrypoint's required fields (the Responses API
    reads "prompt" as a prompt template, so it gets only its own)."""
    text = "Hello there, how are you today?"
    if path == "/v1/responses":
        fields.pop("max_tokens", None)
        return {"model": server.model, "input": text, "max_output_tokens": 16, **fields}
    return {"model": server.model, "prompt": text, "messages": [{"role": "user", "content": text}], "input": text,
            "max_tokens": 2, "max_output_tokens": 16, **fields}


def texts(body: dict) -> list[str]:
    """The generated text(s) of a completions, chat or responses body."""
    if "output" in body:
        return [part["text"] for item in body["output"] for part in item.get("content") or [] if "text" in part]
    return [choice.get("text") or choice["message"]["content"] for choice in body["choices"]]


def test_keys_spelled_with_json_escapes_are_read_as_written(server, http):
    """JSON lets a key be spelled with escapes; "\\u0073teering" is the steering field, and must
    be validated and applied (or refused), never dropped unseen."""
    escaped = "\\u0073teering"
    bad = f'{{"model": "{server.model}", "prompt": "Hello there", "max_tokens": 4, "{escaped}": {{"additions": []}}}}'
    response = http.post("/v1/completions", content=bad, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and error_of(response)["param"] == "steering.additions", response.text
    capture = json.dumps(json.dumps({"id": "x", "layers": [1]}))
    sneaked = (f'{{"model": "{server.model}", "prompt": "Hello there", "max_tokens": 4, '
               f'"vllm_xargs": {{"{escaped}_capture": {capture}}}}}')
    response = http.post("/v1/completions", content=sneaked, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "vllm_xargs.steering_capture: reserved for the server itself" in error_of(response)["message"]


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
        response = http.post(path, json=any_body(server, path, steering=steering, temperature=0, max_tokens=12))
        if path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
            assert response.status_code == 200, (path, response.text)
            plain = http.post(path, json=any_body(server, path, temperature=0, max_tokens=12))
            assert texts(response.json()) != texts(plain.json()), path
        else:
            assert response.status_code == 400, (path, response.status_code, response.text)
            if not path.startswith("/v1/steering/"):
                assert error_of(response)["message"] == (
                    f"steering: not supported on {path}; use /v1/completions, /v1/chat/completions, /v1/responses")


def test_startup_log_states_what_was_proven_and_chosen(server):
    log = server.log.read_text(errors="replace")
    assert "steering proven end to end" in log and "self-test passed" in log
    assert "steering table 6000 rows (--steering-table-rows)" in log  # the session server's flag
    # The session server runs with VLLM_CPU_KVCACHE_SPACE=1: the user's size wins, untouched.
    assert "chosen by steer-server" not in log and "Explicitly set (1.0/" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for vLLM's CPU build")
def test_per_request_seed_is_refused_on_cpu_and_the_engine_lives(http, server):
    """vLLM's CPU engine dies when a seeded request's prompt is prefilled in chunks; the
    server refuses such requests instead of letting one take everyone down."""
    seeded = http.post("/v1/completions", json={"model": server.model, "prompt": "Once upon a time " * 200,
                                                "max_tokens": 4, "seed": 3, "temperature": 1.0})
    assert seeded.status_code == 400, seeded.text
    error = error_of(seeded)
    assert error["message"].startswith("seed: a per-request seed is refused on vLLM's CPU build")
    assert complete(http, server).status_code == 200


def test_a_render_hook_vllm_would_not_call_refuses_the_server(monkeypatch):
    """ActAdd lengths and chat anchors are checked inside vLLM's rendering; the startup
    check names a renderer method that resolves past the hook (unwrapped, or overridden
    by a subclass), and steer-server then refuses to start."""
    from types import SimpleNamespace

    from vllm.renderers.online_renderer import OnlineRenderer

    from steer_server.serving.render_hook import install_render_hooks, render_hook_problems

    class Overriding(OnlineRenderer):
        async def render_completion(self, request, **kwargs):
            return await super().render_completion(request, **kwargs)

    def state(renderer_class):  # vLLM's app state as far as the check reads it: handlers and their renderer
        handler = SimpleNamespace(online_renderer=renderer_class.__new__(renderer_class))
        return SimpleNamespace(openai_serving_completion=handler, openai_serving_chat=handler,
                               openai_serving_responses=None)

    install_render_hooks()
    assert render_hook_problems(state(OnlineRenderer)) == []
    assert render_hook_problems(state(Overriding)) == ["the render hook Overriding.render_completion is not installed"] * 2
    monkeypatch.setattr(OnlineRenderer, "render_chat", OnlineRenderer.render_chat.__wrapped__)
    assert render_hook_problems(state(OnlineRenderer)) == ["the render hook OnlineRenderer.render_chat is not installed"] * 2



def test_the_steered_routes_take_the_places_of_vllms_and_one_of_vllms_answering_first_refuses_the_server():
    """vLLM's own routers, as its app includes them: the steered routes replace the three POST
    routes in place; the startup check names a steered path vLLM's app did not serve."""
    from fastapi import FastAPI
    from vllm.entrypoints.openai.chat_completion.api_router import router as chat_router
    from vllm.entrypoints.openai.completion.api_router import router as completion_router
    from vllm.entrypoints.openai.responses.api_router import router as responses_router

    from steer_server.serving.steered_routes import SteeringRoute, install_steered_routes, steered_route_problems

    app = FastAPI()
    for router in (completion_router, chat_router, responses_router):
        app.include_router(router)
    before = [(r.path, sorted(r.methods)) for r in app.router.routes if hasattr(r, "methods")]
    install_steered_routes(app)
    assert steered_route_problems(app) == []
    assert [(r.path, sorted(r.methods)) for r in app.router.routes if hasattr(r, "methods")] == before
    steered = [r.path for r in app.router.routes if isinstance(r, SteeringRoute)]
    assert sorted(steered) == ["/v1/chat/completions", "/v1/completions", "/v1/responses"]
    assert "/v1/responses/{response_id}" in [r.path for r in app.router.routes]  # vLLM's other routes stay

    # A route vLLM would add after the plugins (an upgrade) answers before ours: refused.
    late = FastAPI()
    late.include_router(chat_router)
    install_steered_routes(late)
    late.include_router(completion_router)
    late.router.routes.insert(0, late.router.routes.pop())
    assert steered_route_problems(late) == [
        "POST /v1/completions is answered by vllm.entrypoints.openai.completion.api_router.create_completion, "
        "not by steer-server's steered route"]


def test_routes_take_the_steering_state_as_a_dependency_and_answer_503_until_it_is_there(monkeypatch):
    """The plugin on a bare FastAPI app whose engine never came up (vLLM's render-only server):
    every route that needs the steering state gets it through its dependency, which answers
    503 naming what is missing instead of failing inside the route."""
    import asyncio
    from argparse import Namespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from vllm.entrypoints.openai.completion.api_router import router as completion_router

    from steer_server.serving.api import SteerApiPlugin

    for name in ("STEER_API_KEYS_FILE", "STEER_ADMIN_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    app = FastAPI()
    app.include_router(completion_router)  # as vLLM's app has it before the plugins attach
    app.state.args = Namespace(api_key=None)
    plugin = SteerApiPlugin()
    plugin.attach_router(app)
    asyncio.run(plugin.init_state(None, app.state, app.state.args))
    with TestClient(app) as client:
        for method, path, body in (("GET", "/v1/steering/vectors", None),
                                   ("GET", "/v1/steering/vectors/love", None),
                                   ("POST", "/v1/steering/vectors/love/calibrate", {}),
                                   ("POST", "/v1/completions", {"model": "m", "prompt": "Hi",
                                                                "steering": {"additions": [{"vector": "love", "coeff": 2, "layer": 3}]}})):
            response = client.request(method, path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert "steering is not initialised on this server" in error_of(response)["message"], path
        page = client.get("/playground")  # no keys: open, and it says there is no model yet
        assert page.status_code == 200 and '"num_layers": null' in page.text
