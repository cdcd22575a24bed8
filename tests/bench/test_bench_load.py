"""The bench and the locust file against ONE real `steer-server serve` on the tiny model, with
its vectors in a real redis-server behind the bench's 2 ms latency proxy (the set-up the bench
uses for the store-latency targets), started by the bench's own launcher.

Checks shape and truth, never timing: request counts add up, every request succeeded, the
server itself counted the steered requests the bench says it sent (its /metrics), vLLM's result
keys are there, files are written. Performance targets are checked by the benchmark itself.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from models import make_tiny_llama
from steer_server import cli
from steer_server.bench.servers import BenchServer, ServerOptions, Store, running_server, vector_store

pytestmark = pytest.mark.slow

INPUT, OUTPUT = 16, 8
USERS = 2  # locust users
# Keys of `vllm bench serve`'s result JSON (vllm/benchmarks/serve.py, `benchmark` and `main_async`).
VLLM_KEYS = {"duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
             "max_concurrent_requests", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms",
             "mean_tpot_ms", "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
             "std_itl_ms", "p99_itl_ms"}
VLLM_HEADER_KEYS = {"date", "backend", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate",
                    "burstiness", "max_concurrency"}


@dataclass
class Served:
    server: BenchServer
    store: Store

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.server.api_key}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    workdir = tmp_path_factory.mktemp("bench-server")
    options = ServerOptions(model=make_tiny_llama(tmp_path_factory.mktemp("bench-tiny") / "llama"),
                            enforce_eager=True, server_args=("--max-model-len", "512"), store="redis",
                            store_latency_ms=2.0, kv_cache_gib=1)
    with vector_store(options, workdir) as store:
        with running_server("steer", options, store=store, log=workdir / "server.log") as server:
            yield Served(server, store)


def _steered_count(served: Served) -> float:
    """The server's own count of accepted steered requests (steer_requests_total)."""
    text = httpx.get(served.server.url + "/metrics", headers=served.headers).text
    return sum(sample.value for family in text_string_to_metric_families(text) if family.name == "steer_requests"
               for sample in family.samples if sample.name == "steer_requests_total")


def _bench(served: Served, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "run", "--url", served.server.url, "--api-key", served.server.api_key, "-K", "2",
                     "-C", "2", "--input-len", str(INPUT), "--output-len", str(OUTPUT), "--warmup", "2",
                     "--layer", "1", "--rows", "3", "--json", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text())


def _check_class(metrics: dict, requests: int) -> None:
    assert set(metrics) >= VLLM_KEYS
    assert metrics["completed"] == requests and metrics["failed"] == 0
    assert metrics["total_output_tokens"] == requests * OUTPUT
    assert metrics["total_input_tokens"] >= requests * (INPUT - 1)  # vLLM's random prompts: within a token
    assert metrics["output_throughput"] > 0 and metrics["output_throughput_at_concurrency"] > 0
    for name in ("ttft", "tpot", "itl"):
        assert 0 < metrics[f"median_{name}_ms"] <= metrics[f"p99_{name}_ms"], name


def test_all_steered_blocks(served, tmp_path):
    before = _steered_count(served)
    data = _bench(served, tmp_path, "--pairs", "2", "--plot", str(tmp_path / "b.png"),
                  "--result-dir", str(tmp_path / "results"))
    (run,) = data["runs"]
    # steered requests: 2 of the 3 warm-up ones, the 1 check, 2 test blocks x C = 2
    assert _steered_count(served) - before == 2 + 1 + 4
    assert set(run["classes"]) == {"steered", "unsteered"}
    _check_class(run["classes"]["steered"], 4)
    _check_class(run["classes"]["unsteered"], 4)
    assert run["throughput_ratio"]["n"] == 2 and run["ratios"]["output_throughput"] > 0
    assert run["ratios"]["median_ttft"] > 0 and run["ratios"]["p99_ttft"] > 0
    assert [b["test"] for b in run["blocks"]] == [True, False, False, True]
    assert run["warmup_failed"] == 0 and run["errors_sample"] == [] and run["hidden_size"] == 128
    assert (tmp_path / "b.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    for name in ("steered", "unsteered"):
        result = json.loads((tmp_path / "results" / f"{run['label']}-{name}.json").read_text())
        assert set(result) >= VLLM_KEYS | VLLM_HEADER_KEYS and result["max_concurrency"] == 2


def test_steered_neighbours_in_constant_mode(served, tmp_path):
    before = _steered_count(served)
    data = _bench(served, tmp_path, "--mode", "constant", "-p", "0.5", "--block-requests", "4", "--pairs", "1")
    (run,) = data["runs"]
    assert _steered_count(served) - before == 2 + 1 + 2
    _check_class(run["classes"]["steered"], 2)
    _check_class(run["classes"]["unsteered_beside_steered"], 2)
    _check_class(run["classes"]["unsteered"], 4)
    assert run["spec"]["mode"] == "constant"
    assert run["neighbour_ratios"]["median_ttft"] > 0
    assert run["neighbour_ratios"]["output_throughput_at_concurrency"] > 0


@pytest.mark.parametrize("mode", ["ablate", "clamp", "dose", "window"])
def test_projection_dose_and_window_modes(served, tmp_path, mode):
    before = _steered_count(served)
    data = _bench(served, tmp_path, "--mode", mode, "--pairs", "1", "--block-requests", "2")
    (run,) = data["runs"]
    assert run["spec"]["mode"] == mode and run["errors_sample"] == []
    _check_class(run["classes"]["steered"], 2)
    assert _steered_count(served) - before == 2 + 1 + 2


def test_uploaded_vectors_are_deleted(served, tmp_path):
    _bench(served, tmp_path, "--pairs", "1")
    vectors = httpx.get(served.server.url + "/v1/steering/vectors", params={"all": "true"},
                        headers=served.headers).json()["data"]
    assert not [v for v in vectors if any(n.startswith("bench-") for n in v["names"])]


def test_server_keeps_vectors_in_redis_behind_the_proxy(served):
    direct = redis.Redis.from_url(served.store.redis_url)
    assert served.store.location != served.store.redis_url  # the server talks to the proxy
    keys_before = direct.dbsize()
    created = httpx.post(served.server.url + "/v1/steering/vectors", headers=served.headers,
                         json={"name": "through-proxy", "layers": {"1": [[0.5] * 128]}})
    assert created.status_code == 201, created.text
    assert direct.dbsize() > keys_before  # it landed in the real redis-server
    httpx.delete(served.server.url + "/v1/steering/vectors/through-proxy", headers=served.headers)
    assert served.store.measured_latency_ms >= 2.0  # a lower bound: the proxy never delivers early


def test_locust_headless(served, tmp_path):
    locustfile = Path(cli.__file__).parent / "bench" / "locustfile.py"
    before = _steered_count(served)
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(locustfile), "--host", served.server.url, "--headless",
         "--users", str(USERS), "--spawn-rate", str(USERS), "--run-time", "8s", "--csv", str(tmp_path / "load"),
         "--only-summary",
         "--api-key", served.server.api_key, "--vectors", "2", "--steer-layer", "1", "--rows", "3",
         "--prompt-tokens", str(INPUT), "--max-tokens", str(OUTPUT), "--steered-fraction", "0.5"],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["Name"]: row for row in _csv_rows(tmp_path / "load_stats.csv")}
    for name in ("steered", "unsteered"):
        assert int(rows[name]["Request Count"]) > 0 and int(rows[name]["Failure Count"]) == 0, rows[name]
    # locust leaves the requests it cut off when the run time was up out of its stats, so the
    # server may count a few more; but unsteered requests are never counted as steered.
    counted, unsteered = int(rows["steered"]["Request Count"]), int(rows["unsteered"]["Request Count"])
    assert counted <= _steered_count(served) - before < counted + unsteered
    vectors = httpx.get(served.server.url + "/v1/steering/vectors", params={"all": "true"},
                        headers=served.headers).json()["data"]
    assert not [v for v in vectors if any(n.startswith("locust-") for n in v["names"])]


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))
