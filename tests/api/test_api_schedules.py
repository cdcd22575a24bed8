"""Doses and token schedules through the openai SDK against a real server, each against the
independent Hugging Face reference (``steer_server.reference``): a tiny random Llama served
in float32, greedy tokens and their log-probabilities compared step by step."""
from __future__ import annotations

import base64

import openai
import pytest
import torch
from api_helpers import error_of
from conftest import TINY_MAX_DOSE as MAX_DOSE
from conftest import http_client, sdk_client
from transformers import AutoModelForCausalLM, AutoTokenizer

from steer_server.reference import greedy_with_logprobs

pytestmark = pytest.mark.slow

HIDDEN = 128
LOGPROB_ATOL = 2e-3
STEPS = 8
QUESTION = "What should I do this weekend?"


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return tiny_server


@pytest.fixture(scope="module")
def hf(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny.model_dir, dtype=torch.float32).eval()


def inline(rows: torch.Tensor, layer: int) -> dict:
    rows = rows.float().reshape(-1, HIDDEN)
    return {"data": base64.b64encode(rows.numpy().astype("<f4").tobytes()).decode(), "dtype": "float32",
            "shape": list(rows.shape), "layer": layer}


GEN = torch.Generator().manual_seed(41)
VECTORS = {
    "a": torch.randn(1, HIDDEN, generator=GEN),
    "b": torch.randn(1, HIDDEN, generator=GEN),
    "seq": torch.randn(3, HIDDEN, generator=GEN),
}
PROMPT = [int(t) for t in torch.randint(100, 40000, (12,), generator=GEN)]

# (request steering, reference additions) — the same steering in the two vocabularies.
CASES = {
    "dose, every position": (
        {"mode": "constant", "additions": [{"vector": inline(VECTORS["a"], 1), "dose": 0.8}]},
        [{"mode": "constant", "layer": 1, "vector": VECTORS["a"], "dose": 0.8}]),
    "dose on generated tokens": (
        {"mode": "constant", "additions": [{"vector": inline(VECTORS["a"], 2), "dose": 1.5, "positions": "generated"}]},
        [{"mode": "constant", "layer": 2, "vector": VECTORS["a"], "dose": 1.5, "positions": "generated"}]),
    "ActAdd sequence at a dose": (
        {"additions": [{"vector": inline(VECTORS["seq"], 1), "dose": 2.0}]},
        [{"mode": "actadd", "layer": 1, "vector": VECTORS["seq"], "dose": 2.0}]),
    "window of generated tokens, ablation of the prompt": (
        {"mode": "constant", "additions": [{"vector": inline(VECTORS["a"], 1), "coeff": 6.0,
                                            "positions": {"start": 2, "end": 5}}],
         "ablate": [{"vector": inline(VECTORS["b"], 2), "layers": [2], "positions": "prompt"}]},
        [{"mode": "constant", "layer": 1, "vector": VECTORS["a"], "coeff": 6.0, "positions": {"start": 2, "end": 5}},
         {"mode": "ablate", "layer": 2, "vector": VECTORS["b"], "positions": "prompt"}]),
    "clamp from generated token 1 on, norm kept; two windows at one layer": (
        {"mode": "constant",
         "additions": [{"vector": inline(VECTORS["a"], 1), "coeff": 4.0, "positions": {"start": 0, "end": 3}},
                       {"vector": inline(VECTORS["b"], 1), "coeff": -3.0, "positions": {"start": 2}}],
         "clamp": [{"vector": inline(VECTORS["b"], 1), "layers": [1], "value": 2.5, "norm": "preserve",
                    "positions": {"start": 1}}]},
        [{"mode": "constant", "layer": 1, "vector": VECTORS["a"], "coeff": 4.0, "positions": {"start": 0, "end": 3}},
         {"mode": "constant", "layer": 1, "vector": VECTORS["b"], "coeff": -3.0, "positions": {"start": 2}},
         {"mode": "clamp", "layer": 1, "vector": VECTORS["b"], "value": 2.5, "norm": "preserve", "positions": {"start": 1}}]),
}


def completion(client, tiny, steering=None, prompt=PROMPT):
    response = client.completions.create(
        model=tiny.model, prompt=prompt, max_tokens=STEPS, temperature=0, logprobs=1,
        extra_body={"return_tokens_as_token_ids": True, **({"steering": steering} if steering else {})})
    choice = response.choices[0]
    tokens = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    return tokens, choice.logprobs.token_logprobs


@pytest.mark.parametrize("case", list(CASES))
def test_doses_and_schedules_match_the_reference(tiny, hf, case):
    steering, additions = CASES[case]
    client = sdk_client(tiny)
    tokens, logprobs = completion(client, tiny, steering)
    want_tokens, want_logprobs = greedy_with_logprobs(hf, PROMPT, STEPS, additions)
    assert tokens == want_tokens
    assert logprobs == pytest.approx(want_logprobs, abs=LOGPROB_ATOL)
    assert (tokens, logprobs) != completion(client, tiny)  # the steering changed something


def test_after_anchor_steers_from_the_user_message_in_chat(tiny, hf):
    """A chat's "after_anchor" starts at the first token of the last user message (found here
    from the template's character offsets), then holds for every generated token."""
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    messages = [{"role": "user", "content": QUESTION}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.rindex(QUESTION)
    anchor = next(i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > start)
    client = sdk_client(tiny)
    response = client.chat.completions.create(
        model=tiny.model, messages=messages, max_tokens=STEPS, temperature=0, logprobs=True,
        extra_body={"steering": {"mode": "constant", "additions": [
            {"vector": inline(VECTORS["a"], 1), "dose": 0.9, "positions": "after_anchor"}]}})
    got = [item.logprob for item in response.choices[0].logprobs.content]
    want_tokens, want = greedy_with_logprobs(hf, encoded["input_ids"], STEPS, [
        {"mode": "constant", "layer": 1, "vector": VECTORS["a"], "dose": 0.9, "positions": "after_anchor", "anchor": anchor}])
    assert [tokenizer.decode([t]) for t in want_tokens] == [item.token for item in response.choices[0].logprobs.content]
    assert got == pytest.approx(want, abs=LOGPROB_ATOL)


def test_the_receipt_reports_the_dose_asked_for_and_measured(tiny):
    response = sdk_client(tiny).completions.create(
        model=tiny.model, prompt=PROMPT, max_tokens=4, temperature=0,
        extra_body={"steering": {"mode": "constant", "receipt": True,
                                 "additions": [{"vector": inline(VECTORS["a"], 1), "dose": 0.5}]}})
    (layer,) = response.model_extra["steering_receipt"]["layers"]
    assert layer["doses_requested"] == [0.5]
    assert layer["dose_mean"] == pytest.approx(0.5, rel=1e-3) and layer["dose_max"] == pytest.approx(0.5, rel=1e-3)
    assert layer["prompt_tokens"] == len(PROMPT) and layer["generated_tokens"] == 3


@pytest.mark.parametrize("steering, param, words", [
    ({"additions": [{"vector": "x", "dose": 0, "layer": 1}]}, "steering.additions[0].dose", "above 0"),
    ({"additions": [{"vector": "x", "dose": -0.5, "layer": 1}]}, "steering.additions[0].dose", "above 0"),
    ({"additions": [{"vector": inline(VECTORS["a"], 1)}]}, "steering.additions[0].coeff",
     "give coeff or dose (got neither; only a stored vector has a calibrated default)"),
    ({"additions": [{"vector": "x", "coeff": 1, "dose": 0.2, "layer": 1}]}, "steering.additions[0].coeff",
     "give coeff or dose (got both)"),
    ({"mode": "constant", "additions": [{"vector": "x", "dose": 0.2, "layer": 1, "positions": {"start": 5, "end": 2}}]},
     "steering.additions[0].positions.end", "must be greater than start (5)"),
    ({"mode": "constant", "additions": [{"vector": "x", "dose": 0.2, "layer": 1, "positions": "later"}]},
     "steering.additions[0].positions", "or 'after_anchor', got 'later'"),
    ({"additions": [{"vector": inline(VECTORS["seq"], 1), "dose": 0.2, "positions": "generated"}]},
     "steering.additions[0].positions", "only applies to mode 'constant'"),
    ({"additions": [{"vector": inline(VECTORS["seq"], 1), "dose": MAX_DOSE + 1}]}, "steering.additions[0].dose",
     f"over this server's limit of {MAX_DOSE} (--max-dose)"),
    ({"mode": "constant", "additions": [{"vector": inline(VECTORS["a"], 1), "dose": 0.2},
                                        {"vector": inline(VECTORS["b"], 1), "coeff": 2.0}]},
     "steering.additions[1].coeff", "layer 1 already has a dose addition (steering.additions[0])"),
    ({"ablate": [{"vector": inline(VECTORS["a"], 1), "positions": {"start": -1}}]}, "steering.ablate[0].positions.start",
     "greater than or equal to 0"),
])
def test_bad_doses_and_schedules_are_400s_naming_the_field(tiny, steering, param, words):
    with http_client(tiny) as http:
        response = http.post("/v1/completions", json={"model": tiny.model, "prompt": PROMPT, "max_tokens": 2,
                                                      "steering": steering})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and error["message"].startswith(param + ":") and words in error["message"], error


def test_max_dose_refuses_a_coefficient_by_the_dose_it_gives_on_the_first_step(tiny, hf):
    """A coefficient's dose is ‖c·v‖ / ‖h‖: read here from the reference's unsteered streams
    entering layer 1 at the prompt, then asked just under and just over the server's limit."""
    with torch.no_grad():
        streams = hf(input_ids=torch.tensor([PROMPT]), output_hidden_states=True).hidden_states[1][0]
    dose_per_coeff = float(VECTORS["a"].norm() / streams.norm(dim=-1).min())

    def steering(coeff: float, receipt: bool = False) -> dict:
        return {"mode": "constant", "receipt": receipt,
                "additions": [{"vector": inline(VECTORS["a"], 1), "coeff": coeff, "positions": "prompt"}]}

    under = 0.9 * MAX_DOSE / dose_per_coeff
    response = sdk_client(tiny).completions.create(model=tiny.model, prompt=PROMPT, max_tokens=3, temperature=0,
                                                   extra_body={"steering": steering(under, receipt=True)})
    (layer,) = response.model_extra["steering_receipt"]["layers"]
    assert layer["dose_max"] == pytest.approx(0.9 * MAX_DOSE, rel=1e-3)

    over = 1.1 * MAX_DOSE / dose_per_coeff
    with http_client(tiny) as http:
        refused = http.post("/v1/completions", json={"model": tiny.model, "prompt": PROMPT, "max_tokens": 3,
                                                     "steering": steering(over)})
    assert refused.status_code == 400, refused.text
    error = error_of(refused)
    assert error["param"] == "steering.additions[0].coeff", error
    assert f"gave a dose of {1.1 * MAX_DOSE:.3g} at layer 1 on the first step, over this server's limit of " \
           f"{MAX_DOSE:g} (--max-dose)" in error["message"], error
    with pytest.raises(openai.BadRequestError) as streamed:  # refused before the stream starts
        sdk_client(tiny).chat.completions.create(model=tiny.model, messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=3, stream=True,
                                                 extra_body={"steering": steering(10 * over)})
    assert streamed.value.body["param"] == "steering.additions[0].coeff"
