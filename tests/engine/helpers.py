"""Shared steps of the engine tests: store vectors, run the engine, translate additions."""
from __future__ import annotations

import torch

from vector_store import StoredVector, VectorMeta

# vLLM's CPU kernels and plain transformers sum fp32 in different orders, and the order
# depends on the instruction set (AVX2 / AVX-512): streams agree to ~1e-4 relative, with
# rare elements up to a few 1e-4.
STREAM_TOLERANCE = dict(rtol=1e-3, atol=1e-3)
from vector_store.keys import model_fingerprint


def put_vector(store, model_dir: str, layer: int, rows: torch.Tensor, kind: str = "actadd") -> str:
    meta = VectorMeta(model_fingerprint(model_dir), rows.shape[-1], kind, "upload")
    return store.put(StoredVector(meta, {layer: rows.float()}))


def engine_additions(additions: list[dict], ids: dict[str, str]) -> dict:
    """Reference-style additions (with a ``name``) -> the engine's payload."""
    return {
        "additions": [
            {
                "vector": ids[a["name"]],
                "layer": a["layer"],
                "coeff": a["coeff"],
                "mode": a.get("mode", "actadd"),
                "positions": a.get("positions", "all"),
            }
            for a in additions
        ]
    }


def reference_additions(additions: list[dict], tensors: dict[str, torch.Tensor]) -> list[dict]:
    return [
        {
            "mode": a.get("mode", "actadd"),
            "layer": a["layer"],
            "vector": tensors[a["name"]],
            "coeff": a["coeff"],
            **({"positions": a.get("positions", "all")} if a.get("mode") == "constant" else {}),
        }
        for a in additions
    ]


def params(max_tokens: int = 8, steering: dict | None = None, **extra):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=0,
        extra_args={"steering": steering} if steering else None,
        **extra,
    )


def generate(llm, prompts: list[list[int]], sampling) -> list:
    from vllm.inputs import TokensPrompt

    if not isinstance(sampling, list):
        sampling = [sampling] * len(prompts)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)


def tokens_and_logprobs(output) -> tuple[list[int], list[float]]:
    completion = output.outputs[0]
    chosen = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
    return list(completion.token_ids), chosen
