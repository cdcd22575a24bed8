"""Engine tests: real vLLM (offline ``LLM``) with the steer plugin, against the
independent Hugging Face reference in tests/reference."""
import gc
import os

import pytest
import torch

from models import make_tiny

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


@pytest.fixture(scope="session")
def engine_store(tmp_path_factory):
    """The store every engine in this session reads (workers inherit STEER_STORE)."""
    from vector_store import open_store

    location = tmp_path_factory.mktemp("engine-store")
    os.environ["STEER_STORE"] = str(location)
    return open_store(str(location))


class _TinyModels(dict):
    """family -> model directory, each built the first time a test asks for it."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> str:
        self[family] = make_tiny(family, self.root / family)
        return self[family]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return _TinyModels(tmp_path_factory.mktemp("tiny-models"))


def start_llm(model_dir: str, **overrides):
    from vllm import LLM

    import steer_vllm
    from steer_vllm.self_test import prove_steering_offline
    from vector_store.keys import model_fingerprint

    settings = dict(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=True,
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
    )
    settings.update(overrides)
    llm = LLM(**settings)
    steer_vllm.check_engine(llm)
    # Every hook in every process ran for a real steered request, and it added exactly.
    prove_steering_offline(llm, model_fingerprint(model_dir))
    return llm


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
