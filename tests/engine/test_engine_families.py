"""Every supported family steers exactly as the reference does, on a tiny random model of
its own: eager, and Llama and Gemma 3 on the compiled path (torch.compile, vLLM's default).
Each family gets its own engine, started in the shared engine host (``engine_host.py``)."""
import pytest
import torch

from conftest import hf_model
from helpers import STREAM_TOLERANCE, engine_additions, put_vector, reference_additions
from steer_server.reference import greedy_with_logprobs, residual_stream

LOGPROB_ATOL = 2e-3


FAMILY_RUNS = [("qwen2", False), ("gpt2", False), ("llama", True), ("mistral", False), ("qwen3", False),
               ("qwen3_moe", False), ("mixtral", False), ("gemma2", False), ("gemma3", True), ("phi3", False),
               ("olmo2", False), ("granite", False)]


@pytest.mark.parametrize("family, compiled", FAMILY_RUNS,
                         ids=[f"{family}-{'compiled' if compiled else 'eager'}" for family, compiled in FAMILY_RUNS])
def test_family_matches_reference(tiny_models, engine_store, engine_host, family, compiled):
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
    # The engine (its own, started for this test in the engine host): all cases in one batch;
    # compiled, also captures (they force an eager step inside a compiled engine) and the
    # ActAdd case again alone.
    got = engine_host.run({
        "model_dir": model_dir, "overrides": {"enforce_eager": not compiled}, "prompt": prompt, "max_tokens": 8,
        "payloads": [engine_additions(c, ids) if c else None for c in cases],
        "capture_layers": [1, 3] if compiled else None,
        "again": engine_additions(cases[1], ids) if compiled else None,
    })
    outputs = got["outputs"]
    for (tokens, lp), additions in zip(outputs, cases):
        want_tokens, want_lp = greedy_with_logprobs(hf, prompt, 8, reference_additions(additions, tensors))
        assert tokens == want_tokens
        assert lp == pytest.approx(want_lp, abs=LOGPROB_ATOL)
    assert outputs[1] != outputs[0]
    if compiled:
        for layer in (1, 3):
            torch.testing.assert_close(torch.from_numpy(got["captures"][layer]), residual_stream(hf, prompt, layer),
                                       **STREAM_TOLERANCE)
        assert got["again"][0] == outputs[1][0]
