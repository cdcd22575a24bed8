"""Engine tests: real vLLM (offline ``LLM``) with the steer plugin, against the
independent Hugging Face reference in steer_server/reference.py."""
import os

import pytest
import torch

from models import make_tiny
from shared_starts import close_with_group

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


@pytest.fixture(scope="session")
def engine_host(engine_store):
    """ONE process for the tests that need only an engine's outputs: it starts their engines
    in-process, one after another (``engine_host.py`` says why and what stays covered). It is
    closed after the last test of its group (``shared_starts``), not held idle through the rest
    of the session."""
    from engine_host import EngineHost

    host = EngineHost({key: value for key, value in os.environ.items()
                       if key.startswith(("VLLM_", "STEER_"))})
    close_with_group("engine_host", host.close)  # a later request would start it again
    try:
        yield host
    finally:
        host.close()


def start_llm(model_dir: str, **overrides):
    """An offline engine with the tests' settings, proven (``steer_server.check``)."""
    from engine_host import ENGINE_SETTINGS

    from steer_server.check import start_offline_engine

    return start_offline_engine(model_dir, **{**ENGINE_SETTINGS, **overrides})


def stop_llm(llm) -> None:
    from steer_server.check import stop_offline_engine

    stop_offline_engine(llm)


def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
