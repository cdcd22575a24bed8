"""Operations beyond addition: directional ablation, clamping and norm preservation, each
per request, mixed in one batch with other requests' additions and an unsteered request,
on the compiled and the eager path, against the independent Hugging Face reference.
ActAdd rows can start at an anchor position (chat: the last user message)."""
from __future__ import annotations

import pytest
import torch

from conftest import hf_model, start_llm, stop_llm
from helpers import engine_additions, generate, params, put_vector, reference_additions, tokens_and_logprobs
from steer_server.reference import greedy_with_logprobs, residual_stream

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
        [{"name": "dir", "layer": layer, "mode": "ablate", "source_layer": 2} for layer in range(4)],
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
def test_operations_match_reference_in_a_mixed_batch(tiny_models, engine_store, engine_host, family, compiled):
    model_dir = tiny_models[family]
    hf = hf_model(model_dir)
    gen = torch.Generator().manual_seed(31)
    prompt = [int(t) for t in torch.randint(100, 40000, (20,), generator=gen)]
    tensors, cases = cases_for(hf, prompt, gen)
    layers = {"dir": 2, "dir1": 1, "seq": 1, "const": 1}
    ids = {name: put_vector(engine_store, model_dir, layers[name], t.reshape(-1, 128),
                            kind="actadd" if name == "seq" else "constant") for name, t in tensors.items()}
    # The engine (its own, started for this test in the engine host): every case in one batch.
    outputs = engine_host.run({"model_dir": model_dir, "overrides": {"enforce_eager": not compiled}, "prompt": prompt,
                               "max_tokens": 8, "payloads": [engine_additions(c, ids) if c else None for c in cases]})["outputs"]
    plain = outputs[0]
    for (tokens, lp), additions in zip(outputs, cases):
        want_tokens, want_lp = greedy_with_logprobs(hf, prompt, 8, reference_additions(additions, tensors))
        assert tokens == want_tokens, additions
        assert lp == pytest.approx(want_lp, abs=LOGPROB_ATOL), additions
        if additions:
            assert (tokens, lp) != plain  # each operation really changed something


def test_receipt_reports_exactly_what_was_added(tiny_models, engine_store):
    """Per layer: the tokens steered and the relative dose ‖Δh‖/‖h‖, against the reference
    streams of the same tokens."""
    from steer_server.reference import capture_residual, steering

    from steer_vllm.receipts import TAKE_RECEIPT_RPC, merge_worker_receipts

    model_dir = tiny_models["llama"]
    hf = hf_model(model_dir)
    gen = torch.Generator().manual_seed(37)
    prompt = [int(t) for t in torch.randint(100, 40000, (12,), generator=gen)]
    tensors = {"const": torch.randn(1, 128, generator=gen), "seq": residual_stream(hf, prompt[:3], 2)}
    ids = {"const": put_vector(engine_store, model_dir, 1, tensors["const"], kind="constant"),
           "seq": put_vector(engine_store, model_dir, 2, tensors["seq"])}
    additions = [{"name": "const", "layer": 1, "coeff": 2.0, "mode": "constant", "positions": "all"},
                 {"name": "seq", "layer": 2, "coeff": 3.0}]
    payload = dict(engine_additions(additions, ids), receipt="receipt-1")
    llm = start_llm(model_dir)
    try:
        (output,) = generate(llm, [prompt], params(6, payload))
        receipt = merge_worker_receipts(llm.collective_rpc(TAKE_RECEIPT_RPC, args=("receipt-1",)))
        again = merge_worker_receipts(llm.collective_rpc(TAKE_RECEIPT_RPC, args=("receipt-1",)))
    finally:
        stop_llm(llm)
    assert again == {}  # taken once
    tokens, _ = tokens_and_logprobs(output)
    seen = torch.tensor([prompt + tokens[:-1]])  # every position the engine computed
    layer1 = reference_additions(additions[:1], tensors)
    with torch.no_grad(), capture_residual(hf, 1) as before1:
        hf(input_ids=seen, use_cache=False)
    with torch.no_grad(), steering(hf, layer1), capture_residual(hf, 2) as before2:
        hf(input_ids=seen, use_cache=False)
    dose1 = (2.0 * tensors["const"][0]).norm() / before1[0][0].norm(dim=-1)
    dose2 = (3.0 * tensors["seq"]).norm(dim=-1) / before2[0][0][:3].norm(dim=-1)
    assert receipt[1]["prompt_tokens"] == len(prompt) and receipt[1]["generated_tokens"] == len(tokens) - 1
    assert receipt[2]["prompt_tokens"] == 3 and receipt[2]["generated_tokens"] == 0
    for point, dose in ((1, dose1), (2, dose2)):
        assert receipt[point]["dose_mean"] == pytest.approx(float(dose.mean()), rel=1e-3)
        assert receipt[point]["dose_max"] == pytest.approx(float(dose.max()), rel=1e-3)
