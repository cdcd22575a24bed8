"""KV cache size on CPU when the user gives none.

vLLM's CPU worker reserves ``--gpu-memory-utilization`` (default 0.92) of the NUMA node's
memory and refuses to start when less than that is free, which is the common case on a
machine that runs anything else. Given no size (no ``--kv-cache-memory-bytes``, no
``--gpu-memory-utilization``, no ``VLLM_CPU_KVCACHE_SPACE``), ``steer-server serve`` sizes
the cache itself from the memory the node has free right now (read the way vLLM's worker
reads it), the model's weights and a reserve for the processes' own memory: half of what
is left, but no more than four times the weights (at least 2 GiB) — a small model on a big
machine does not take the machine — and never more than the model's longest context for
every sequence could use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steer_server.settings import Settings

GiB = 1024**3
# What the API server, engine core and worker processes take besides weights and KV
# cache (Python, torch, vLLM, compiled graphs), measured at 2-3 GiB for small models.
RUNTIME_RESERVE_BYTES = 3 * GiB
MIN_KV_CACHE_BYTES = GiB // 4
SHARE_OF_HEADROOM = 0.5  # leave the rest to the machine's other work
WEIGHTS_MULTIPLE = 4  # ... and within this many times the weights
MIN_CAP_BYTES = 2 * GiB

USER_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


class NotEnoughMemory(RuntimeError):
    pass


@dataclass(frozen=True)
class KvCacheChoice:
    size_bytes: int
    explanation: str


def user_chose(vllm_args: list[str], settings: Settings) -> bool:
    if settings.vllm_cpu_kvcache_space:
        return True
    return any(arg == flag or arg.startswith(flag + "=") for arg in vllm_args for flag in USER_FLAGS)


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for p in model_dir.glob(pattern))


def _kv_bytes_per_token(config: dict) -> int:
    text = config.get("text_config", config)
    layers = text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return 2 * layers * kv_heads * head_dim * (4 if "32" in dtype else 2)


def choose_kv_cache_bytes(model_dir: str, available_bytes: int, max_num_seqs: int = 256) -> KvCacheChoice:
    """The KV cache size for this model with ``available_bytes`` free on the node."""
    path = Path(model_dir)
    config = json.loads((path / "config.json").read_text())
    weights = _weights_bytes(path)
    headroom = available_bytes - weights - RUNTIME_RESERVE_BYTES
    text = config.get("text_config", config)
    context = text.get("max_position_embeddings") or 4096
    useful = _kv_bytes_per_token(config) * context * max_num_seqs
    cap = max(MIN_CAP_BYTES, WEIGHTS_MULTIPLE * weights)
    size = int(min(headroom * SHARE_OF_HEADROOM, useful, cap))
    if size < MIN_KV_CACHE_BYTES:
        raise NotEnoughMemory(
            f"only {available_bytes / GiB:.1f} GiB of memory is free; the model's weights take {weights / GiB:.1f} GiB "
            f"and the server needs about {RUNTIME_RESERVE_BYTES / GiB:.0f} GiB more, which leaves no room for a KV cache "
            f"of at least {MIN_KV_CACHE_BYTES / GiB:.2f} GiB. Free memory, or give a size with --kv-cache-memory-bytes."
        )
    return KvCacheChoice(
        size,
        f"KV cache {size / GiB:.2f} GiB, chosen by steer-server: {available_bytes / GiB:.1f} GiB free on the node, "
        f"weights {weights / GiB:.2f} GiB, {RUNTIME_RESERVE_BYTES / GiB:.0f} GiB kept for the processes; half of the "
        f"rest, at most {cap / GiB:.1f} GiB ({WEIGHTS_MULTIPLE}x the weights, at least {MIN_CAP_BYTES / GiB:.0f} GiB) "
        f"and at most what {max_num_seqs} sequences of {context} tokens could use. "
        "Set --kv-cache-memory-bytes or VLLM_CPU_KVCACHE_SPACE to choose it yourself.",
    )


def free_node_memory() -> int:
    """Bytes free on NUMA node 0, as vLLM's CPU worker reads them."""
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    return get_memory_node_info(0).available_memory
