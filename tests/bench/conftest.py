"""ONE real `steer-server serve` process on the tiny test model for tests/bench.

tests/api's session server lives in tests/api/conftest.py, which tests here cannot see, and it
serves the default model; the bench smoke run wants the tiny one (fast, seconds). Started with
the bench's own launcher (`steer_server.bench.start_server`), so the suite's code path runs too.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from models import make_tiny_llama


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from steer_server.bench import start_server, stop_server

    workdir = tmp_path_factory.mktemp("bench-server")
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("bench-tiny") / "llama")
    handle = start_server(
        "steer", model_dir, served_name="tiny-llama", store=workdir / "store", log=workdir / "server.log",
        server_args=["--enforce-eager", "--max-model-len", "512"], env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        timeout_s=300,
    )
    try:
        yield handle
    finally:
        stop_server(handle)
