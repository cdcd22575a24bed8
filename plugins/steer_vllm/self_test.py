"""Proof that steering works end to end in a running engine, before it serves anyone.

Status reports show that the hooks are installed; only a real request shows that they
run and compose. One prompt is captured at a stream point twice, plainly and with a
constant vector added at that point, and the difference must be that vector. The
steered capture passes every hook a steered request passes (frontend validation and
vector content, scheduler admission, worker placement, the per-token fill, the wrapped
block, the step output), and afterwards every hook must report that it ran.
"""
from __future__ import annotations

import torch

from steer_vllm.spec import EngineSteering
from vector_store import StoredVector, VectorMeta
from vector_store.cache import process_cache

PROBE_POINT = 1  # the stream after block 0: the add and the capture both sit there
PROBE_TEXT = "The steering self-test reads this short sentence."


class SelfTestFailed(RuntimeError):
    pass


def _probe_vector(fingerprint: str, hidden_size: int, point: int) -> StoredVector:
    direction = torch.linspace(-1.0, 1.0, hidden_size, dtype=torch.float32).roll(hidden_size // 3)[None]
    meta = VectorMeta(fingerprint, hidden_size, "constant", "self-test")
    return StoredVector(meta, {point: direction})


def _steering(content_id: str, point: int, coeff: float) -> dict:
    addition = {"vector": content_id, "layer": point, "coeff": coeff, "mode": "constant", "positions": "all"}
    return EngineSteering.model_validate({"additions": [addition]}).model_dump()


def _coefficient(plain: torch.Tensor, direction: torch.Tensor) -> float:
    """Large enough that the vector dominates the stream, so the model dtype's rounding
    of their sum is small against the vector itself."""
    return 8.0 * max(float(plain.abs().max()), 1.0) / float(direction.abs().max())


def _verify(plain: torch.Tensor, steered: torch.Tensor, added: torch.Tensor) -> None:
    if plain.shape != steered.shape:
        raise SelfTestFailed(f"steering self-test: captures differ in shape ({list(plain.shape)} vs {list(steered.shape)})")
    error = (steered - plain - added).norm(dim=-1) / added.norm()
    if not bool((error < 0.02).all()):
        raise SelfTestFailed(
            "steering self-test: a constant vector added at a stream point did not show up in that stream "
            f"(relative error per position {[round(float(e), 4) for e in error]}); the engine's steering hooks "
            "do not run as installed"
        )


async def _prove(capture, fingerprint: str, hidden_size: int, num_layers: int, token_ids: list[int]) -> None:
    """``capture(prompts, layers, steering=None)`` -> per prompt ``{layer: [len, hidden]}``."""
    point = min(PROBE_POINT, num_layers)
    vector = _probe_vector(fingerprint, hidden_size, point)
    (plain,) = await capture([token_ids], [point])
    direction = vector.directions[point]
    coeff = _coefficient(plain[point], direction)
    cache = process_cache()
    cache.pin({vector.content_id: vector})  # the frontend finds it there: no store involved
    try:
        (steered,) = await capture([token_ids], [point], _steering(vector.content_id, point, coeff))
    finally:
        cache.unpin([vector.content_id])
    _verify(plain[point], steered[point], coeff * direction)


async def prove_steering(engine_client, model, tokenize) -> dict:
    """Run the proof through a server's engine client, on every data-parallel engine;
    returns the hook status reports. ``model`` has ``fingerprint``, ``hidden_size`` and
    ``num_layers``."""
    from steer_vllm import check_engine_async
    from steer_vllm.capture import capture_residuals_async

    engines = engine_client.vllm_config.parallel_config.data_parallel_size
    for rank in range(engines):

        async def capture(prompts, layers, steering=None, rank=rank if engines > 1 else None):
            return await capture_residuals_async(engine_client, prompts, layers, steering, data_parallel_rank=rank)

        await _prove(capture, model.fingerprint, model.hidden_size, model.num_layers, tokenize(PROBE_TEXT))
    return await check_engine_async(engine_client, ran=True)


def prove_steering_offline(llm, fingerprint: str) -> dict:
    """The same for an offline ``vllm.LLM``."""
    import asyncio

    from steer_vllm import check_engine
    from steer_vllm.capture import capture_residuals

    async def capture(prompts, layers, steering=None):
        return capture_residuals(llm, prompts, layers, steering)

    config = llm.llm_engine.vllm_config.model_config
    token_ids = llm.get_tokenizer().encode(PROBE_TEXT)
    asyncio.run(_prove(capture, fingerprint, config.get_hidden_size(), config.hf_text_config.num_hidden_layers, token_ids))
    return check_engine(llm, ran=True)
