"""`steer-server check` as a user runs it: a model directory in, a verdict out."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import make_tiny  # noqa: E402

from steer_server.server_process import steer_server_command  # noqa: E402

pytestmark = pytest.mark.slow


def start_check(*args: str) -> subprocess.Popen:
    """``steer-server check ARGS``, its output to temp files (not pipes: a pipe nobody reads yet
    would stall a check started beside another)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VLLM_", "STEER_"))}
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(steer_server_command("check", *args), stdout=stdout, stderr=stderr, text=True,
                               env=dict(env, COLUMNS="200"))
    process.outputs = (stdout, stderr)
    return process


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        process.wait(timeout=900)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    stdout, stderr = process.outputs
    for output in (stdout, stderr):
        output.seek(0)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout.read(), stderr.read())


def run_check(*args: str) -> subprocess.CompletedProcess:
    return finished(start_check(*args))


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict[str, subprocess.Popen]:
    """The two checks that start an engine, started at once (each is mostly one process on one
    core at a time, so the two overlap); each test waits for its own."""
    root = tmp_path_factory.mktemp("check-models")
    # OLMo 2 runs under vLLM's Transformers backend: the least native path the plugin steers.
    running = {"pass": start_check("--model", make_tiny("olmo2", root / "olmo2"), "--tokens", "8"),
               "fail": start_check("--model", make_tiny("qwen3", root / "qwen3"), "--tokens", "4", "--tolerance", "1e-12")}
    yield running
    for process in running.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def test_check_passes_a_model_steered_exactly(checks):
    result = finished(checks["pass"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS: steering through vLLM matches plain transformers on Olmo2ForCausalLM" in result.stdout
    for case in ("unsteered", "actadd", "constant"):
        assert case in result.stdout


def test_check_fails_what_is_outside_its_tolerance(checks):
    """A tolerance of 0 cannot hold between two engines' fp32 sums: the verdict is FAIL, exit 1."""
    result = finished(checks["fail"])
    assert result.returncode == 1, result.stdout[-3000:]
    assert "FAIL: steering through vLLM does not match plain transformers on Qwen3ForCausalLM" in result.stdout
    assert "steer-server: steering is not exact on Qwen3ForCausalLM" in result.stderr


def test_check_names_a_directory_that_is_not_a_model(tmp_path):
    result = run_check("--model", str(tmp_path))
    assert result.returncode == 1 and f"--model {tmp_path}: not a Hugging Face model directory" in result.stderr
