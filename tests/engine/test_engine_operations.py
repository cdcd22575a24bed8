"""Operations beyond addition: directional ablation, clamping and norm preservation, each
per request, mixed in one batch with other requests' additions and an unsteered request,
on the compiled and the eager path, against the independent Hugging Face reference.
ActAdd rows can start at an anchor position (chat: the last user message)."""
from __future__ import annotations

import pytest
import torch

from conftest import hf_model, start_llm, stop_llm
from helpers import engine_additions, generate, params, put_vector, reference_additions, tokens_and_logprobs
from reference.hf_actadd import greedy_with_logprobs, residual_stream

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 2e-3


def cases_for(hf, prompt, gen):
    direction = residual_stream(hf, prompt[:3], 2)[-1]  # a direction the stream really has
    tensors = {
        "dir": direction,
        "dir1": residual_stream(hf, prompt[4:7], 1)[-1],
        "seq": residual_stream(hf, prompt[8:12], 1),
        "const": torch.randn(1, 128, generator=gen),
    }
    cases = [
        [],
        # refusal-direction style: ablate one direction at every layer
        [{"name": "dir", "layer": layer, "mode": "ablate"} for layer in range(4)],
        # clamp at layer 2 beside an ActAdd at layer 1, norm restored at layer 1
        [{"name": "seq", "layer": 1, "coeff": 4.0, "norm": "preserve"},
         {"name": "dir", "layer": 2, "mode": "clamp", "value": 3.0}],
        # constant addition with the norm kept, and an ablation at the same layer
        [{"name": "const", "layer": 1, "coeff": 6.0, "mode": "constant", "positions": "all", "norm": "preserve"},
         {"name": "dir1", "layer": 1, "mode": "ablate"}],
        # ActAdd rows starting at position 5 (as a chat anchor puts them)
        [{"name": "seq", "layer": 1, "coeff": 5.0, "anchor": 5}],
    ]
    return tensors, cases


@pytest.mark.parametrize("family, compiled", [("llama", True), ("gpt2", False)], ids=["llama-compiled", "gpt2-eager"])
def test_operations_match_reference_in_a_mixed_batch(tiny_models, engine_store, family, compiled):
    model_dir = tiny_models[family]
    hf = hf_model(model_dir)
    gen = torch.Generator().manual_seed(31)
    prompt = [int(t) for t in torch.randint(100, 40000, (20,), generator=gen)]
    tensors, cases = cases_for(hf, prompt, gen)
    layers = {"dir": 2, "dir1": 1, "seq": 1, "const": 1}
    ids = {name: put_vector(engine_store, model_dir, layers[name], t.reshape(-1, 128),
                            kind="actadd" if name == "seq" else "constant") for name, t in tensors.items()}
    llm = start_llm(model_dir, enforce_eager=not compiled)
    try:
        outputs = generate(llm, [prompt] * len(cases), [params(8, engine_additions(c, ids) if c else None) for c in cases])
    finally:
        stop_llm(llm)
    plain = tokens_and_logprobs(outputs[0])
    for output, additions in zip(outputs, cases):
        want_tokens, want_lp = greedy_with_logprobs(hf, prompt, 8, reference_additions(additions, tensors))
        tokens, lp = tokens_and_logprobs(output)
        assert tokens == want_tokens, additions
        assert lp == pytest.approx(want_lp, abs=LOGPROB_ATOL), additions
        if additions:
            assert (tokens, lp) != plain  # each operation really changed something
