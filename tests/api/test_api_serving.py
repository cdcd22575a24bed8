"""vLLM's own server keeps working under steer-server: models, health, metrics, streaming,
n, logprobs, echo, stop, usage, passed-through flags (API key, prompt-token details)."""
from __future__ import annotations

import httpx
import pytest
from api_helpers import LOVE_HATE, async_client

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def test_models_health_metrics(server, http):
    assert httpx.get(server.url + "/health").status_code == 200  # unguarded, as in vLLM
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and "vllm:" in metrics.text


def test_api_key_guards_openai_routes(server):
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_greedy_completion_is_sensible(client, server):
    response = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=3, temperature=0)
    assert "Paris" in response.choices[0].text
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 3


@pytest.mark.parametrize("steering", [None, LOVE_HATE], ids=["plain", "steered"])
def test_n_logprobs_echo_stop_usage(client, server, steering):
    extra = {"steering": steering} if steering else {}
    response = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=8, temperature=0.8, n=3,
        logprobs=2, echo=True, extra_body=extra,
    )
    assert len(response.choices) == 3
    for choice in response.choices:
        assert choice.text.startswith(PROMPT)  # echo
        assert len(choice.logprobs.top_logprobs) >= 8  # echo also returns the prompt's logprobs
    assert response.usage.prompt_tokens == 5 and 3 <= response.usage.completion_tokens <= 3 * 8
    full = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=16, temperature=0, extra_body=extra
    ).choices[0].text
    stop = full.split()[2]  # a word it is going to write
    stopped = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], extra_body=extra
    )
    assert stopped.choices[0].text == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("steering", [None, LOVE_HATE], ids=["plain", "steered"])
def test_streaming_equals_non_streaming(client, server, steering):
    extra = {"steering": steering} if steering else {}
    whole = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra)
    chunks = list(client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra,
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


async def test_async_streaming_chat(server):
    async with async_client(server) as aclient:
        messages = [{"role": "user", "content": "Say hello."}]
        whole = await aclient.chat.completions.create(
            model=server.model, messages=messages, max_tokens=10, temperature=0, extra_body={"steering": LOVE_HATE}
        )
        stream = await aclient.chat.completions.create(
            model=server.model, messages=messages, max_tokens=10, temperature=0, stream=True,
            extra_body={"steering": LOVE_HATE},
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == whole.choices[0].message.content


def test_prompt_tokens_details_flag_passed_through(client, server):
    response = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=1, temperature=0)
    assert response.usage.prompt_tokens_details is not None  # --enable-prompt-tokens-details reached vLLM


def test_openapi_shows_the_steering_field_on_the_three_steered_routes(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    components = schema["components"]["schemas"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        model = components[body["$ref"].rsplit("/", 1)[-1]]
        steering = model["properties"]["steering"]
        refs = [option.get("$ref", "") for option in steering["anyOf"]]
        assert any(ref.endswith("/SteeringField") for ref in refs), steering
        assert "prompt" in model["properties"] or "messages" in model["properties"] or "input" in model["properties"]
    field = components["SteeringField"]["properties"]
    assert {"additions", "ablate", "clamp", "mode", "positions", "receipt"} <= set(field)
