"""Where the add sits in a model: recognised from the shape of its decoder blocks.

Stream point L is the residual stream entering decoder block L (0 = what the model feeds
block 0: embeddings, times Gemma's sqrt(hidden), times Granite's embedding multiplier;
num_layers = after the last block, before the final norm). Each owned block is wrapped so
that point L is applied right after block L-1 (point 0 right before block 0). vLLM's
blocks come in two shapes, told apart by their ``forward`` signature:

- ``forward(positions, hidden_states, residual)`` returning ``(hidden_states, residual)``
  (Llama, Qwen2/3, Mistral, Mixtral, Qwen3-MoE, Phi-3, Gemma 2/3 with their extra norms
  inside the block): the next block fuses ``hidden_states + residual`` into its add+norm,
  so the stream is their sum and the vector is added once, to ``residual`` (vLLM's fusion
  patterns stay intact). Block 0 receives the embeddings with ``residual=None``.
- blocks that take ``hidden_states`` (by any position) and return the whole stream
  (GPT-2, Granite with its residual multiplier inside the block, and the Hugging Face
  blocks that vLLM's Transformers backend runs, e.g. OLMo 2's post-norms).

Return annotations are not trusted (vLLM's Mixtral and Granite blocks annotate the other
shape): each wrapper checks what its block really returned, and vLLM's start-up dummy run
makes a mismatch refuse the server before it serves anyone.

Recognising the shape is necessary, not sufficient: a model whose forward loop changes the
stream between blocks would still be steered wrongly. So an architecture is served only once
it was checked against plain transformers — in CI (``VERIFIED``), or by the user with
``steer-server check --model DIR``, which then says how to allow it (``$STEER_ALLOW_ARCHITECTURES``,
``EngineSettings.allow_architectures``).

Under pipeline parallelism each rank wraps only the blocks it owns, so a point is added by
the rank that computes it; under tensor parallelism the stream is replicated and every
rank adds the full vector.
"""
from __future__ import annotations

import inspect
from collections.abc import Collection

import torch
from torch import nn

from steer_vllm.points import SteeringPoints

# Architectures tested against the plain-transformers reference in CI
# (tests/engine/test_engine_families.py), by the name vLLM's model class has.
VERIFIED = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "Phi3ForCausalLM", "GraniteForCausalLM",
})
# Run by vLLM's Transformers backend (vLLM 0.32 has no native OLMo 2), by the Hugging Face name.
VERIFIED_TRANSFORMERS_BACKEND = frozenset({"Olmo2ForCausalLM"})
# Where models keep their decoder blocks: (owner attribute, block list attribute).
_BLOCK_LISTS = (("model", "layers"), ("transformer", "h"))


class UnsupportedModel(RuntimeError):
    pass


def _shape_error(block: nn.Module, expected: str, got: object) -> UnsupportedModel:
    return UnsupportedModel(
        f"steer-server cannot steer this model: its decoder block {type(block).__name__} returned "
        f"{type(got).__name__}, not {expected} as its signature implies, so the residual stream cannot be "
        "located exactly"
    )


class ResidualPairBlock(nn.Module):
    """Wraps a block returning ``(hidden_states, residual)``."""

    def __init__(self, base_layer: nn.Module, index: int, points: SteeringPoints):
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.points = points

    def forward(self, positions, hidden_states, residual, **kwargs):
        if self.index == 0:  # block 0 gets the embeddings and residual=None
            hidden_states = self.points.apply(hidden_states, 0)
        output = self.base_layer(positions, hidden_states, residual, **kwargs)
        if not (isinstance(output, tuple) and len(output) == 2):
            raise _shape_error(self.base_layer, "(hidden_states, residual)", output)
        hidden_states, residual = output
        residual = self.points.apply(residual, self.index + 1, lambda steered: hidden_states + steered)
        return hidden_states, residual


class FullStreamBlock(nn.Module):
    """Wraps a block that takes the whole stream as ``hidden_states`` and returns it. The
    Transformers backend's blocks see a leading batch dimension of 1."""

    def __init__(self, base_layer: nn.Module, index: int, points: SteeringPoints, stream_arg: int):
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.points = points
        self.stream_arg = stream_arg  # position of hidden_states in forward's parameters

    def _apply(self, stream: torch.Tensor, point: int) -> torch.Tensor:
        if stream.dim() == 3:
            return self.points.apply(stream[0], point)[None]
        return self.points.apply(stream, point)

    def forward(self, *args, **kwargs):
        if self.index == 0:
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = self._apply(kwargs["hidden_states"], 0)
            else:
                args = (*args[:self.stream_arg], self._apply(args[self.stream_arg], 0), *args[self.stream_arg + 1:])
        output = self.base_layer(*args, **kwargs)
        if isinstance(output, tuple) and len(output) == 1:  # Hugging Face blocks of older transformers
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise _shape_error(self.base_layer, "the stream (a tensor)", output)
        return self._apply(output, self.index + 1)


def _unwrap(model: nn.Module) -> nn.Module:
    # The runner may hand us a wrapper (CUDA graphs) around the real model.
    while not hasattr(model, "config") and hasattr(model, "unwrap"):
        model = model.unwrap()
    return model


def _is_transformers_backend(model: nn.Module) -> bool:
    return type(model).__module__.startswith("vllm.model_executor.models.transformers")


def steerable_model_name(model: nn.Module) -> str:
    """The name steering support is decided by: vLLM's model class, or under vLLM's
    Transformers backend the Hugging Face architecture it runs."""
    model = _unwrap(model)
    if _is_transformers_backend(model):
        architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
        return architectures[0]
    return type(model).__name__


def _wrapper_for(block: nn.Module):
    """The wrapper class and its extra arguments for this block, from its signature."""
    parameters = list(inspect.signature(block.forward).parameters)
    if "residual" in parameters and parameters[:2] == ["positions", "hidden_states"]:
        return ResidualPairBlock, {}
    if "hidden_states" in parameters and "residual" not in parameters:
        return FullStreamBlock, {"stream_arg": parameters.index("hidden_states")}
    return None, {}


def _find_blocks(model: nn.Module) -> nn.ModuleList | None:
    for owner_attr, blocks_attr in _BLOCK_LISTS:
        blocks = getattr(getattr(model, owner_attr, None), blocks_attr, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    return None


def _owned(blocks: nn.ModuleList) -> tuple[int, int]:
    """[start, end) of the blocks this pipeline rank runs (the others are placeholders)."""
    from vllm.model_executor.models.utils import PPMissingLayer

    owned = [i for i, block in enumerate(blocks) if not isinstance(getattr(block, "base_layer", block), PPMissingLayer)]
    if not owned:
        return 0, 0
    return owned[0], owned[-1] + 1


def block_list(model: nn.Module, allowed: Collection[str] = ()) -> tuple[nn.ModuleList, int, int]:
    """The model's decoder blocks and the owned range [start, end); refuses a model the
    plugin cannot steer exactly, naming it. ``allowed``: architectures the user checked
    (``EngineSettings.allow_architectures``, ``$STEER_ALLOW_ARCHITECTURES``)."""
    model = _unwrap(model)
    name = steerable_model_name(model)
    backend = " under vLLM's Transformers backend" if _is_transformers_backend(model) else ""
    verified = VERIFIED_TRANSFORMERS_BACKEND if backend else VERIFIED
    if name not in verified and name not in allowed:
        from steer_vllm.settings import EngineSettings

        variable = EngineSettings.variable("allow_architectures")
        raise UnsupportedModel(
            f"steer-server has not verified steering on {name}{backend}: verified are "
            f"{', '.join(sorted(VERIFIED))} (and {', '.join(sorted(VERIFIED_TRANSFORMERS_BACKEND))} under the "
            f"Transformers backend). Run `steer-server check --model DIR` to compare it with plain transformers; "
            f"if it passes, serve with {variable}={name}. To serve it unsteered, leave the 'steer' plugin out "
            "(VLLM_PLUGINS)."
        )
    blocks = _find_blocks(model)
    if blocks is None:
        raise UnsupportedModel(f"steer-server cannot steer {name}{backend}: its decoder blocks were not found "
                               f"(looked for {', '.join('.'.join(p) for p in _BLOCK_LISTS)})")
    start, end = _owned(blocks)
    block = blocks[start] if start < end else None
    if block is not None and _wrapper_for(getattr(block, "base_layer", block))[0] is None:
        raise UnsupportedModel(
            f"steer-server cannot steer {name}{backend}: its decoder block {type(block).__name__} has neither "
            "shape it knows (forward(positions, hidden_states, residual) -> (hidden_states, residual), or a "
            "block taking and returning the whole stream as hidden_states)"
        )
    return blocks, start, end


def install_steering(model: nn.Module, points: SteeringPoints, allowed: Collection[str] = ()) -> None:
    """Wrap every block this rank owns."""
    blocks, start, end = block_list(model, allowed)
    for index in range(start, end):
        if isinstance(blocks[index], (ResidualPairBlock, FullStreamBlock)):
            continue
        wrapper, extra = _wrapper_for(blocks[index])
        if wrapper is None:
            raise UnsupportedModel(f"steer-server cannot steer this model: decoder block {index} "
                                   f"({type(blocks[index]).__name__}) has a shape it does not know")
        blocks[index] = wrapper(blocks[index], index, points, **extra)


def owns_point(point: int, start: int, end: int) -> bool:
    """Point L is added after block L-1 (point 0 before block 0)."""
    return (point == 0 and start == 0) or start < point <= end
