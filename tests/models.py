"""Tiny random-weight Hugging Face model directories for tests (not a test module).

Each ``make_tiny_*(dir)`` writes ``config.json``, ``generation_config.json`` and
``model.safetensors`` (float32) plus the tokenizer files of the default model
(SmolLM2-135M-Instruct, vocab 49152, see ``steer_server.default_model``), so vLLM and
transformers load them offline. Returns ``str(dir)``. Built once per directory: a directory
that already holds a build with the same spec is returned at once (atomic, file-locked build,
so concurrent test processes are safe).

Shapes: hidden 128, 4 heads (head_dim 32 — vLLM's CPU attention needs head_dim in
{32, 64, 80, 96, 112, 128, ...}), 3 layers (so "middle" layers exist), max positions 512.
Llama/Qwen2: 2 KV heads (GQA), intermediate 256; Qwen2 has q/k/v biases. Tied embeddings as each
family's config default: Llama no, Qwen2 no, GPT-2 yes.

Weights are NOT transformers' init; they are drawn here, in sorted parameter-name order, from
a ``torch.Generator`` seeded with ``SEED`` (so they do not depend on transformers' init code):

* matrices and embeddings: N(0, INIT_STD²) with ``INIT_STD = 0.2`` (ten times the usual 0.02);
* norm weights (1-D ``*norm*``/``ln_*`` weights): 1 + N(0, 0.1²), so a loader that drops or
  mis-maps a norm weight is caught;
* biases: N(0, 0.02²), likewise non-zero.

Why 0.2: after the final norm the stream has RMS ≈ 1, so logits have std ≈ std·√128. With the
usual 0.02 that is ≈ 0.23 over 49152 tokens — almost uniform, and greedy top-1 vs top-2 gaps of
~1e-2 that float noise between two engines can flip. With 0.2 the measured logit std is 2.27 and
the top-1/top-2 gap over 96 greedy steps (3 prompts x 32 tokens; ``python tests/models.py``) has
median 0.38 (Llama), 0.39 (Qwen2), 0.50 (GPT-2). Gaussian logits keep an exponential tail of
small gaps whatever the scale (gap/std is scale-free): the minima were 5e-3, 1e-2 and 3e-4, still
>10x fp32 noise (~1e-5 on logits of this size), but a cross-engine comparison of long greedy runs
should tolerate a different token where the reference's gap is tiny (see ``margins=`` in
``steer_server.reference.greedy_with_logprobs``). The softmax is not peaked: chosen-token
probabilities are a few percent.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SEED = 1234
INIT_STD = 0.2
NORM_STD = 0.1
BIAS_STD = 0.02
HIDDEN = 128
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 256
LAYERS = 3
MAX_POS = 512
VOCAB = 49152
# Bump when anything here changes, so cached directories are rebuilt.
_VERSION = 2

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def _repo_on_path() -> None:
    # steer_server lives at the repository root (importable once the project is installed, or
    # from the root); make sure it is importable however this module was imported.
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.append(repo)


def _default_model_dir() -> str:
    _repo_on_path()
    from steer_server.default_model import default_model_dir

    return default_model_dir()


def _special_ids() -> dict:
    # The default model's special tokens: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2.
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def _rmsnorm_decoder_shape(rms_norm_eps: float) -> dict:
    """The config fields Llama and Qwen2 share."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=rms_norm_eps,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        **_special_ids(),
    )


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(**_rmsnorm_decoder_shape(1e-5))


def _qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(max_window_layers=LAYERS, use_sliding_window=False, **_rmsnorm_decoder_shape(1e-6))


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_head=HEADS,
        n_layer=LAYERS,
        n_positions=MAX_POS,
        n_inner=4 * HIDDEN,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
        **_special_ids(),
    )


def _qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(head_dim=HIDDEN // HEADS, max_window_layers=LAYERS, use_sliding_window=False,
                       **_rmsnorm_decoder_shape(1e-6))


def _mistral_config():
    from transformers import MistralConfig

    return MistralConfig(head_dim=HIDDEN // HEADS, sliding_window=None, **_rmsnorm_decoder_shape(1e-5))


def _moe_shape() -> dict:
    # 4 experts, 2 per token: every token mixes experts, so routing is exercised.
    return dict(num_local_experts=4, num_experts_per_tok=2)


def _qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(head_dim=HIDDEN // HEADS, moe_intermediate_size=INTERMEDIATE // 2, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], max_window_layers=LAYERS,
                          use_sliding_window=False, **_moe_shape(), **_rmsnorm_decoder_shape(1e-6))


def _mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(head_dim=HIDDEN // HEADS, **_moe_shape(), **_rmsnorm_decoder_shape(1e-5))


def _gemma_shape() -> dict:
    # Gemma ties embeddings and scales them by sqrt(hidden): point 0 includes the scale.
    shape = _rmsnorm_decoder_shape(1e-6)
    shape.update(tie_word_embeddings=True, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
                 hidden_activation="gelu_pytorch_tanh")
    return shape


# A window shorter than the test prompts, so block 0 really slides; the blocks after it attend
# fully, so rows added at the first positions reach the last token.
_GEMMA_LAYER_TYPES = ["sliding_attention", "full_attention", "full_attention"]


def _gemma2_config():
    from transformers import Gemma2Config

    return Gemma2Config(sliding_window=16, layer_types=_GEMMA_LAYER_TYPES,
                        final_logit_softcapping=30.0, attn_logit_softcapping=None, **_gemma_shape())


def _gemma3_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(sliding_window=16, layer_types=_GEMMA_LAYER_TYPES,
                            **_gemma_shape())


def _phi3_config():
    from transformers import Phi3Config

    return Phi3Config(**_rmsnorm_decoder_shape(1e-5))


def _olmo2_config():
    from transformers import Olmo2Config

    return Olmo2Config(**_rmsnorm_decoder_shape(1e-6))


def _granite_config():
    from transformers import GraniteConfig

    # Multipliers away from 1, so a misplaced one (embedding, residual, attention, logits) shows.
    return GraniteConfig(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25,
                         logits_scaling=2.0, **_rmsnorm_decoder_shape(1e-5))


_FAMILIES = {
    "llama": ("LlamaForCausalLM", _llama_config),
    "qwen2": ("Qwen2ForCausalLM", _qwen2_config),
    "gpt2": ("GPT2LMHeadModel", _gpt2_config),
    "mistral": ("MistralForCausalLM", _mistral_config),
    "qwen3": ("Qwen3ForCausalLM", _qwen3_config),
    "qwen3_moe": ("Qwen3MoeForCausalLM", _qwen3_moe_config),
    "mixtral": ("MixtralForCausalLM", _mixtral_config),
    "gemma2": ("Gemma2ForCausalLM", _gemma2_config),
    "gemma3": ("Gemma3ForCausalLM", _gemma3_config),
    "phi3": ("Phi3ForCausalLM", _phi3_config),
    "olmo2": ("Olmo2ForCausalLM", _olmo2_config),
    "granite": ("GraniteForCausalLM", _granite_config),
}


def _is_norm_weight(name: str) -> bool:
    leaf = name.split(".")
    return leaf[-1] == "weight" and ("norm" in leaf[-2] or leaf[-2].startswith("ln_"))


def _init_weights(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # tied weights appear once
            if _is_norm_weight(name):
                noise = torch.randn(param.shape, generator=gen) * NORM_STD
                param.copy_(1.0 + noise)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * BIAS_STD)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * INIT_STD)


def _make(family: str, directory) -> str:
    import torch
    import transformers

    _repo_on_path()
    from steer_server.default_model import build_atomically

    arch, make_config = _FAMILIES[family]
    tok_dir = Path(_default_model_dir())

    def build(out: Path) -> None:
        config = make_config()
        config.architectures = [arch]
        config.dtype = torch.float32
        cls = getattr(transformers, arch)
        torch.manual_seed(SEED)
        model = cls(config).to(torch.float32).eval()
        _init_weights(model, SEED)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.save_pretrained(str(out), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy(tok_dir / name, out / name)
        # Tokenizer limit = the tiny model's context, not SmolLM2's 8192.
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc["model_max_length"] = MAX_POS
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")

    fingerprint = {"family": family, "version": _VERSION, "seed": SEED, "std": INIT_STD}
    build_atomically(Path(directory), build, fingerprint)
    return str(directory)


def make_tiny_llama(directory) -> str:
    """Tiny random LlamaForCausalLM (3 layers, hidden 128, 4 heads / 2 KV heads, untied)."""
    return _make("llama", directory)


def make_tiny_qwen2(directory) -> str:
    """Tiny random Qwen2ForCausalLM (as the Llama one, plus q/k/v biases; untied)."""
    return _make("qwen2", directory)


def make_tiny_gpt2(directory) -> str:
    """Tiny random GPT2LMHeadModel (3 layers, n_embd 128, 4 heads, tied embeddings)."""
    return _make("gpt2", directory)


def make_tiny(family: str, directory) -> str:
    """Tiny random model of any family in ``FAMILIES`` (hidden 128, 3 layers, head_dim 32)."""
    return _make(family, directory)


FAMILIES = tuple(_FAMILIES)
MAKERS = {family: (lambda directory, family=family: _make(family, directory)) for family in FAMILIES}


def _margin_report(root: str, steps: int = 32) -> None:
    """Print the greedy top-1 minus top-2 logit gap of each tiny model (documentation aid)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for family, make in MAKERS.items():
        d = make(Path(root) / family)
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        gaps, stds = [], []
        for prompt in ("The capital of France is", "I hate you because", "Once upon a time"):
            ids = torch.tensor([tok(prompt).input_ids])
            with torch.no_grad():
                for _ in range(steps):
                    logits = model(ids).logits[0, -1]
                    top = logits.topk(2).values
                    gaps.append(float(top[0] - top[1]))
                    stds.append(float(logits.std()))
                    ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        gaps_t = torch.tensor(gaps)
        print(
            f"{family}: logit std {sum(stds) / len(stds):.2f}; top1-top2 gap "
            f"median {gaps_t.median():.3f} min {gaps_t.min():.4f} over {len(gaps)} steps; "
            f"distinct tokens {len(set(ids[0].tolist()))}"
        )


if __name__ == "__main__":  # python tests/models.py [dir]
    import tempfile

    _margin_report(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
