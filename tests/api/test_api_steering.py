"""The `steering` field on /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import asyncio

import pytest
from api_helpers import LOVE_HATE, async_client
from transformers import AutoTokenizer

from steer_server.default_model import default_model_dir

pytestmark = pytest.mark.slow

PROMPT = "My favourite thing about weekends is"
MESSAGES = [{"role": "user", "content": "Tell me about your weekend."}]


def complete(client, server, prompt=PROMPT, steering=None, **kwargs):
    extra = kwargs.pop("extra_body", {})
    if steering is not None:
        extra["steering"] = steering
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model=server.model, prompt=prompt, extra_body=extra, **kwargs).choices[0].text


def chat(client, server, messages=MESSAGES, steering=None, **kwargs):
    extra = {"steering": steering} if steering is not None else {}
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("temperature", 0)
    response = client.chat.completions.create(model=server.model, messages=messages, extra_body=extra, **kwargs)
    return response.choices[0].message.content


def test_completion_steered_differs_and_unsteered_is_plain(client, server):
    plain = complete(client, server)
    assert complete(client, server, steering=LOVE_HATE) != plain
    # An explicit null, and a steering whose coefficients are all 0, change nothing.
    assert complete(client, server, extra_body={"steering": None}) == plain
    zero = {"additions": [{**a, "coeff": 0.0} for a in LOVE_HATE["additions"]]}
    assert complete(client, server, steering=zero) == plain
    assert complete(client, server) == plain  # and nothing stuck to the prompt after steering


def test_chat_steered_differs_and_unsteered_is_plain(client, server):
    plain = chat(client, server)
    assert chat(client, server, steering=LOVE_HATE) != plain
    assert chat(client, server) == plain


def _templated(messages) -> str:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_positions_fall_on_the_templated_sequence(client, server):
    """With ``"anchor": "template"`` actadd rows land on positions 0..k-1 of the token
    sequence after the chat template, so a steered chat request equals a steered completion
    of the templated text."""
    text = _templated(MESSAGES)
    assert text.startswith("<|im_start|>system")  # the template's tokens come first
    steered_chat = chat(client, server, steering={**LOVE_HATE, "anchor": "template"})
    steered_text = complete(client, server, prompt=text, steering=LOVE_HATE, extra_body={"add_special_tokens": False})
    assert steered_chat == steered_text
    assert chat(client, server) == complete(client, server, prompt=text, extra_body={"add_special_tokens": False})


def test_chat_prompt_length_counts_the_template(client, server, http):
    """Anchored at the template, a 12-token steering prompt fits a chat request whose user
    text is 1 token (the template adds ~30), but not a completion of that 1-token text."""
    long_prompt = {"additions": [{"prompt": " one two three four five six seven eight nine ten eleven twelve",
                                  "coeff": 1.0, "layer": 3}], "anchor": "template"}
    assert chat(client, server, messages=[{"role": "user", "content": "Hi"}], steering=long_prompt, max_tokens=2)
    response = http.post("/v1/completions", json={"model": server.model, "prompt": "Hi", "max_tokens": 2,
                                                   "steering": {"additions": long_prompt["additions"]}})
    assert response.status_code == 400
    assert "steering.additions[0].prompt" in response.json()["error"]["message"]


def test_vector_by_name_equals_its_prompts(client, server, http):
    """A named ActAdd vector (Love - Hate, padded) at coeff 8 steers exactly as the two
    prompt additions at +8 and -8."""
    created = http.post("/v1/steering/vectors", json={
        "name": "love-minus-hate-l4", "layer": 4,
        "additions": [{"prompt": "Love", "coeff": 1.0}, {"prompt": "Hate", "coeff": -1.0}],
    })
    assert created.status_code == 201, created.text
    by_name = complete(client, server, steering={"additions": [{"vector": "love-minus-hate-l4", "coeff": 8}]})
    by_id = complete(client, server, steering={"additions": [{"vector": created.json()["id"], "coeff": 8, "layer": 4}]})
    assert by_name == by_id == complete(client, server, steering=LOVE_HATE)


def test_constant_mode(client, server):
    plain = complete(client, server)
    pair = {"mode": "constant", "positions": "generated",
            "additions": [{"positive": "I love this", "negative": "I hate this", "coeff": 6, "layer": 6}]}
    assert complete(client, server, steering=pair) != plain
    # positions "generated" leaves the prompt alone, so the first token of a 1-token
    # completion is the unsteered one.
    assert complete(client, server, steering=pair, max_tokens=1) == complete(client, server, max_tokens=1)


async def test_concurrent_requests_keep_their_own_steering(server):
    """Steered and unsteered requests in one batch: each gets what it gets alone."""
    async with async_client(server) as aclient:
        async def one(steering, prompt):
            extra = {"steering": steering} if steering else {}
            response = await aclient.completions.create(
                model=server.model, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra
            )
            return response.choices[0].text

        cases = [(None, PROMPT), (LOVE_HATE, PROMPT), (None, "Once upon a time"), (LOVE_HATE, "Once upon a time")]
        alone = [await one(*case) for case in cases]
        together = await asyncio.gather(*(one(*case) for case in cases))
    assert alone[0] != alone[1] and alone[2] != alone[3]
    assert list(together) == alone
