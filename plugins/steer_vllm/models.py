"""Where the add sits in each supported architecture.

Stream point L is the residual stream entering decoder block L (0 = embeddings,
num_layers = after the last block, before the final norm). Each owned block is wrapped
so that point L is applied right after block L-1 (point 0 right before block 0):

- Llama/Qwen2/Mistral blocks return ``(hidden_states, residual)`` and the next block
  fuses ``hidden_states + residual`` into its add+RMSNorm; the stream is their sum,
  so the vector is added once, to ``residual`` (vLLM's fusion patterns stay intact).
  Block 0 receives the embeddings as ``hidden_states`` with ``residual=None``.
- GPT-2 blocks take and return the whole stream.

Under pipeline parallelism each rank wraps only the blocks it owns, so a point is
added by the rank that computes it; under tensor parallelism the stream is replicated
and every rank adds the full vector.
"""
from __future__ import annotations


from torch import nn

from steer_vllm.points import SteeringPoints


class ResidualPairBlock(nn.Module):
    """Wraps a block returning ``(hidden_states, residual)`` (Llama, Qwen2, Mistral)."""

    def __init__(self, base_layer: nn.Module, index: int, points: SteeringPoints):
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.points = points

    def forward(self, positions, hidden_states, residual, **kwargs):
        if self.index == 0:  # block 0 gets the embeddings and residual=None
            hidden_states = self.points.apply(hidden_states, 0)
        hidden_states, residual = self.base_layer(positions, hidden_states, residual, **kwargs)
        residual = self.points.apply(residual, self.index + 1, lambda steered: hidden_states + steered)
        return hidden_states, residual


class FullStreamBlock(nn.Module):
    """Wraps a block that takes and returns the whole stream (GPT-2)."""

    def __init__(self, base_layer: nn.Module, index: int, points: SteeringPoints):
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.points = points

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            hidden_states = self.points.apply(hidden_states, 0)
        hidden_states = self.base_layer(hidden_states, *args, **kwargs)
        return self.points.apply(hidden_states, self.index + 1)


# architecture -> (attribute path of the block list's owner, block list name, wrapper)
STEERABLE_ARCHITECTURES: dict[str, tuple[str, str, type[nn.Module]]] = {
    "LlamaForCausalLM": ("model", "layers", ResidualPairBlock),
    "MistralForCausalLM": ("model", "layers", ResidualPairBlock),
    "Qwen2ForCausalLM": ("model", "layers", ResidualPairBlock),
    "GPT2LMHeadModel": ("transformer", "h", FullStreamBlock),
}


class UnsupportedModel(RuntimeError):
    pass


def _unwrap(model: nn.Module) -> nn.Module:
    # The runner may hand us a wrapper (CUDA graphs) around the real model.
    while not hasattr(model, "config") and hasattr(model, "unwrap"):
        model = model.unwrap()
    return model


def steerable_model_name(model: nn.Module) -> str:
    return type(_unwrap(model)).__name__


def block_list(model: nn.Module) -> tuple[nn.ModuleList, int, int, type[nn.Module]]:
    """The model's decoder blocks, the owned range [start, end), and the wrapper to use."""
    model = _unwrap(model)
    name = type(model).__name__
    if name not in STEERABLE_ARCHITECTURES:
        raise UnsupportedModel(
            f"steer-server cannot steer {name}: supported architectures are "
            f"{', '.join(sorted(STEERABLE_ARCHITECTURES))}. To serve it unsteered, leave the "
            "'steer' plugin out (VLLM_PLUGINS); --model-impl transformers is not supported either."
        )
    owner_attr, blocks_attr, wrapper = STEERABLE_ARCHITECTURES[name]
    owner = getattr(model, owner_attr)
    blocks: nn.ModuleList = getattr(owner, blocks_attr)
    return blocks, getattr(owner, "start_layer", 0), getattr(owner, "end_layer", len(blocks)), wrapper


def install_steering(model: nn.Module, points: SteeringPoints) -> None:
    """Wrap every block this rank owns."""
    blocks, start, end, wrapper = block_list(model)
    for index in range(start, end):
        if not isinstance(blocks[index], wrapper):
            blocks[index] = wrapper(blocks[index], index, points)


def owns_point(point: int, start: int, end: int) -> bool:
    """Point L is added after block L-1 (point 0 before block 0)."""
    return (point == 0 and start == 0) or start < point <= end
