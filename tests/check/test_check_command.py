"""`steer-server check` as a user runs it: a model directory in, a verdict out."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import make_tiny  # noqa: E402

from steer_server.server_process import steer_server_command  # noqa: E402

pytestmark = pytest.mark.slow


def run_check(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VLLM_", "STEER_"))}
    return subprocess.run(steer_server_command("check", *args), capture_output=True, text=True, timeout=900,
                          env=dict(env, COLUMNS="200"))


def test_check_passes_a_model_steered_exactly(tmp_path):
    # OLMo 2 runs under vLLM's Transformers backend: the least native path the plugin steers.
    model = make_tiny("olmo2", tmp_path / "olmo2")
    result = run_check("--model", model, "--tokens", "8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS: steering through vLLM matches plain transformers on Olmo2ForCausalLM" in result.stdout
    for case in ("unsteered", "actadd", "constant"):
        assert case in result.stdout


def test_check_fails_what_is_outside_its_tolerance(tmp_path):
    """A tolerance of 0 cannot hold between two engines' fp32 sums: the verdict is FAIL, exit 1."""
    model = make_tiny("qwen3", tmp_path / "qwen3")
    result = run_check("--model", model, "--tokens", "4", "--tolerance", "1e-12")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "FAIL: steering through vLLM does not match plain transformers on Qwen3ForCausalLM" in result.stdout
    assert "steer-server: steering is not exact on Qwen3ForCausalLM" in result.stderr


def test_check_names_a_directory_that_is_not_a_model(tmp_path):
    result = run_check("--model", str(tmp_path))
    assert result.returncode == 1 and f"--model {tmp_path}: not a Hugging Face model directory" in result.stderr
