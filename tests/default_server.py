"""ONE server of the default model (the shipped SmolLM2-135M-Instruct) in float32 for the
whole session, shared by every test folder through tests/conftest.py: the playground's
browser tests and the eval tests both need the real weights at full precision, and a start
of this server is the most expensive thing either does.

Float32 because the playground sends its two requests at once and, in bfloat16, vLLM's CPU
kernels give a request batched beside another logits up to ~0.1 apart from the same request
alone (enough to flip a greedy near-tie); in float32 they agree to 1e-3, and the eval tests
compare with plain transformers in float32.

It has an inference key and an admin key (vector writes need the admin key; it opens
inference too). The modules share its store: a test keeps its vectors apart by name.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from shared_starts import close_with_group
from steer_server import server_process

INFERENCE_KEY = "fp32-inference-key-51b0"
ADMIN_KEY = "fp32-admin-key-7c2e"
SERVED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class DefaultServer:
    url: str  # http://127.0.0.1:PORT
    model: str  # served model name
    store: Path
    log: Path


@pytest.fixture(scope="session")
def fp32_default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultServer]:
    from steer_server.default_model import default_model_dir

    workdir = tmp_path_factory.mktemp("fp32-default-server")
    store, log = workdir / "store", workdir / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", STEER_ADMIN_API_KEY=ADMIN_KEY)
    env.pop("VLLM_PLUGINS", None)
    running = server_process.start_steer_server(
        ["--model", default_model_dir(), "--served-model-name", SERVED_NAME, "--store", str(store),
         "--enforce-eager", "--max-model-len", "1024", "--seed", "0", "--dtype", "float32",
         "--api-key", INFERENCE_KEY],
        port=server_process.free_port(), log=log, env=env, timeout_s=900)
    close_with_group("fp32_default_server", lambda: server_process.stop(running))
    try:
        models = httpx.get(running.url + "/v1/models", headers={"Authorization": f"Bearer {INFERENCE_KEY}"}).json()
        assert models["data"][0]["id"] == SERVED_NAME, models
        yield DefaultServer(url=running.url, model=SERVED_NAME, store=store, log=log)
    finally:
        server_process.stop(running)
