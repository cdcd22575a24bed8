"""Malformed steering: 400 naming the field, unknown vectors 404, big bodies 413; never a
500, and the server keeps serving."""
from __future__ import annotations


import httpx
import openai
import pytest
from api_helpers import error_of, raw_post
from conftest import MAX_ADDITIONS, MAX_BODY_BYTES

pytestmark = pytest.mark.slow

PROMPT = "I went up to my friend and said"  # 8 tokens


def body(server, steering, path="/v1/completions", **extra):
    if path == "/v1/completions":
        return {"model": server.model, "prompt": PROMPT, "max_tokens": 2, "steering": steering, **extra}
    if path == "/v1/responses":
        return {"model": server.model, "input": "Hi", "max_output_tokens": 2, "steering": steering, **extra}
    return {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "steering": steering, **extra}


def add(**fields):
    return {"prompt": "Love", "coeff": 1.0, "layer": 3, **fields}


CASES = [
    # (steering, status, param, words in the message)
    ({"additions": [add()], "mode": "sideways"}, 400, "steering.mode", ["'actadd' or 'constant'", "sideways"]),
    ({"additions": [add(), add(layer=31)]}, 400, "steering.additions[1].layer", ["31", "outside 0..30"]),
    ({"additions": [add(layer=-1)]}, 400, "steering.additions[0].layer", ["-1", "outside 0..30"]),
    ({"additions": [add(coeff=float("nan"))]}, 400, "steering.additions[0].coeff", ["finite"]),
    ({"additions": [add(coeff=float("inf"))]}, 400, "steering.additions[0].coeff", ["finite"]),
    ({"additions": []}, 400, "steering.additions", ["at least one addition"]),
    ({}, 400, "steering.additions", ["required"]),
    ({"additions": [add(prompt=" a b c d e f g h i j")]}, 400, "steering.additions[0].prompt",
     ["10 tokens", "only 8"]),
    ({"additions": [add()] * (MAX_ADDITIONS + 1)}, 400, "steering.additions",
     [f"{MAX_ADDITIONS + 1} additions", f"limit of {MAX_ADDITIONS}"]),
    ({"additions": [add(layer="3")]}, 400, "steering.additions[0].layer", ["integer"]),
    ({"additions": [{"prompt": "Love", "layer": 3}]}, 400, "steering.additions[0].coeff", ["give coeff or dose", "neither"]),
    ({"additions": [{"text": "Love"}]}, 400, "steering.additions[0]", ["an addition is an object"]),
    ({"additions": [add(extra=1)]}, 400, "steering.additions[0].extra", ["unknown field"]),
    ({"additions": [add()], "positions": "prompt"}, 400, "steering.positions", ["constant"]),
    ({"additions": [add()], "pad": "two words"}, 400, "steering.pad", ["single token"]),
    ({"additions": [add()], "mode": "constant"}, 400, "steering.additions[0].prompt", ["constant mode"]),
    ({"additions": [{"positive": "a", "negative": "b", "coeff": 1, "layer": 3}]}, 400, "steering.additions[0]",
     ["mode", "constant"]),
    ({"additions": [add(prompt="")]}, 400, "steering.additions[0].prompt", ["empty"]),
    ("Love", 400, "steering", ["expected an object"]),
    ({"additions": [{"vector": "no-such-vector", "coeff": 1}]}, 404, "steering.additions[0].vector",
     ["no-such-vector"]),
    ({"additions": [{"vector": "v-" + "0" * 40, "coeff": 1, "layer": 2}]}, 404, "steering.additions[0].vector",
     ["v-" + "0" * 40]),
]


# The prompt-length case needs the completions prompt; chat has test_chat_prompt_too_short.
PATHS_AND_CASES = [
    pytest.param(path, *case, id=f"{path.rsplit('/', 1)[1]}-{case[2]}-{i}")
    for path in ("/v1/completions", "/v1/chat/completions")
    for i, case in enumerate(CASES)
    if not (path == "/v1/chat/completions" and "only 8" in case[3])
]


@pytest.mark.parametrize("path,steering,status,param,words", PATHS_AND_CASES)
def test_bad_steering(server, http, path, steering, status, param, words):
    response = raw_post(http, path, body(server, steering, path))
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == status and error["param"] == param
    assert error["message"].startswith(param + ":")
    for word in words:
        assert word in error["message"]


def test_chat_prompt_too_short(server, http):
    """The length check counts from the anchor in the templated chat prompt: 'Hi' starts at
    position 24 of 31 tokens, so 7 remain from the user anchor, 31 from the template's."""
    for anchor, remaining in (("user", "7 from its anchor at position 24"), ("template", "31")):
        steering = {"additions": [add(prompt=" one" * 40)], "anchor": anchor}
        response = http.post("/v1/chat/completions", json=body(server, steering, "/v1/chat/completions"))
        assert response.status_code == 400
        message = error_of(response)["message"]
        assert message.startswith("steering.additions[0].prompt: ") and (
            f"the steering sequence has 40 tokens but the request's prompt has only {remaining}") in message, message


@pytest.mark.parametrize("path, steering, param", [
    ("/v1/completions", {"additions": [add(layer=99)]}, "steering.additions[0].layer"),
    # checked on the prompt vLLM renders, inside its handler: still before the stream starts
    ("/v1/completions", {"additions": [add(prompt=" one" * 40)]}, "steering.additions[0].prompt"),
    ("/v1/chat/completions", {"additions": [add(prompt=" one" * 40)]}, "steering.additions[0].prompt"),
    ("/v1/responses", {"additions": [add(prompt=" one" * 40)]}, "steering.additions[0].prompt"),
    ("/v1/chat/completions", {"additions": [add()], "anchor": "user"}, "steering.anchor"),
])
def test_streaming_request_is_refused_before_the_stream(server, http, path, steering, param):
    request = body(server, steering, path, stream=True)
    if param == "steering.anchor":  # a chat with no user message has nothing to anchor to
        request["messages"] = [{"role": "system", "content": "You answer in one word."}]
    response = http.post(path, json=request)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = error_of(response)
    assert error["param"] == param and error["code"] == 400 and error["message"].startswith(param + ": ")


def test_sdk_raises_bad_request(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2,
                                  extra_body={"steering": {"additions": [add(layer=99)]}})
    assert "steering.additions[0].layer" in str(caught.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body={"steering": {"additions": [{"vector": "missing", "coeff": 1}]}})


def test_oversized_body_is_413(server, http):
    big = {"model": server.model, "prompt": "x " * MAX_BODY_BYTES, "max_tokens": 1}
    response = http.post("/v1/completions", json=big)
    assert response.status_code == 413
    assert f"limit of {MAX_BODY_BYTES}" in error_of(response)["message"]

    def chunks():  # no Content-Length: the limit still holds while reading
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    streamed = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    upload = http.post("/v1/steering/vectors", content=b"\0" * (MAX_BODY_BYTES + 1),
                       headers={"Content-Type": "application/octet-stream"})
    assert upload.status_code == 413


def test_server_keeps_serving(server, client):
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=server.model, prompt=PROMPT, max_tokens=1,
                                      extra_body={"steering": {"additions": []}})
    assert httpx.get(server.url + "/health").status_code == 200
    response = client.completions.create(model=server.model, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert "Paris" in response.choices[0].text


def test_vector_of_another_model_is_refused(server, http):
    """A vector stored for other weights (written straight into the server's store)."""
    import torch

    from vector_store import StoredVector, VectorMeta, open_store

    store = open_store(str(server.store))
    foreign = StoredVector(VectorMeta("LlamaForCausalLM-h576-l30-0000000000000000", 576, "constant"), {3: torch.ones(1, 576)})
    store.set_name("foreign", store.put(foreign))
    response = http.post("/v1/completions", json=body(server, {"additions": [{"vector": "foreign", "coeff": 1}]}))
    assert response.status_code == 400
    assert "made for model LlamaForCausalLM-h576-l30-0000000000000000" in error_of(response)["message"]
    assert http.get("/v1/steering/vectors/foreign").json()["served_model"] is False


def test_an_engine_refusal_names_the_requests_own_field(server, http):
    """A vector addition without a layer becomes one engine addition per stored layer; what
    the validator refuses in a later engine addition is reported at the request's entry."""
    row = [0.01] * 576
    created = http.post("/v1/steering/vectors", json={"name": "two-layers", "layers": {"1": row, "2": row}})
    assert created.status_code == 201, created.text
    steering = {"additions": [{"vector": "two-layers", "coeff": 1}, add(coeff=1e300)]}
    response = http.post("/v1/completions", json=body(server, steering))
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "steering.additions[1].coeff", error
    assert "1e+300 times this vector overflows the model's dtype" in error["message"], error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_vllm_own_errors_still_come_from_vllm(server, http, path):
    """A steered request that vLLM itself refuses gets vLLM's 400, not a 500 from us."""
    too_long = "word " * 3000  # over --max-model-len 2048
    request = body(server, {"additions": [add()]}, path)
    if path == "/v1/completions":
        request["prompt"] = too_long
    else:
        request["messages"] = [{"role": "user", "content": too_long}]
    response = http.post(path, json=request)
    assert response.status_code == 400, response.text
    assert "steering" not in error_of(response)["message"]
    negative = http.post(path, json={**body(server, {"additions": [add()]}, path), "temperature": -1})
    assert negative.status_code == 400 and "temperature" in error_of(negative)["message"]
