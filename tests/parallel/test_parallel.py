"""vLLM's own scale-out on CPU: a server with --tensor-parallel-size 2, and one with
--data-parallel-size 2, steer exactly as a single worker does (greedy tokens equal, per-token
log-probabilities within float32 noise), with vectors computed through each engine itself.

One NUMA node here: vLLM's automatic CPU binding gives each rank a NUMA node of its own and
refuses with fewer ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers",
``vllm/utils/ompmultiprocessing.py``, ``_get_autobind_cpu_ids``), so the ranks are bound by hand,
one core each (``VLLM_CPU_OMP_THREADS_BIND="0|1"``). The servers run two at a time.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from fleet_processes import INFERENCE_KEY, metric_samples, start_tiny_server, stop
from models import make_tiny_llama


pytestmark = pytest.mark.slow

ONE_CORE_PER_RANK = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
FLOAT32 = ["--dtype", "float32"]  # the tiny model's own dtype: TP's split sums then differ only by rounding
LOGPROB_TOLERANCE = 1e-3
PROMPTS = ["The old harbour town was quiet in the early morning", "I hate you because"]
STEERINGS = {
    "unsteered": None,
    "actadd": {"additions": [{"prompt": "Love", "coeff": 6, "layer": 1}, {"prompt": "Hate", "coeff": -6, "layer": 1}]},
    "constant": {"mode": "constant", "additions": [
        {"positive": "I love this", "negative": "I hate this", "coeff": 4, "layer": 2}]},
}


def _outputs(handle) -> dict:
    """(steering, prompt) -> greedy tokens and their log-probabilities, all requests at once
    (so that a data-parallel server spreads them over its engines); and which engines
    finished requests, from vLLM's own per-engine counter."""
    cases = [(label, prompt) for label in STEERINGS for prompt in PROMPTS]
    with httpx.Client(base_url=handle.url, headers={"Authorization": f"Bearer {INFERENCE_KEY}"}, timeout=300) as http:
        def run(case):
            label, prompt = case
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1}
            if STEERINGS[label] is not None:
                body["steering"] = STEERINGS[label]
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            logprobs = response.json()["choices"][0]["logprobs"]
            return logprobs["tokens"], logprobs["token_logprobs"]

        with ThreadPoolExecutor(len(cases)) as pool:
            outputs = dict(zip(cases, pool.map(run, cases)))
        finished = metric_samples(http.get("/metrics").text)
    engines = {re.search(r'engine="(\d+)"', key).group(1) for key, value in finished.items()
               if key.startswith("vllm:request_success_total{") and value > 0}
    return {"outputs": outputs, "engines": engines}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("parallel-tiny") / "llama")


def _serve_and_collect(tiny_model, tmp_path_factory, name: str, args: list[str], env: dict | None = None) -> dict:
    workdir = tmp_path_factory.mktemp(name)
    handle = start_tiny_server(tiny_model, workdir, str(workdir / "store"), [*FLOAT32, *args], env)
    try:
        return _outputs(handle)
    finally:
        stop(handle)


@pytest.fixture(scope="module")
def collected(tiny_model, tmp_path_factory) -> Iterator[dict[str, Future]]:
    """The three servers' outputs, two servers at a time (each start is mostly one process at
    a time on one core, so two overlap): the single worker and TP 2 at once, DP 2 as soon as
    one is done. Each server is started, read and stopped in one pool thread (a server is
    spawned with PR_SET_PDEATHSIG, which fires when the thread that spawned it exits)."""
    runs = {"tp1": ([], None),
            "tp2": (["--tensor-parallel-size", "2"], ONE_CORE_PER_RANK),
            "dp2": (["--data-parallel-size", "2", "--api-server-count", "1"], ONE_CORE_PER_RANK)}
    with ThreadPoolExecutor(2) as pool:
        yield {name: pool.submit(_serve_and_collect, tiny_model, tmp_path_factory, name, args, env)
               for name, (args, env) in runs.items()}


@pytest.fixture(scope="module")
def single_worker(collected) -> dict:
    return collected["tp1"].result()


def _assert_same_steering(reference: dict, other: dict) -> None:
    for key, (tokens, logprobs) in reference["outputs"].items():
        other_tokens, other_logprobs = other["outputs"][key]
        assert other_tokens == tokens, key
        worst = max(abs(a - b) for a, b in zip(logprobs, other_logprobs))
        assert worst < LOGPROB_TOLERANCE and not math.isnan(worst), (key, worst)


def test_steering_changes_the_single_worker_output(single_worker):
    outputs = single_worker["outputs"]
    for prompt in PROMPTS:
        unsteered = outputs[("unsteered", prompt)][0]
        assert outputs[("actadd", prompt)][0] != unsteered
        assert outputs[("constant", prompt)][0] != unsteered


def test_tensor_parallel_2_steers_as_one_worker(single_worker, collected):
    tensor_parallel = collected["tp2"].result()
    _assert_same_steering(single_worker, tensor_parallel)


def test_data_parallel_2_steers_as_one_engine(single_worker, collected):
    data_parallel = collected["dp2"].result()
    assert data_parallel["engines"] == {"0", "1"}, "the requests did not reach both engines"
    _assert_same_steering(single_worker, data_parallel)
