"""Beyond addition, through the openai SDK against a real server: chat steering anchored
at the user's message, ablation and clamping, receipts of what was applied, inline
vectors, and the Responses API."""
from __future__ import annotations

import base64

import pytest
import torch
from api_helpers import error_of
from transformers import AutoTokenizer

from steer_server.default_model import default_model_dir

pytestmark = pytest.mark.slow

HIDDEN = 576
WEDDINGS = {"additions": [{"prompt": " weddings", "coeff": 6, "layer": 15}, {"prompt": " ", "coeff": -6, "layer": 15}]}
QUESTION = "What should I do this weekend?"


@pytest.fixture(scope="module")
def direction(http):
    """A stored constant direction: the last-token difference of two prompts at layer 12."""
    created = http.post("/v1/steering/vectors", json={"name": "formal-casual", "layer": 12,
                                                      "pairs": [{"positive": "Dear Sir,", "negative": "hey dude"}]})
    assert created.status_code == 201, created.text
    return created.json()


def chat(client, server, steering=None, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    extra = dict(kwargs.pop("extra_body", {}), **({"steering": steering} if steering else {}))
    return client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": QUESTION}],
                                          extra_body=extra, **kwargs)


def test_chat_actadd_starts_at_the_user_message(client, server):
    """The first prompt log-probability that steering changes is the one right after the
    first token of the user's content: positions before it are untouched."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=False)
    start = text.rindex(QUESTION)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    anchor = next(i for i, (_, end) in enumerate(offsets) if end > start)  # the token holding its first character

    def prompt_logprobs(steering):
        response = chat(client, server, steering, max_tokens=1, extra_body={"prompt_logprobs": 0})
        return response.model_extra["prompt_logprobs"]

    plain = prompt_logprobs(None)
    for steering, first_changed in ((WEDDINGS, anchor + 1), ({**WEDDINGS, "anchor": "template"}, 1)):
        steered = prompt_logprobs(steering)
        changed = [i for i, (a, b) in enumerate(zip(plain, steered)) if a != b]
        assert changed and changed[0] == first_changed, (steering.get("anchor"), changed[:3], anchor)
    answer = chat(client, server, WEDDINGS, max_tokens=40).choices[0].message.content
    assert answer != chat(client, server, max_tokens=40).choices[0].message.content


def test_anchor_applies_to_chat_only(http, server):
    response = http.post("/v1/completions", json={"model": server.model, "prompt": QUESTION, "max_tokens": 2,
                                                  "steering": {**WEDDINGS, "anchor": "user"}})
    assert response.status_code == 400
    assert error_of(response)["param"] == "steering.anchor"


def test_ablate_and_clamp_in_one_batch(client, server, direction):
    import asyncio

    from api_helpers import async_client

    steerings = [
        None,
        {"ablate": [{"vector": "formal-casual", "layers": "all"}]},
        {"clamp": [{"vector": "formal-casual", "layers": [12], "value": 40.0, "norm": "preserve"}]},
        {"mode": "constant", "additions": [{"vector": "formal-casual", "coeff": 6, "layer": 12}],
         "ablate": [{"vector": "formal-casual", "layers": [20]}]},
    ]

    async def run():
        aclient = async_client(server)
        return await asyncio.gather(*(aclient.completions.create(
            model=server.model, prompt="Write to the bank manager:", max_tokens=16, temperature=0,
            extra_body={"steering": s} if s else {}) for s in steerings))

    texts = [r.choices[0].text for r in asyncio.run(run())]
    assert len(set(texts)) == len(texts), texts  # each operation changed the answer its own way
    alone = client.completions.create(model=server.model, prompt="Write to the bank manager:", max_tokens=16,
                                      temperature=0, extra_body={"steering": steerings[1]}).choices[0].text
    assert alone == texts[1]  # and batching did not mix them


@pytest.mark.parametrize("steering, param, words", [
    ({"ablate": [{"vector": "formal-casual", "layers": 3}], "clamp": [{"vector": "formal-casual", "layers": 3, "value": 1}]},
     "steering.clamp[0].layers", ["layer 3 already has an ablate or clamp"]),
    ({"ablate": [{"vector": "formal-casual", "layers": 99}]}, "steering.ablate[0].layers", ["99", "outside 0..30"]),
    ({"clamp": [{"vector": "formal-casual", "value": float("inf")}]}, "steering.clamp[0].value", ["finite"]),
    ({"ablate": [{"vector": "nope"}]}, "steering.ablate[0].vector", ["nope"]),
])
def test_bad_operations_name_the_field(http, server, direction, steering, param, words):
    from api_helpers import raw_post

    response = raw_post(http, "/v1/completions", {"model": server.model, "prompt": "Hi", "max_tokens": 2, "steering": steering})
    assert response.status_code in (400, 404), response.text
    error = error_of(response)
    assert error["param"] == param and all(w in error["message"] for w in words), error


def test_receipts_report_what_was_applied(client, server, direction):
    prompt = "I went up to my friend and said"
    prompt_len = len(AutoTokenizer.from_pretrained(default_model_dir()).encode(prompt))
    steering = {"additions": [{"prompt": " weddings", "coeff": 4, "layer": 6}],
                "ablate": [{"vector": "formal-casual", "layers": [6, 20]}], "receipt": True}
    plain = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0)
    assert "steering_receipt" not in (plain.model_extra or {})
    response = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0,
                                         extra_body={"steering": steering})
    receipt = response.model_extra["steering_receipt"]
    layers = {entry["layer"]: entry for entry in receipt["layers"]}
    assert set(layers) == {6, 20}
    assert layers[6]["operations"] == ["add", "ablate"] and layers[20]["operations"] == ["ablate"]
    # ablation acts at every position the model computes: the prompt, and every generated
    # token but the last (which is never fed back)
    for entry in layers.values():
        assert entry["prompt_tokens"] == prompt_len and entry["generated_tokens"] == 5
        assert 0 < entry["dose_mean"] <= entry["dose_max"]

    actadd_only = {"additions": [{"prompt": " weddings", "coeff": 4, "layer": 6}], "receipt": True}
    stream = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                       extra_body={"steering": actadd_only})
    chunks = list(stream)
    receipts = [c.model_extra.get("steering_receipt") for c in chunks if c.model_extra]
    receipts = [r for r in receipts if r]
    assert len(receipts) == 1 and chunks[-1].model_extra.get("steering_receipt") == receipts[0]
    (entry,) = receipts[0]["layers"]
    assert entry["prompt_tokens"] == 1 and entry["generated_tokens"] == 0  # " weddings" is one token
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    again = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"steering": actadd_only})
    assert text == again.choices[0].text


def encode(tensor: torch.Tensor, dtype: str) -> str:
    as_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return base64.b64encode(tensor.to(as_dtype).contiguous().view(torch.uint8).numpy().tobytes()).decode()


def test_inline_vectors_steer_like_stored_ones(client, http, server):
    gen = torch.Generator().manual_seed(5)
    vector = (torch.randn(HIDDEN, generator=gen) * 4).to(torch.bfloat16).float()  # exact in every dtype below
    stored = http.post("/v1/steering/vectors", json={"name": "inline-twin", "layers": {"9": vector.tolist()}})
    assert stored.status_code == 201

    def complete(addition):
        return client.completions.create(model=server.model, prompt="The weather today", max_tokens=10, temperature=0,
                                         extra_body={"steering": {"mode": "constant", "additions": [addition]}}).choices[0].text

    by_name = complete({"vector": "inline-twin", "coeff": 1.5})
    for dtype in ("float32", "float16", "bfloat16"):
        inline = {"data": encode(vector, dtype), "dtype": dtype, "shape": [HIDDEN], "layer": 9}
        assert complete({"vector": inline, "coeff": 1.5}) == by_name, dtype


@pytest.mark.parametrize("inline, param, words", [
    ({"data": "not base64!", "shape": [HIDDEN], "layer": 9}, "steering.additions[0].vector.data", ["base64"]),
    ({"data": base64.b64encode(b"\0" * 8).decode(), "shape": [HIDDEN], "layer": 9}, "steering.additions[0].vector.data",
     ["8 bytes", str(HIDDEN * 4)]),
    ({"data": "AAAA", "shape": [3], "layer": 9}, "steering.additions[0].vector.shape", [str(HIDDEN)]),
    ({"data": encode(torch.full((HIDDEN,), float("nan")), "float32"), "shape": [HIDDEN], "layer": 9},
     "steering.additions[0].vector.data", ["NaN"]),
    ({"data": "AAAA", "shape": [HIDDEN]}, "steering.additions[0].vector.layer", ["required"]),
])
def test_malformed_inline_vectors_name_the_field(http, server, inline, param, words):
    response = http.post("/v1/completions", json={"model": server.model, "prompt": "Hi", "max_tokens": 2, "steering": {
        "mode": "constant", "additions": [{"vector": inline, "coeff": 1.0}]}})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and all(w in error["message"] for w in words), error


def test_responses_api_steers_like_chat(client, server):
    def create(steering=None, **kwargs):
        return client.responses.create(model=server.model, input=QUESTION, max_output_tokens=16, temperature=0,
                                       extra_body={"steering": steering} if steering else {}, **kwargs)

    plain, steered = create().output_text, create(WEDDINGS).output_text
    assert steered != plain
    assert steered == chat(client, server, WEDDINGS, max_tokens=16).choices[0].message.content

    events = list(create({**WEDDINGS, "receipt": True}, stream=True))
    completed = [e for e in events if e.type == "response.completed"]
    assert completed[0].response.output_text == steered
    receipt = completed[0].response.model_extra["steering_receipt"]
    assert receipt["layers"][0]["layer"] == 15 and receipt["layers"][0]["prompt_tokens"] == 1
