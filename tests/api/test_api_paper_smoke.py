"""The ActAdd paper's two headline examples (Turner et al. 2023) on the default model.

Settings known to steer SmolLM2-135M-Instruct: raw continuation (/v1/completions), BOS
``<|endoftext|>`` prepended to the prompt and to each steering prompt (the tokenizer adds
none, so position 0 then cancels between the +/- prompts), nucleus sampling top_p 0.3,
repetition_penalty 1.2, 32 samples (the server's --seed; vLLM's CPU build refuses a
per-request seed). The settings are those EVALUATION.md measured: " weddings" - " " at
layer 18 with coefficient 4 (47% mention weddings, 0% unsteered); Love - Hate (5) at
layer 0 on hostile openings, by VADER sentiment. The server runs the model in float32, as
`steer-server serve` does on a CPU without bfloat16 instructions (EVALUATION.md, "Precision
on CPU").
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from api_helpers import BOS

pytestmark = pytest.mark.slow

SAMPLES = 32


def sample(client, server, prompt: str, steering: dict | None, n: int = SAMPLES) -> list[str]:
    extra = {"repetition_penalty": 1.2}
    if steering is not None:
        extra["steering"] = steering
    # a long timeout: every request is answered only when the whole batch is (minutes on a slow machine)
    response = client.with_options(timeout=900).completions.create(
        model=server.model, prompt=BOS + prompt, n=n, max_tokens=40, temperature=1.0, top_p=0.3,
        extra_body=extra,
    )
    return [choice.text for choice in response.choices]


def test_weddings(client, server):
    """+4 " weddings" -4 " " at layer 18: about half of the samples mention weddings, vs ~0 unsteered."""
    steering = {"additions": [{"prompt": BOS + " weddings", "coeff": 4, "layer": 18},
                              {"prompt": BOS + " ", "coeff": -4, "layer": 18}]}
    prompt = "I went up to my friend and said"

    def rate(texts):
        return sum(bool(re.search(r"wedding", text, re.IGNORECASE)) for text in texts) / len(texts)

    with ThreadPoolExecutor(2) as pool:  # both at once: the server batches them
        unsteered, steered = map(rate, pool.map(lambda steer: sample(client, server, prompt, steer), (None, steering)))
    # Unsteered, about 2% mention weddings (EVALUATION.md); more than 4 of 32 at that rate is a
    # 1-in-2400 draw. Which samples come depends on what the seeded server sampled before.
    assert unsteered <= 4 / SAMPLES, unsteered
    assert steered >= 0.15, steered


def test_love_hate(client, server):
    """+5 "Love" -5 "Hate" at layer 0 on the 16 hostile openings the eval ships, 8 samples
    each: the mean VADER sentiment rises (EVALUATION.md measured +0.20 -> +0.39 in bfloat16,
    +0.16 -> +0.50 in float32)."""
    from steer_server.measure.data import hostile_prompts
    from steer_server.measure.metrics import sentiment

    steering = {"additions": [{"prompt": BOS + "Love", "coeff": 5, "layer": 0},
                              {"prompt": BOS + "Hate", "coeff": -5, "layer": 0}]}

    def mean_sentiment(texts: list[str]) -> float:
        return sum(map(sentiment, texts)) / len(texts)

    # Every request at once (2 x 16 prompts, 8 samples each): the server batches them.
    jobs = [(prompt, steer) for steer in (None, steering) for prompt in hostile_prompts()]
    with ThreadPoolExecutor(len(jobs)) as pool:
        samples = list(pool.map(lambda job: sample(client, server, job[0], job[1], n=8), jobs))
    half = len(hostile_prompts())
    unsteered = mean_sentiment([text for texts in samples[:half] for text in texts])
    steered = mean_sentiment([text for texts in samples[half:] for text in texts])
    assert steered > unsteered + 0.05, (unsteered, steered)
