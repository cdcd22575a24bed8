"""The paper's Love−Hate addition on the embedded default model (SmolLM2-135M-Instruct)
through the engine, against the reference."""
import pytest

from conftest import hf_model, start_llm, stop_llm
from helpers import generate, params, put_vector, tokens_and_logprobs
from steer_server.reference import actadd_vector, greedy_with_logprobs, residual_stream
from steer_server.default_model import default_model_dir

LOGPROB_ATOL = 5e-3


def test_love_minus_hate_matches_reference_on_default_model(engine_store):
    from transformers import AutoTokenizer

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = hf_model(model_dir)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    love = [bos] + tokenizer.encode("Love")
    hate = [bos] + tokenizer.encode("Hate")
    prompt = [bos] + tokenizer.encode("I hate you because")
    space = tokenizer.encode(" ")[0]
    layer, coeff = 2, 5.0
    length = max(len(love), len(hate))
    ids = {
        name: put_vector(engine_store, model_dir, layer, residual_stream(hf, p + [space] * (length - len(p)), layer))
        for name, p in (("love", love), ("hate", hate))
    }
    steering = {"additions": [
        {"vector": ids["love"], "layer": layer, "coeff": coeff},
        {"vector": ids["hate"], "layer": layer, "coeff": -coeff},
    ]}
    reference = [{"mode": "actadd", "layer": layer, "coeff": 1.0,
                  "vector": actadd_vector(hf, [love, hate], [coeff, -coeff], layer, space)}]
    llm = start_llm(model_dir, max_model_len=512)
    try:
        plain, steered = generate(llm, [prompt, prompt], [params(12), params(12, steering)])
    finally:
        stop_llm(llm)
    for output, additions in ((plain, []), (steered, reference)):
        want_tokens, want_lp = greedy_with_logprobs(hf, prompt, 12, additions)
        tokens, lp = tokens_and_logprobs(output)
        assert tokens == want_tokens, (tokenizer.decode(tokens), tokenizer.decode(want_tokens))
        assert lp == pytest.approx(want_lp, abs=LOGPROB_ATOL)
    assert steered.outputs[0].text != plain.outputs[0].text
    print("unsteered:", plain.outputs[0].text, "| steered:", steered.outputs[0].text)
