"""CI smoke run of `steer-server bench` against a real server on the tiny model.

Checks shape and sanity only (every field present, counts add up, ratios positive, the PNG
written) -- never timing thresholds: the targets are checked by the benchmark itself.
"""
from __future__ import annotations

import json
import math

import pytest

from steer_server import cli

pytestmark = pytest.mark.slow

CLASS_FIELDS = {
    "requests", "completed", "errors", "output_tokens", "prompt_tokens", "wall_s", "busy_s", "output_tok_s",
    "requests_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "tpot_p50_s", "tpot_p99_s",
    "latency_p50_s", "latency_p99_s",
}
RATIO_FIELDS = {"output_tok_s", "requests_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "tpot_p50"}
PROMPT, OUTPUT = 16, 8


def _bench(tiny_server, tmp_path, *extra: str) -> tuple[dict, bytes]:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = cli.main([
        "bench", "--url", tiny_server.url, "--api-key", tiny_server.api_key, "-K", "2", "-C", "2",
        "--prompt-tokens", str(PROMPT), "--output-tokens", str(OUTPUT), "--warmup", "2", "--layer", "1",
        "--rows", "3", "--json", str(out_json), "--plot", str(out_png), *extra,
    ])
    assert code == 0
    return json.loads(out_json.read_text()), out_png.read_bytes()


def _check_class(stats: dict, requests: int) -> None:
    assert set(stats) >= CLASS_FIELDS
    assert stats["requests"] == requests
    assert stats["completed"] == requests and stats["errors"] == 0
    assert stats["output_tokens"] == requests * OUTPUT
    assert stats["prompt_tokens"] == requests * PROMPT
    assert stats["output_tok_s"] > 0 and stats["requests_s"] > 0
    assert math.isclose(stats["output_tok_s"] / stats["requests_s"], OUTPUT, rel_tol=1e-6)
    for name in ("ttft", "itl", "tpot", "latency"):
        p50, p99 = stats[f"{name}_p50_s"], stats[f"{name}_p99_s"]
        assert p50 is not None and 0 <= p50 <= p99, (name, p50, p99)
    assert stats["ttft_p50_s"] <= stats["latency_p99_s"]


def _check_run(run: dict, steered: int, unsteered: int) -> None:
    assert run["spec"]["num_configs"] == 2 and run["spec"]["concurrency"] == 2
    _check_class(run["steered"], steered)
    _check_class(run["unsteered"], unsteered)
    assert set(run["ratios"]) >= RATIO_FIELDS
    for name in RATIO_FIELDS:
        assert run["ratios"][name] > 0, name
    spread = run["spread"]
    assert spread["n"] >= 1 and spread["min"] <= spread["median"] <= spread["max"]
    assert run["hidden_size"] == 128 and run["vector_upload_s"] >= 0
    assert run["warmup_errors"] == 0 and run["errors_sample"] == []


def test_blocks_design(tiny_server, tmp_path):
    data, png = _bench(tiny_server, tmp_path, "--design", "blocks", "--block-requests", "3", "--pairs", "2")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert data["machine"]["cpus"] >= 1 and data["seconds"] > 0
    (run,) = data["runs"]
    _check_run(run, steered=6, unsteered=6)
    assert run["spread"]["n"] == 2  # one ratio per block pair
    assert len(run["block_walls_s"]["steered"]) == len(run["block_walls_s"]["unsteered"]) == 2
    assert isinstance(data["targets"], list)


def test_mixed_design_constant_mode(tiny_server, tmp_path):
    data, png = _bench(tiny_server, tmp_path, "--design", "mixed", "--requests", "10", "-p", "0.4",
                       "--mode", "constant")
    assert png.startswith(b"\x89PNG")
    (run,) = data["runs"]
    _check_run(run, steered=4, unsteered=6)
    assert run["spec"]["mode"] == "constant"
    assert run["overall"]["output_tok_s"] > 0


def test_uploaded_vectors_are_deleted(tiny_server, tmp_path):
    import httpx

    _bench(tiny_server, tmp_path, "--block-requests", "2", "--pairs", "1")
    names = httpx.get(tiny_server.url + "/v1/steering/vectors", params={"all": "true"},
                      headers={"Authorization": f"Bearer {tiny_server.api_key}"}).json()["data"]
    assert not [v for v in names if any(n.startswith("bench-") for n in v["names"])]
