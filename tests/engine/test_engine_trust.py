"""Steering fails closed inside the engine: a request either gets exactly the steering it
asked for (checked against the Hugging Face reference) or an error; never a silent
unsteered answer. Missing hooks, unsupported configurations and foreign captures are
refused; prompt embeddings and n-gram speculative decoding steer exactly."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import hf_model, start_llm, stop_llm
from helpers import engine_additions, generate, params, put_vector, reference_additions, tokens_and_logprobs
from steer_server.reference import greedy_with_logprobs, residual_stream

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 2e-3


def check_exact(hf, output, prompt, additions, tensors, max_tokens=6):
    want_tokens, want_lp = greedy_with_logprobs(hf, prompt, max_tokens, reference_additions(additions, tensors))
    tokens, lp = tokens_and_logprobs(output)
    assert tokens == want_tokens
    assert lp == pytest.approx(want_lp, abs=LOGPROB_ATOL)


@pytest.fixture(scope="module")
def llama(tiny_models, engine_store):
    model_dir = tiny_models["llama"]
    gen = torch.Generator().manual_seed(23)
    prompts = [[int(t) for t in torch.randint(100, 40000, (16,), generator=gen)] for _ in range(10)]
    return dict(model_dir=model_dir, hf=hf_model(model_dir), store=engine_store, prompts=prompts, gen=gen)


@pytest.fixture(scope="module")
def llama_engine(llama):
    """ONE engine with the tests' default settings for the tests below that need nothing else
    of theirs (each uses prompts and vectors of its own, and counts from what it found)."""
    llm = start_llm(llama["model_dir"])
    try:
        yield llm
    finally:
        stop_llm(llm)


def test_small_table_admits_requests_only_with_their_rows(llama, monkeypatch):
    """Ten requests, each with its own 6-row ActAdd sequence, against a table of 13 rows:
    at most two run at once; the others wait for rows instead of running unsteered."""
    s = llama
    tensors, ids, cases = {}, {}, []
    for i, prompt in enumerate(s["prompts"]):
        name = f"seq{i}"
        tensors[name] = residual_stream(s["hf"], prompt[:6], 1)
        ids[name] = put_vector(s["store"], s["model_dir"], 1, tensors[name])
        cases.append([{"name": name, "layer": 1, "coeff": 3.0}])
    monkeypatch.setenv("STEER_TABLE_ROWS", "13")
    llm = start_llm(s["model_dir"], max_num_seqs=10)
    try:
        outputs = generate(llm, s["prompts"], [params(6, engine_additions(c, ids)) for c in cases])
        status = llm.llm_engine.engine_core.call_utility("steer_engine_status")
        too_big = put_vector(s["store"], s["model_dir"], 1, torch.randn(13, 128, generator=s["gen"]))
        with pytest.raises(Exception, match=r"needs 13 rows of the steering table, which has 12 \(--steering-table-rows\)"):
            generate(llm, [s["prompts"][0]], params(2, {"additions": [{"vector": too_big, "layer": 1, "coeff": 1.0}]}))
        survivor = generate(llm, [s["prompts"][1]], params(6, engine_additions(cases[1], ids)))[0]
    finally:
        stop_llm(llm)
    assert status["waits"] > 0 and status["capacity"] == 12  # requests did wait for rows
    assert status["rows_in_use"] == 0 and status["errors"] == 0
    for output, prompt, additions in zip(outputs, s["prompts"], cases):
        check_exact(s["hf"], output, prompt, additions, tensors)
    check_exact(s["hf"], survivor, s["prompts"][1], cases[1], tensors)


def test_vector_deleted_while_queued_still_steers_with_validated_content(llama, llama_engine):
    """Content ids are immutable and the request carries its vectors: deleting the vector
    from the store after the request was accepted changes nothing for that request."""
    from vllm.inputs import TokensPrompt

    s = llama
    prompt = s["prompts"][2]
    tensors = {"doomed": residual_stream(s["hf"], prompt[:5], 2)}
    doomed = put_vector(s["store"], s["model_dir"], 2, tensors["doomed"])
    additions = [{"name": "doomed", "layer": 2, "coeff": 4.0}]
    engine = llama_engine.llm_engine
    engine.add_request("queued", TokensPrompt(prompt_token_ids=prompt), params(6, engine_additions(additions, {"doomed": doomed})))
    s["store"].delete(doomed)  # accepted, not yet scheduled
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id.split("-")[0]: o for o in engine.step() if o.finished})
    check_exact(s["hf"], finished["queued"], prompt, additions, tensors)


def test_request_that_bypasses_the_frontend_ends_with_an_error_alone(llama, llama_engine, monkeypatch):
    """A steered request that reaches the engine without its vectors (as if vLLM had
    stopped calling the frontend hook) is ended with an error by the scheduler before any
    worker runs it; its neighbour is served."""
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.input_processor import InputProcessor

    s = llama
    prompt = s["prompts"][3]
    vector = put_vector(s["store"], s["model_dir"], 1, torch.randn(1, 128, generator=s["gen"]), kind="constant")
    steering = {"additions": [{"vector": vector, "layer": 1, "coeff": 1.0, "mode": "constant"}]}
    engine = llama_engine.llm_engine
    errors_before = engine.engine_core.call_utility("steer_engine_status")["errors"]
    with monkeypatch.context() as patched:
        patched.setattr(InputProcessor, "process_inputs", InputProcessor.process_inputs.__wrapped__)
        engine.add_request("smuggled", TokensPrompt(prompt_token_ids=prompt), params(4, steering))
    engine.add_request("neighbour", TokensPrompt(prompt_token_ids=prompt), params(4))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id.split("-")[0]: o for o in engine.step() if o.finished})
    status = engine.engine_core.call_utility("steer_engine_status")
    assert finished["smuggled"].outputs[0].finish_reason == "error"
    assert finished["smuggled"].outputs[0].token_ids == []  # nothing unsteered was delivered
    assert finished["neighbour"].outputs[0].finish_reason == "length"
    assert status["errors"] == errors_before + 1


def _occupy_free_worker_rows(worker) -> None:
    """Fault injection: take every free table row in the worker behind the scheduler's back."""
    from steer_vllm.plans import plan_layers
    from steer_vllm.spec import EngineSteering

    table = worker.model_runner._steering.table
    rows = table.capacity - table.rows_in_use
    steering = EngineSteering.model_validate({"additions": [{"vector": "v-filler", "layer": 1, "coeff": 1.0}]})
    (plan,) = plan_layers(steering, lambda a: rows)
    table.acquire(plan, lambda a: torch.ones(rows, 128))
    worker.steer_test_filler_key = plan.key


def _release_filler_rows(worker) -> None:
    worker.model_runner._steering.table.release(worker.steer_test_filler_key)


def test_worker_that_cannot_place_a_request_ends_it_with_an_error(llama, monkeypatch):
    """Should a worker fail to place a request's steering, the request ends with an error
    and none of the tokens computed for it is delivered; its neighbour is served. The KV
    computed for it (unsteered, under its steered cache salt) is never reused: the same
    request afterwards hits no cached block and steers exactly."""
    s = llama
    prompt = s["prompts"][6] + s["prompts"][7] + s["prompts"][8] + s["prompts"][9]  # 64 tokens: two full blocks
    tensors = {"const": torch.randn(1, 128, generator=s["gen"])}
    ids = {"const": put_vector(s["store"], s["model_dir"], 1, tensors["const"], kind="constant")}
    additions = [{"name": "const", "layer": 1, "coeff": 2.0, "mode": "constant"}]
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker lives in this process
    monkeypatch.setenv("STEER_TABLE_ROWS", "9")
    llm = start_llm(s["model_dir"], block_size=32)
    try:
        generate(llm, [prompt], params(1))  # the workers learn that the self-test's requests finished
        llm.collective_rpc(_occupy_free_worker_rows)
        failed, neighbour = generate(llm, [prompt, prompt], [params(4, engine_additions(additions, ids)), params(4)])
        status = llm.llm_engine.engine_core.engine_core.steer_engine_status()
        llm.collective_rpc(_release_filler_rows)
        again = generate(llm, [prompt], params(4, engine_additions(additions, ids)))[0]
    finally:
        stop_llm(llm)
    assert failed.outputs[0].finish_reason == "error" and failed.outputs[0].token_ids == []
    assert neighbour.outputs[0].finish_reason == "length" and len(neighbour.outputs[0].token_ids) == 4
    assert status["errors"] == 1 and status["rows_in_use"] == 0
    assert again.num_cached_tokens == 0
    want_tokens, want_lp = greedy_with_logprobs(s["hf"], prompt, 4, reference_additions(additions, tensors))
    tokens, lp = tokens_and_logprobs(again)
    assert tokens == want_tokens and lp == pytest.approx(want_lp, abs=2e-3)


def test_captures_from_outside_and_unchecked_anchors_are_refused(llama, llama_engine):
    """Captures the server did not make, and ActAdd whose anchor the server's render hook
    never set (``anchor_to`` still open), end their own request with an error."""
    s = llama
    vector = put_vector(s["store"], s["model_dir"], 1, torch.randn(2, 128, generator=s["gen"]))
    llm = llama_engine
    for anchor_to in ("prompt", "user"):
        unchecked = params(1, {"additions": [{"vector": vector, "layer": 1, "coeff": 1.0}], "anchor_to": anchor_to})
        with pytest.raises(Exception, match=rf"steering.anchor: .*anchor_to '{anchor_to}' is still open"):
            generate(llm, [s["prompts"][4]], unchecked)
    forged = params(1)
    forged.extra_args = {"steering_capture": {"id": "x", "layers": [0, 1, 2, 3]}}
    with pytest.raises(Exception, match="steering_capture: reserved for the server's own residual captures"):
        generate(llm, [s["prompts"][4]], forged)
    stolen = params(1)
    stolen.extra_args = {"steering_capture": {"id": "y", "layers": [1], "token": "0" * 32}}
    with pytest.raises(Exception, match="steering_capture: reserved"):
        generate(llm, [s["prompts"][4]], stolen)
    assert generate(llm, [s["prompts"][4]], params(2))[0].outputs[0].finish_reason == "length"


def test_prompt_embeddings_steer_like_their_tokens(llama):
    """Prompt embeddings carry no token ids; the prompt length (constant ``prompt`` /
    ``generated`` positions, ActAdd length checks) comes from the embeddings."""
    from vllm.inputs import EmbedsPrompt

    s = llama
    prompt = s["prompts"][5]
    tensors = {"seq": residual_stream(s["hf"], prompt[:4], 1), "const": torch.randn(1, 128, generator=s["gen"])}
    ids = {"seq": put_vector(s["store"], s["model_dir"], 1, tensors["seq"]),
           "const": put_vector(s["store"], s["model_dir"], 2, tensors["const"], kind="constant")}
    additions = [{"name": "seq", "layer": 1, "coeff": 3.0},
                 {"name": "const", "layer": 2, "coeff": 2.0, "mode": "constant", "positions": "prompt"}]
    with torch.no_grad():
        embeds = s["hf"].get_input_embeddings()(torch.tensor(prompt)).float()
    llm = start_llm(s["model_dir"], enable_prompt_embeds=True, enable_prefix_caching=False)
    try:
        out = llm.generate([EmbedsPrompt(prompt_embeds=embeds)], [params(6, engine_additions(additions, ids))], use_tqdm=False)[0]
    finally:
        stop_llm(llm)
    check_exact(s["hf"], out, prompt, additions, tensors)


def test_ngram_speculative_decoding_steers_exactly(llama, tiny_models):
    """Draft tokens are verified at generated positions, so they get the generated rows.
    The tiny GPT-2 repeats itself (its embeddings are tied); the prompt is the first one
    whose greedy continuation repeats a token early, so the n-gram proposer has drafts."""
    s = llama
    model_dir = tiny_models["gpt2"]
    hf = hf_model(model_dir)

    def repeats_early(prompt: list[int]) -> bool:
        tokens, _ = greedy_with_logprobs(hf, prompt, 8)
        return any(token in prompt + tokens[:i] for i, token in enumerate(tokens))

    prompt = next(p for p in s["prompts"] if repeats_early(p))
    tensors = {"const": torch.randn(1, 128, generator=s["gen"]) * 0.1, "seq": residual_stream(hf, prompt[:5], 2)}
    ids = {"const": put_vector(s["store"], model_dir, 1, tensors["const"], kind="constant"),
           "seq": put_vector(s["store"], model_dir, 2, tensors["seq"])}
    cases = [[], [{"name": "const", "layer": 1, "coeff": 1.5, "mode": "constant", "positions": "generated"}],
             [{"name": "seq", "layer": 2, "coeff": 0.5}]]
    speculative = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    llm = start_llm(model_dir, speculative_config=speculative, disable_log_stats=False)
    try:
        outputs = generate(llm, [prompt] * 3, [params(16, engine_additions(c, ids) if c else None) for c in cases])
        drafted = {m.name: m for m in llm.get_metrics()}.get("vllm:spec_decode_num_draft_tokens")
    finally:
        stop_llm(llm)
    assert drafted is not None and drafted.value > 0  # the proposer really proposed
    for output, additions in zip(outputs, cases):
        want_tokens, want_lp = greedy_with_logprobs(hf, prompt, 16, reference_additions(additions, tensors))
        tokens, lp = tokens_and_logprobs(output)
        assert tokens == want_tokens
        assert lp == pytest.approx(want_lp, abs=LOGPROB_ATOL)


def test_missing_runner_hook_refuses_the_engine(llama, monkeypatch):
    """If vLLM stops resolving a hooked method to our wrapper, the engine is refused with
    the hook's name (the engine core runs in this process so the class change applies)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import steer_vllm

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(GPUModelRunner, "_model_forward", GPUModelRunner._model_forward.__wrapped__)
    from vllm import LLM

    llm = LLM(model=llama["model_dir"], dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4)
    try:
        with pytest.raises(steer_vllm.SteeringNotInstalled, match=r"hook _model_forward is not installed"):
            steer_vllm.check_engine(llm)
    finally:
        stop_llm(llm)


def test_v2_model_runner_is_refused_with_the_reason(llama, monkeypatch):
    from vllm import LLM

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(Exception, match=r"V2 model runner is in effect \(VLLM_USE_V2_MODEL_RUNNER=1 asks for it\)"):
        LLM(model=llama["model_dir"], dtype="float32", enforce_eager=True, max_model_len=128)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"  # the plugin never overrides the user's choice


def test_configurations_that_cannot_be_exact_are_named(llama):
    """Asynchronous scheduling (forced off by vLLM's CPU platform, so set after the
    config is built) and micro-batching are refused with what to do."""
    from vllm.engine.arg_utils import EngineArgs

    from steer_vllm.support import refusal

    config = EngineArgs(model=llama["model_dir"], dtype="float32", max_model_len=128).create_engine_config()
    assert refusal(config) is None
    config.scheduler_config.async_scheduling = True
    assert "--no-async-scheduling" in refusal(config)
    config.scheduler_config.async_scheduling = False
    config.parallel_config.enable_dbo = True
    assert "micro-batching" in refusal(config)
