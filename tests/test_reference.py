"""Tests of the reference ActAdd implementation (steer_server/reference.py) itself:
tiny random models of three families plus one sanity check on the default model. No vLLM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import MAKERS  # noqa: E402
from steer_server.reference import (  # noqa: E402
    actadd_vector,
    capture_residual,
    final_norm,
    forward_logits,
    greedy_with_logprobs,
    num_layers,
    prompt_logprobs,
    residual_stream,
    steering,
)

FAMILIES = sorted(MAKERS)
PAD = 216  # " " in the SmolLM2 tokenizer: the paper pads ActAdd prompts with spaces
PROMPT = [504, 3575, 282, 4649, 314, 29, 1470, 8]  # "The capital of France is" + 3 tokens


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These passes are tiny: with 2 cores shared with other processes (vLLM keeps one busy),
    intra-op threads mostly wait on each other (measured 0.7 s vs 4-8 s for 12 SmolLM2 tokens)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-models")
    models = {}
    for family, make in MAKERS.items():
        path = make(root / family)
        models[family] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return models


@pytest.fixture(params=FAMILIES)
def model(request, tiny):
    return tiny[request.param]


def _randvec(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _stream(model, ids, layer, additions=()):
    """Stream entering ``layer`` [len, H] in one full pass, as seen after the steering."""
    with torch.no_grad(), steering(model, additions), capture_residual(model, layer) as got:
        model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None])
    return got[0][0]


def test_hooks_match_hidden_states(model):
    n = num_layers(model)
    assert n == 3
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
    assert len(hs) == n + 1
    for layer in range(n):  # embeddings and every block input
        torch.testing.assert_close(residual_stream(model, PROMPT, layer), hs[layer][0], rtol=0, atol=0)
    # Layer N is the last block's output BEFORE the final norm; HF reports it after the norm.
    last = residual_stream(model, PROMPT, n)
    assert not torch.allclose(last, hs[n][0])
    with torch.no_grad():
        torch.testing.assert_close(final_norm(model)(last), hs[n][0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_zero_actadd_changes_nothing(model, layer):
    zero = {"mode": "actadd", "layer": layer, "vector": torch.zeros(3, 128), "coeff": 7.0}
    plain = greedy_with_logprobs(model, PROMPT, 6)
    steered = greedy_with_logprobs(model, PROMPT, 6, [zero])
    assert steered == plain  # tokens and log-probs bit for bit


@pytest.mark.parametrize("layer", [1, 3])
def test_actadd_changes_stream_only_below_k(model, layer):
    k, c = 3, 2.0
    vec = _randvec((k, 128), 1)
    add = [{"mode": "actadd", "layer": layer, "vector": vec, "coeff": c}]
    diff = _stream(model, PROMPT, layer, add) - _stream(model, PROMPT, layer)
    torch.testing.assert_close(diff[:k], c * vec, rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(diff[k:]) == 0
    logits_diff = (forward_logits(model, PROMPT, add) - forward_logits(model, PROMPT)).abs()
    assert logits_diff[:k].amax() > 1e-2
    if layer < num_layers(model):
        # Positions >= k are not steered directly but see the change through attention.
        later = _stream(model, PROMPT, layer + 1, add) - _stream(model, PROMPT, layer + 1)
        assert later[k:].abs().amax() > 1e-3
        assert logits_diff[k:].amax() > 1e-3
    else:
        # At layer N nothing attends any more: positions >= k keep their logits exactly.
        assert logits_diff[k:].amax() == 0


def _additions(kind, layer):
    v = _randvec((128,), 2)
    if kind == "actadd-short":
        return [{"mode": "actadd", "layer": layer, "vector": _randvec((3, 128), 3), "coeff": 1.5}]
    if kind == "actadd-long":  # longer than the prompt: the first generated positions get it too
        k = len(PROMPT) + 3
        return [{"mode": "actadd", "layer": layer, "vector": _randvec((k, 128), 4), "coeff": 1.5}]
    where = kind.split("-")[1]
    return [{"mode": "constant", "layer": layer, "vector": v, "coeff": 1.5, "positions": where,
             "prompt_len": len(PROMPT)}]


KINDS = ["actadd-short", "actadd-long", "constant-all", "constant-prompt", "constant-generated"]


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_matches_full_forward(model, kind):
    """Incremental decoding (KV cache, one token per pass) and one full pass over the same
    tokens apply the additions at the same absolute positions."""
    add = _additions(kind, layer=1)
    gaps: list = []
    tokens, logprobs = greedy_with_logprobs(model, PROMPT, 8, add, margins=gaps)
    assert len(gaps) == len(tokens) == 8 and min(gaps) >= 0
    full = prompt_logprobs(model, PROMPT + tokens, add)[len(PROMPT) - 1:]
    unsteered = prompt_logprobs(model, PROMPT + tokens)[len(PROMPT) - 1:]
    assert max(abs(a - b) for a, b in zip(full, unsteered)) > 1e-3  # the additions did act
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(full), rtol=0, atol=1e-4)
    argmax = forward_logits(model, PROMPT + tokens, add)[len(PROMPT) - 1: -1].argmax(-1)
    assert argmax.tolist() == tokens


def test_steering_works_under_hf_generate(model):
    """Positions also come out right when transformers computes them itself (generate)."""
    add = _additions("actadd-long", layer=1)
    tokens, _ = greedy_with_logprobs(model, PROMPT, 6, add)
    with steering(model, add), torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                             min_new_tokens=6, pad_token_id=2)
    assert out[0, len(PROMPT):].tolist() == tokens


@pytest.mark.parametrize("layer", [1, 3])
def test_constant_prompt_vs_generated(model, layer):
    n = len(PROMPT)
    seq = PROMPT + [1000, 2000, 3000, 4000, 5000]  # stand-in for generated tokens
    v, c = _randvec((128,), 5), 0.8
    const = lambda where: {"mode": "constant", "layer": layer, "vector": v, "coeff": c,  # noqa: E731
                           "positions": where, "prompt_len": n}
    plain = _stream(model, seq, layer)
    d_prompt = _stream(model, seq, layer, [const("prompt")]) - plain
    d_gen = _stream(model, seq, layer, [const("generated")]) - plain
    torch.testing.assert_close(d_prompt[:n], (c * v).expand(n, -1), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(d_prompt[n:]) == 0
    assert torch.count_nonzero(d_gen[:n]) == 0
    torch.testing.assert_close(d_gen[n:], (c * v).expand(len(seq) - n, -1), rtol=1e-5, atol=1e-5)
    # prompt + generated == all
    torch.testing.assert_close(
        forward_logits(model, seq, [const("prompt"), const("generated")]),
        forward_logits(model, seq, [const("all")]), rtol=1e-5, atol=1e-4)
    if layer < num_layers(model):  # steering the prompt still reaches later positions
        later = _stream(model, seq, layer + 1, [const("prompt")]) - _stream(model, seq, layer + 1)
        assert later[n:].abs().amax() > 1e-3


def test_constant_prompt_during_cached_decoding(model):
    """With a KV cache, the decode passes (positions >= prompt_len) see an unmodified stream at
    the steered layer: equal to the unsteered stream of the same tokens."""
    layer, n, c = 2, len(PROMPT), 2.0
    v = _randvec((1, 128), 6)
    add = [{"mode": "constant", "layer": layer, "vector": v, "coeff": c, "positions": "prompt",
            "prompt_len": n}]
    # Capture registered after the steering hook, so it sees the steered stream.
    with steering(model, add), capture_residual(model, layer) as got:
        tokens, _ = greedy_with_logprobs(model, PROMPT, 5)
    assert tokens == greedy_with_logprobs(model, PROMPT, 5, add)[0]
    assert [g.shape[1] for g in got] == [n, 1, 1, 1, 1]  # prompt pass, then one token per pass
    plain = _stream(model, PROMPT + tokens, layer)
    torch.testing.assert_close(got[0][0], plain[:n] + c * v, rtol=1e-5, atol=1e-4)
    decode = torch.cat([g[0] for g in got[1:]])  # positions n .. n+3
    torch.testing.assert_close(decode, plain[n:n + 4], rtol=1e-5, atol=1e-4)
    # Yet the steering of the prompt reaches the decode positions one layer up.
    with steering(model, add), capture_residual(model, layer + 1) as up:
        greedy_with_logprobs(model, PROMPT, 5)
    plain_up = _stream(model, PROMPT + tokens, layer + 1)
    assert (torch.cat([g[0] for g in up[1:]]) - plain_up[n:n + 4]).abs().amax() > 1e-3


def test_two_additions_on_one_layer_sum(model):
    v1, v2 = _randvec((2, 128), 7), _randvec((4, 128), 8)
    w1, w2 = _randvec((128,), 9), _randvec((128,), 10)
    two = [{"mode": "actadd", "layer": 1, "vector": v1, "coeff": 1.5},
           {"mode": "actadd", "layer": 1, "vector": v2, "coeff": -0.5},
           {"mode": "constant", "layer": 1, "vector": w1, "coeff": 0.3, "positions": "all"},
           {"mode": "constant", "layer": 1, "vector": w2, "coeff": 0.2, "positions": "all"}]
    summed = torch.cat([1.5 * v1, torch.zeros(2, 128)]) - 0.5 * v2
    one = [{"mode": "actadd", "layer": 1, "vector": summed, "coeff": 1.0},
           {"mode": "constant", "layer": 1, "vector": 0.3 * w1 + 0.2 * w2, "coeff": 1.0}]
    a, b = forward_logits(model, PROMPT, two), forward_logits(model, PROMPT, one)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert (a - forward_logits(model, PROMPT)).abs().amax() > 1e-2
    assert greedy_with_logprobs(model, PROMPT, 5, two)[0] == greedy_with_logprobs(model, PROMPT, 5, one)[0]


def test_actadd_vector(model):
    p, q = PROMPT[:5], PROMPT[2:5]
    zero = actadd_vector(model, [p, p], [1.0, -1.0], 2, PAD)
    assert zero.shape == (5, 128) and torch.count_nonzero(zero) == 0
    v = actadd_vector(model, [q, p], [2.0, 0.0], 1, PAD)  # q right-padded to len(p)
    torch.testing.assert_close(v, 2.0 * residual_stream(model, q + [PAD, PAD], 1), rtol=0, atol=0)
    mix = actadd_vector(model, [p, q], [1.0, -0.5], 1, PAD)
    expect = residual_stream(model, p, 1) - 0.5 * residual_stream(model, q + [PAD] * 2, 1)
    torch.testing.assert_close(mix, expect, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The default model (SmolLM2-135M-Instruct, converted from the embedded GGUF).


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer_server.default_model import default_model_dir

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


def test_default_model_is_sensible(smol):
    tok, model = smol
    ids = tok("The capital of France is").input_ids
    assert ids == [504, 3575, 282, 4649, 314]  # no BOS added
    tokens, logprobs = greedy_with_logprobs(model, ids, 4)
    assert tok.decode(tokens).startswith(" Paris")
    assert logprobs[0] > -1.0


def test_love_hate_changes_continuation(smol):
    """The paper's first example: layer 2 (the paper uses GPT-2 XL layer 6), "Love" +5,
    "Hate" -5, space-padded, with <|endoftext|> (id 0) as BOS on every prompt."""
    tok, model = smol
    bos = [0]
    love, hate = bos + tok("Love").input_ids, bos + tok("Hate").input_ids  # 2 and 3 tokens
    vec = actadd_vector(model, [love, hate], [5.0, -5.0], 2, PAD)
    assert vec.shape == (3, 576)
    assert torch.count_nonzero(vec[0]) == 0  # the shared BOS position cancels
    prompt = bos + tok("I hate you because").input_ids
    plain, _ = greedy_with_logprobs(model, prompt, 12)
    steered, _ = greedy_with_logprobs(
        model, prompt, 12, [{"mode": "actadd", "layer": 2, "vector": vec, "coeff": 1.0}])
    assert steered != plain
    print("\nplain:  ", repr(tok.decode(plain)), "\nsteered:", repr(tok.decode(steered)))


def test_projections_norm_and_anchor_do_what_they_say(model):
    """Read back at the steered layer: ablation leaves no component along u, clamping leaves
    exactly the value, norm preservation keeps each position's norm, and an anchored ActAdd
    leaves the positions before the anchor alone."""
    hidden = model.config.hidden_size
    direction, extra = _randvec(hidden, 41), _randvec((3, hidden), 42)
    unit = direction / direction.norm()
    ids = torch.tensor([PROMPT])
    plain = residual_stream(model, PROMPT, 2)

    def stream_under(additions):
        with torch.no_grad(), steering(model, additions), capture_residual(model, 2) as got:
            model(input_ids=ids, use_cache=False)
        return got[0][0]

    ablated = stream_under([{"mode": "ablate", "layer": 2, "vector": direction}])
    assert torch.allclose(ablated @ unit, torch.zeros(len(PROMPT)), atol=1e-4)
    set_to_five = stream_under([{"mode": "clamp", "layer": 2, "vector": direction, "value": 5.0}])
    assert torch.allclose(set_to_five @ unit, torch.full((len(PROMPT),), 5.0), atol=1e-4)
    clamped = stream_under([{"mode": "actadd", "layer": 2, "vector": extra, "coeff": 3.0},
                            {"mode": "clamp", "layer": 2, "vector": direction, "value": 5.0, "norm": "preserve"}])
    kept = stream_under([{"mode": "actadd", "layer": 2, "vector": extra, "coeff": 3.0, "norm": "preserve"}])
    torch.testing.assert_close(kept.norm(dim=-1), plain.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clamped.norm(dim=-1), plain.norm(dim=-1), rtol=1e-5, atol=1e-5)
    anchored = stream_under([{"mode": "actadd", "layer": 2, "vector": extra, "coeff": 3.0, "anchor": 4}])
    torch.testing.assert_close(anchored[:4], plain[:4])
    torch.testing.assert_close(anchored[4:7], plain[4:7] + 3.0 * extra, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(anchored[7:], plain[7:])
