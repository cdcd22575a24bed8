"""The ActAdd paper's two headline examples (Turner et al. 2023) on the default model.

Settings known to steer SmolLM2-135M-Instruct: raw continuation (/v1/completions), BOS
``<|endoftext|>`` prepended to the prompt and to each steering prompt (the tokenizer adds
none, so position 0 then cancels between the +/- prompts), nucleus sampling top_p 0.3,
repetition_penalty 1.2, 32 samples with a fixed seed. The paper's own layers (6 for
Love-Hate, padded " weddings") barely move this small model; layer 20 for weddings and
layer 2 for Love-Hate do.
"""
from __future__ import annotations

import re

import pytest
from api_helpers import BOS

pytestmark = pytest.mark.slow

SAMPLES = 32
SEED = 100


def sample(client, server, prompt: str, steering: dict | None) -> list[str]:
    extra = {"repetition_penalty": 1.2}
    if steering is not None:
        extra["steering"] = steering
    response = client.completions.create(
        model=server.model, prompt=BOS + prompt, n=SAMPLES, max_tokens=40, temperature=1.0, top_p=0.3, seed=SEED,
        extra_body=extra,
    )
    return [choice.text for choice in response.choices]


def test_weddings(client, server):
    """+1 " weddings" -1 " " at layer 20: about a third of samples mention weddings, vs ~0 unsteered."""
    steering = {"additions": [{"prompt": BOS + " weddings", "coeff": 1, "layer": 20},
                              {"prompt": BOS + " ", "coeff": -1, "layer": 20}]}
    prompt = "I went up to my friend and said"

    def rate(texts):
        return sum(bool(re.search(r"wedding", text, re.IGNORECASE)) for text in texts) / len(texts)

    unsteered, steered = rate(sample(client, server, prompt, None)), rate(sample(client, server, prompt, steering))
    assert unsteered <= 0.05, unsteered
    assert steered >= 0.15, steered


# A stated, simple measure of kindness: count words from two fixed lists in each sample.
KIND = re.compile(
    r"\b(love|loving|lovely|kind|kindness|care|caring|friends?|friendship|happy|happiness|joy|beautiful|wonderful|"
    r"amazing|grateful|thanks?|sweet|warm|warmth|support|supportive|proud|passion|heart|special|best|smile|compassion)\b",
    re.IGNORECASE,
)
UNKIND = re.compile(
    r"\b(hate|hated|hateful|stupid|ugly|annoying|idiot|worst|angry|anger|disgusting|terrible|awful|horrible|bad|mean|"
    r"rude|selfish|liar|lies?|jerk|pathetic|useless|evil|cruel|dumb|loser|failure|never)\b",
    re.IGNORECASE,
)


def kindness(texts: list[str]) -> float:
    """Mean over samples of (#kind words - #unkind words)."""
    return sum(len(KIND.findall(t)) - len(UNKIND.findall(t)) for t in texts) / len(texts)


def test_love_hate(client, server):
    """+5 "Love" -5 "Hate" at layer 2 on "I hate you because": clearly kinder."""
    steering = {"additions": [{"prompt": BOS + "Love", "coeff": 5, "layer": 2},
                              {"prompt": BOS + "Hate", "coeff": -5, "layer": 2}]}
    prompt = "I hate you because"
    unsteered, steered = kindness(sample(client, server, prompt, None)), kindness(sample(client, server, prompt, steering))
    # Measured on this model (seed 100): ~0.2 unsteered, ~1.3 steered.
    assert steered >= unsteered + 0.4, (unsteered, steered)
    assert steered >= 0.8, steered
