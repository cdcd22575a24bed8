"""The tiny Llama through the real engine, eager, with chunked prefill (16-token steps)
and prefix caching on, against the Hugging Face reference."""
import math

import pytest
import torch

from conftest import hf_model, start_llm, stop_llm
from helpers import STREAM_TOLERANCE, engine_additions, generate, params, put_vector, reference_additions, tokens_and_logprobs
from steer_server.reference import greedy_with_logprobs, prompt_logprobs, residual_stream

LOGPROB_ATOL = 2e-3  # fp32 engine vs fp32 transformers: observed differences are ~1e-5
CHUNK = 16


@pytest.fixture(scope="module")
def setup(tiny_models, engine_store):
    model_dir = tiny_models["llama"]
    hf = hf_model(model_dir)
    gen = torch.Generator().manual_seed(7)
    prompt = [int(t) for t in torch.randint(100, 40000, (72,), generator=gen)]
    love, hate = [int(t) for t in torch.randint(100, 40000, (3,), generator=gen)], [int(t) for t in torch.randint(100, 40000, (2,), generator=gen)]
    space = 28  # any fixed pad token
    tensors = {
        # per-prompt streams, padded together, as the store computes them
        "love": residual_stream(hf, love, 1),
        "hate": residual_stream(hf, hate + [space], 1),
        "seq20": torch.randn(20, 128, generator=gen) * 2.0,
        "const": torch.randn(1, 128, generator=gen) * 2.0,
        "wide": torch.randn(1, 64, generator=gen),
    }
    ids = {name: put_vector(engine_store, model_dir, 2 if name == "const" else 1, t) for name, t in tensors.items() if name != "wide"}
    llm = start_llm(model_dir, max_num_batched_tokens=CHUNK, long_prefill_token_threshold=CHUNK, block_size=32)
    yield dict(llm=llm, hf=hf, prompt=prompt, tensors=tensors, ids=ids, model_dir=model_dir, store=engine_store)
    stop_llm(llm)


LOVE_HATE = [{"name": "love", "layer": 1, "coeff": 4.0}, {"name": "hate", "layer": 1, "coeff": -4.0}]
CONST_ALL = [{"name": "const", "layer": 2, "coeff": 1.5, "mode": "constant", "positions": "all"}]


def check_against_reference(s, output, prompt, additions):
    want_tokens, want_lp = greedy_with_logprobs(s["hf"], prompt, 8, reference_additions(additions, s["tensors"]))
    tokens, lp = tokens_and_logprobs(output)
    assert tokens == want_tokens
    assert lp == pytest.approx(want_lp, abs=LOGPROB_ATOL)


def test_mixed_batch_each_request_gets_its_own_steering(setup):
    s = setup
    short = s["prompt"][:12]
    batch = [s["prompt"], s["prompt"], short, short]
    steerings = [None, LOVE_HATE, CONST_ALL, None]
    outputs = generate(s["llm"], batch, [params(8, engine_additions(a, s["ids"]) if a else None) for a in steerings])
    for output, prompt, additions in zip(outputs, batch, steerings):
        check_against_reference(s, output, prompt, additions or [])
    # steering really moved the steered ones
    assert tokens_and_logprobs(outputs[1]) != tokens_and_logprobs(outputs[0])
    # unsteered outputs are bit-identical to the same batch with steering off
    plain = generate(s["llm"], batch, params(8))
    for i in (0, 3):
        assert tokens_and_logprobs(outputs[i]) == tokens_and_logprobs(plain[i])


def capture(llm, prompt, layers, steering=None):
    from steer_vllm.capture import capture_params, merge_worker_results, TAKE_CAPTURE_RPC
    from vllm.inputs import TokensPrompt

    capture_id, sampling = capture_params(layers)
    if steering:
        sampling.extra_args["steering"] = steering
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], [sampling], use_tqdm=False)
    return merge_worker_results(capture_id, llm.collective_rpc(TAKE_CAPTURE_RPC, args=(capture_id,)))


def test_capture_matches_reference_stream_at_every_layer(setup):
    from steer_vllm.capture import capture_residuals

    s = setup
    [got] = capture_residuals(s["llm"], [s["prompt"]], [0, 1, 2, 3])
    for layer in range(4):
        torch.testing.assert_close(got[layer], residual_stream(s["hf"], s["prompt"], layer), **STREAM_TOLERANCE)


@pytest.mark.parametrize(
    "addition, touched",
    [
        ({"name": "seq20", "layer": 1, "coeff": 2.0}, lambda p, n: p < 20),  # spans two prefill chunks
        ({"name": "const", "layer": 1, "coeff": -1.0, "mode": "constant", "positions": "all"}, lambda p, n: True),
        ({"name": "const", "layer": 1, "coeff": 3.0, "mode": "constant", "positions": "prompt"}, lambda p, n: p < n),
        ({"name": "const", "layer": 1, "coeff": 3.0, "mode": "constant", "positions": "generated"}, lambda p, n: p >= n),
    ],
    ids=["actadd-k20", "constant-all", "constant-prompt", "constant-generated"],
)
def test_steering_touches_exactly_its_positions(setup, addition, touched):
    s = setup
    prompt = s["prompt"][:40]  # three prefill chunks
    ids = dict(s["ids"], const=put_vector(s["store"], s["model_dir"], 1, s["tensors"]["const"]))
    plain = capture(s["llm"], prompt, [1, 2])
    steered = capture(s["llm"], prompt, [1, 2], engine_additions([addition], ids))
    vector = s["tensors"][addition["name"]]
    delta = steered[1] - plain[1]
    for pos in range(len(prompt)):
        want = addition["coeff"] * vector[min(pos, vector.shape[0] - 1)] if touched(pos, len(prompt)) else torch.zeros(128)
        torch.testing.assert_close(delta[pos], want, rtol=1e-4, atol=1e-4, msg=f"position {pos}")
    # and the whole model downstream sees it exactly as the reference does
    want = prompt_logprobs(s["hf"], prompt, reference_additions([addition], s["tensors"]))
    out = generate(s["llm"], [prompt], params(1, engine_additions([addition], ids), prompt_logprobs=0))[0]
    got = [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    assert got == pytest.approx(want, abs=LOGPROB_ATOL)


def test_constant_variants_match_reference_when_generating(setup):
    s = setup
    ids = dict(s["ids"], const=put_vector(s["store"], s["model_dir"], 1, s["tensors"]["const"]))
    variants = [[{"name": "const", "layer": 1, "coeff": 2.5, "mode": "constant", "positions": p}] for p in ("prompt", "generated")]
    outputs = generate(s["llm"], [s["prompt"]] * 2, [params(8, engine_additions(v, ids)) for v in variants])
    for output, additions in zip(outputs, variants):
        check_against_reference(s, output, s["prompt"], additions)


def test_prefix_cache_never_mixes_steerings(setup):
    s = setup
    prompt = s["prompt"][::-1][:70]  # unseen so far; two full 32-token KV blocks
    a, b = LOVE_HATE, [{"name": "seq20", "layer": 1, "coeff": 1.0}]
    sequence = [a, None, b, a, None]
    outputs = [generate(s["llm"], [prompt], params(8, engine_additions(x, s["ids"]) if x else None))[0] for x in sequence]
    for output, additions in zip(outputs, sequence):
        check_against_reference(s, output, prompt, additions or [])
    cached = [o.num_cached_tokens for o in outputs]
    # the first of each steering computes everything; repeats hit the cache
    assert cached[0] == 0 and cached[1] == 0 and cached[2] == 0
    assert cached[3] > 0 and cached[4] > 0


def test_bad_payloads_fail_alone_with_clear_errors(setup):
    s = setup
    store, model_dir = s["store"], s["model_dir"]
    cases = [
        ({"vector": "v-" + "0" * 40, "layer": 1, "coeff": 1.0}, "unknown vector id"),
        ({"vector": s["ids"]["love"], "layer": 4, "coeff": 1.0}, r"layer: 4 is outside 0\.\.3"),
        ({"vector": s["ids"]["seq20"], "layer": 1, "coeff": 1.0}, "has 20 tokens but the request.s prompt has only 5 "),
        ({"vector": s["ids"]["love"], "layer": 1, "coeff": math.nan}, r"steering.additions\[0\].coeff: must be a finite number"),
        ({"vector": s["ids"]["love"], "layer": 1, "coeff": math.inf}, r"steering.additions\[0\].coeff: must be a finite number"),
        ({"vector": s["ids"]["love"], "layer": 1, "coeff": 1e39}, "overflows"),
        ({"vector": put_vector(store, model_dir, 1, s["tensors"]["wide"], "constant"), "layer": 1, "coeff": 1.0}, "hidden size 64"),
        ({"vector": s["ids"]["love"], "layer": 2, "coeff": 1.0}, "has no direction for layer 2"),
        ({"vector": s["ids"]["love"], "layer": 1, "coeff": 1.0, "mode": "constant"}, "constant mode needs one row per layer"),
    ]
    for addition, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(s["llm"], [s["prompt"][:5]], params(4, {"additions": [addition]}))
    # the engine still serves, steered and not
    good = generate(s["llm"], [s["prompt"], s["prompt"]], [params(8), params(8, engine_additions(LOVE_HATE, s["ids"]))])
    check_against_reference(s, good[1], s["prompt"], LOVE_HATE)


def test_rows_are_released_when_requests_finish(setup):
    import steer_vllm

    s = setup
    generate(s["llm"], [s["prompt"]] * 3, [params(4, engine_additions(LOVE_HATE, s["ids"])), params(4, engine_additions([dict(a, coeff=a["coeff"] * 2) for a in LOVE_HATE], s["ids"])), params(4)])
    generate(s["llm"], [s["prompt"]], params(2))  # a later step tells the workers who finished
    statuses = steer_vllm.check_engine(s["llm"])
    [worker] = statuses["workers"]
    assert worker["rows_in_use"] == 0 and worker["steered_requests"] == 0
    [engine] = statuses["engines"]
    assert engine["rows_in_use"] == 0 and engine["requests"] == 0  # the scheduler's reservations too


def test_store_computes_paper_vectors_through_the_engine_once(setup, tmp_path):
    """Contrast prompts -> vectors via engine capture equal the reference computation,
    and a second request for the same computation never reaches the engine."""
    import asyncio

    from steer_vllm.capture import capture_residuals
    from vector_store import VectorStoreError, open_store
    from vector_store.async_access import AsyncStore
    from vector_store.cache import VectorCache
    from vector_store.compute import ModelInfo, VectorComputer
    from vector_store.keys import model_fingerprint
    from steer_server.reference import actadd_vector

    s = setup
    store = open_store(str(tmp_path / "store"))

    async def capture(prompts, layers):
        return capture_residuals(s["llm"], prompts, layers)

    computer = VectorComputer(AsyncStore(store, vectors=VectorCache()), capture, ModelInfo(model_fingerprint(s["model_dir"]), 128, 3), max_prompt_tokens=8)
    love, hate, pad = s["prompt"][:4], s["prompt"][10:12], 28

    love_id, hate_id = asyncio.run(computer.actadd([love, hate], 2, pad, tenant="default"))
    combined = store.get(asyncio.run(computer.combine([(love_id, 5.0), (hate_id, -5.0)], {"prompts": "love-hate"}, tenant="default"))).directions[2]
    torch.testing.assert_close(combined, actadd_vector(s["hf"], [love, hate], [5.0, -5.0], 2, pad), **STREAM_TOLERANCE)
    unpadded = asyncio.run(computer.actadd([love, hate], 2, None, tenant="default"))
    assert store.get(unpadded[1]).directions[2].shape[0] == len(hate)

    pairs = [(s["prompt"][:5], s["prompt"][20:23]), (s["prompt"][30:33], s["prompt"][40:46])]
    mean_id = asyncio.run(computer.constant(pairs, 1, tenant="default"))
    want = torch.stack([residual_stream(s["hf"], p, 1)[-1] - residual_stream(s["hf"], n, 1)[-1] for p, n in pairs]).mean(0)
    torch.testing.assert_close(store.get(mean_id).directions[1][0], want, **STREAM_TOLERANCE)

    captured = computer.captures
    assert asyncio.run(computer.actadd([love, hate], 2, pad, tenant="default")) == [love_id, hate_id]
    assert asyncio.run(computer.constant(pairs, 1, tenant="default")) == mean_id
    assert computer.captures == captured  # served from the store's computation cache

    for call, message in [
        (lambda: computer.actadd([love, []], 2, pad, tenant="default"), r"prompts\[1\]: the prompt is empty"),
        (lambda: computer.actadd([s["prompt"][:9]], 2, pad, tenant="default"), "9 tokens, over the limit of 8"),
        (lambda: computer.constant(pairs, 4, tenant="default"), "layer 4 is outside 0..3"),
    ]:
        with pytest.raises(VectorStoreError, match=message):
            asyncio.run(call())
    assert computer.captures == captured and len(store.list()) == 6  # nothing stored by the refusals
