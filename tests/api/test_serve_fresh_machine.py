"""The README's serve command starts on a machine where memory is not all free.

vLLM's CPU worker wants 92% of the NUMA node's memory free unless told a KV cache size;
`make serve` must size the cache itself from what is free. Here another process holds a
fifth of the node's memory while `make serve` runs with no steer-server or vLLM variable
in its environment, exactly as a new user runs it. Also: a runner the user chose is
never overridden; V2 is refused with the reason instead."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_loopback_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HOG_SCRIPT = """
import mmap, sys, time
size = int(sys.argv[1])
held = mmap.mmap(-1, size)
for offset in range(0, size, mmap.PAGESIZE):
    held[offset] = 1  # touch every page: resident, not just reserved
print("holding", flush=True)
time.sleep(3600)
"""


def clean_env() -> dict[str, str]:
    """What a new user's shell has: none of steer-server's or vLLM's variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "STEER_", "PYTEST"))}


BFLOAT16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_flags() -> set[str]:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return set(flags.split(":", 1)[1].split())


def node_memory() -> int:
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    return get_memory_node_info(0).total_memory


def test_make_serve_starts_while_another_process_holds_a_fifth_of_memory(tmp_path):
    hog = subprocess.Popen([sys.executable, "-c", HOG_SCRIPT, str(node_memory() // 5)], stdout=subprocess.PIPE, text=True)
    assert hog.stdout.readline().strip() == "holding"
    port = free_loopback_port()
    args = f"--port {port} --host 127.0.0.1 --enforce-eager --store {tmp_path / 'store'}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(["make", "-C", str(REPO), "serve", f"ARGS={args}"], stdout=out,
                                  stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text(errors="replace")[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("make serve did not become healthy:\n" + log.read_text(errors="replace")[-4000:])
        completion = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "prompt": "I went up to my friend and said", "max_tokens": 8,
            "steering": {"additions": [{"prompt": " weddings", "coeff": 4, "layer": 20}]}})
        assert completion.status_code == 200, completion.text
        text = log.read_text(errors="replace")
        assert "KV cache" in text and "chosen by steer-server" in text
        # The default model's float32 weights are served in float32 where the CPU has no
        # bfloat16 instructions (read here from the kernel's flags), in vLLM's bfloat16 elsewhere.
        assert f"dtype=torch.{'bfloat16' if cpu_flags() & BFLOAT16_FLAGS else 'float32'}" in text, text[-4000:]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        hog.kill()
        hog.wait()


def test_v2_runner_asked_for_is_refused_not_overridden(tmp_path):
    env = dict(clean_env(), VLLM_USE_V2_MODEL_RUNNER="1")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "steer-server"), "serve", "--port", str(free_loopback_port()),
         "--store", str(tmp_path / "store")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "V2 model runner is in effect (VLLM_USE_V2_MODEL_RUNNER=1 asks for it)" in output, output[-3000:]
    assert "Set VLLM_USE_V2_MODEL_RUNNER=0" in output
