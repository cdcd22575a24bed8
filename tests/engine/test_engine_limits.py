"""Steering survives preemption (KV freed, prompt and output recomputed), and an engine
that cannot steer refuses to start instead of serving unsteered."""
import pytest
import torch

from conftest import hf_model, start_llm, stop_llm
from helpers import engine_additions, generate, params, put_vector, reference_additions, tokens_and_logprobs
from steer_server.reference import greedy_with_logprobs, residual_stream


def test_preempted_requests_keep_exact_steering(tiny_models, engine_store):
    model_dir = tiny_models["llama"]
    hf = hf_model(model_dir)
    gen = torch.Generator().manual_seed(5)
    prompts = [[int(t) for t in torch.randint(100, 40000, (40,), generator=gen)] for _ in range(3)]
    tensors = {"seq": residual_stream(hf, prompts[0][:6], 1), "const": torch.randn(1, 128, generator=gen)}
    ids = {"seq": put_vector(engine_store, model_dir, 1, tensors["seq"]), "const": put_vector(engine_store, model_dir, 2, tensors["const"])}
    cases = [
        [{"name": "seq", "layer": 1, "coeff": 3.0}],
        [{"name": "const", "layer": 2, "coeff": 2.0, "mode": "constant", "positions": "generated"}],
        [],
    ]
    # 5 blocks of 32 tokens cannot hold three 40-token prompts growing by 40 tokens each,
    # so the scheduler preempts and later recomputes requests.
    llm = start_llm(model_dir, block_size=32, num_gpu_blocks_override=5, max_num_batched_tokens=64, max_model_len=96, disable_log_stats=False, enable_prefix_caching=False)
    try:
        outputs = generate(llm, prompts, [params(40, engine_additions(c, ids) if c else None) for c in cases])
        stats = {m.name: m for m in llm.get_metrics()}
    finally:
        stop_llm(llm)
    assert stats["vllm:num_preemptions"].value > 0
    for output, prompt, additions in zip(outputs, prompts, cases):
        want_tokens, want_lp = greedy_with_logprobs(hf, prompt, 40, reference_additions(additions, tensors))
        tokens, lp = tokens_and_logprobs(output)
        assert tokens == want_tokens
        assert lp == pytest.approx(want_lp, abs=2e-3)


def test_unsupported_architecture_refuses_to_start(tmp_path, capfd, monkeypatch):
    import shutil
    from pathlib import Path

    from transformers import OPTConfig, OPTForCausalLM

    from models import TOKENIZER_FILES, _default_model_dir

    config = OPTConfig(vocab_size=49152, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=512, word_embed_proj_dim=128)
    OPTForCausalLM(config).save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        if (Path(_default_model_dir()) / name).is_file():
            shutil.copy(Path(_default_model_dir()) / name, tmp_path / name)
    with pytest.raises(Exception):
        start_llm(str(tmp_path))
    logs = capfd.readouterr()
    said = logs.out + logs.err
    assert "steer-server has not verified steering on OPTForCausalLM" in said and "steer-server check" in said
    # Allowed by the user, it is still refused: its blocks are not where the plugin looks.
    monkeypatch.setenv("STEER_ALLOW_ARCHITECTURES", "OPTForCausalLM")
    with pytest.raises(Exception):
        start_llm(str(tmp_path))
    logs = capfd.readouterr()
    assert "steer-server cannot steer OPTForCausalLM: its decoder blocks were not found" in logs.out + logs.err
