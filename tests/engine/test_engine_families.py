"""Every supported family steers exactly as the reference does, on a tiny random model of
its own: eager, and Llama and Gemma 3 on the compiled path (torch.compile, vLLM's default)."""
import pytest
import torch

from conftest import hf_model, start_llm, stop_llm
from helpers import STREAM_TOLERANCE, engine_additions, generate, params, put_vector, reference_additions, tokens_and_logprobs
from steer_server.reference import greedy_with_logprobs, residual_stream

LOGPROB_ATOL = 2e-3


FAMILY_RUNS = [("qwen2", False), ("gpt2", False), ("llama", True), ("mistral", False), ("qwen3", False),
               ("qwen3_moe", False), ("mixtral", False), ("gemma2", False), ("gemma3", True), ("phi3", False),
               ("olmo2", False), ("granite", False)]


@pytest.mark.parametrize("family, compiled", FAMILY_RUNS,
                         ids=[f"{family}-{'compiled' if compiled else 'eager'}" for family, compiled in FAMILY_RUNS])
def test_family_matches_reference(tiny_models, engine_store, family, compiled):
    model_dir = tiny_models[family]
    hf = hf_model(model_dir)
    gen = torch.Generator().manual_seed(11)
    prompt = [int(t) for t in torch.randint(100, 40000, (24,), generator=gen)]
    love, hate = prompt[3:6], prompt[9:12]
    tensors = {
        "love": residual_stream(hf, love, 2),
        "hate": residual_stream(hf, hate, 2),
        "const0": torch.randn(1, 128, generator=gen),
        "const3": torch.randn(1, 128, generator=gen),
    }
    layers = {"love": 2, "hate": 2, "const0": 0, "const3": 3}
    ids = {name: put_vector(engine_store, model_dir, layers[name], t) for name, t in tensors.items()}
    cases = [
        [],
        [{"name": "love", "layer": 2, "coeff": 6.0}, {"name": "hate", "layer": 2, "coeff": -6.0}],
        [{"name": "const0", "layer": 0, "coeff": 2.0, "mode": "constant", "positions": "all"},
         {"name": "const3", "layer": 3, "coeff": -3.0, "mode": "constant", "positions": "generated"}],
    ]
    llm = start_llm(model_dir, enforce_eager=not compiled)
    try:
        outputs = generate(llm, [prompt] * len(cases), [params(8, engine_additions(c, ids) if c else None) for c in cases])
        for output, additions in zip(outputs, cases):
            want_tokens, want_lp = greedy_with_logprobs(hf, prompt, 8, reference_additions(additions, tensors))
            tokens, lp = tokens_and_logprobs(output)
            assert tokens == want_tokens
            assert lp == pytest.approx(want_lp, abs=LOGPROB_ATOL)
        assert tokens_and_logprobs(outputs[1]) != tokens_and_logprobs(outputs[0])
        if compiled:  # captures force an eager step inside a compiled engine
            from steer_vllm.capture import capture_residuals

            [got] = capture_residuals(llm, [prompt], [1, 3])
            for layer in (1, 3):
                torch.testing.assert_close(got[layer], residual_stream(hf, prompt, layer), **STREAM_TOLERANCE)
            again = generate(llm, [prompt], params(8, engine_additions(cases[1], ids)))[0]
            assert tokens_and_logprobs(again)[0] == tokens_and_logprobs(outputs[1])[0]
    finally:
        stop_llm(llm)
