"""The bench's bookkeeping without a server: block patterns, per-class summaries of vLLM's
request records, targets, the plot, and the command line's checks."""
from __future__ import annotations

import pytest
from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

from steer_server.bench import BenchError
from steer_server.bench.cli import main as bench_main
from steer_server.bench.plots import plot_runs
from steer_server.bench.stats import summarize_run
from steer_server.bench.targets import check_targets
from steer_server.bench.workload import Block, RunSpec, block_order, mixed_pattern, vllm_options, warmup_pattern


def test_mixed_pattern_spreads_the_fraction():
    flags = mixed_pattern(100, 0.25)
    assert sum(flags) == 25
    assert all(sum(flags[i:i + 4]) == 1 for i in range(0, 100, 4))
    assert not any(mixed_pattern(10, 0.0)) and all(mixed_pattern(10, 1.0))


def test_block_order_alternates_which_block_goes_first():
    assert block_order(3) == [True, False, False, True, True, False]


def test_warmup_touches_every_config():
    assert warmup_pattern(32, 0) == [False] * 32
    flags = warmup_pattern(32, 8)
    assert len(flags) == 32 and sum(flags) == 16
    flags = warmup_pattern(32, 128)
    assert sum(flags) == 128 and len(flags) == 144


def _output(ttft: float, latency: float, tokens: int = 4, success: bool = True) -> RequestFuncOutput:
    gap = (latency - ttft) / (tokens - 1)
    return RequestFuncOutput(success=success, latency=latency, output_tokens=tokens if success else 0, ttft=ttft,
                             itl=[gap] * (tokens - 1), prompt_len=8, start_time=0.0,
                             error="" if success else "Bad Request")


def test_summary_of_a_mixed_run():
    spec = RunSpec(concurrency=2, steered_fraction=0.5, pairs=2, block_requests=2)
    # pair 1: test block (one steered, one not) 2 s, reference 1 s; pair 2: reference 1 s, test 4 s
    blocks = [Block(True, [True, False], [_output(0.4, 2.0), _output(0.2, 1.0)], 2.0),
              Block(False, [False, False], [_output(0.1, 0.5), _output(0.1, 0.5)], 1.0),
              Block(False, [False, False], [_output(0.1, 0.5), _output(0.1, 0.5)], 1.0),
              Block(True, [True, False], [_output(0.4, 2.0), _output(0.2, 1.0)], 4.0)]
    result = summarize_run(spec, blocks, vllm_options([]))
    steered, beside, unsteered = (result["classes"][name] for name in ("steered", "unsteered_beside_steered",
                                                                       "unsteered"))
    assert (steered["completed"], beside["completed"], unsteered["completed"]) == (2, 2, 4)
    assert steered["total_output_tokens"] == 8 and steered["duration"] == 6.0
    assert steered["output_throughput"] == pytest.approx(8 / 6.0)
    assert steered["median_ttft_ms"] == pytest.approx(400) and unsteered["median_ttft_ms"] == pytest.approx(100)
    # C x tokens / sum of latencies
    assert steered["output_throughput_at_concurrency"] == pytest.approx(2 * 8 / 4.0)
    assert unsteered["output_throughput_at_concurrency"] == pytest.approx(2 * 16 / 2.0)
    # per pair: (8 tokens / test s) / (8 tokens / reference s)
    assert result["throughput_ratio"]["values"] == [pytest.approx(0.5), pytest.approx(0.25)]
    assert result["ratios"]["output_throughput"] == pytest.approx(0.375)
    assert result["ratios"]["median_ttft"] == pytest.approx(4.0)
    assert result["neighbour_ratios"]["median_ttft"] == pytest.approx(2.0)
    assert result["neighbour_ratios"]["output_throughput_at_concurrency"] == pytest.approx(0.5)


def test_a_pair_with_a_failure_gives_no_throughput_ratio():
    spec = RunSpec(concurrency=2, pairs=2, block_requests=2)
    good = [_output(0.1, 1.0), _output(0.1, 1.0)]
    blocks = [Block(True, [True, True], [_output(0.1, 1.0), _output(0.1, 1.0, success=False)], 1.0),
              Block(False, [False, False], good, 1.0), Block(False, [False, False], good, 1.0),
              Block(True, [True, True], good, 2.0)]
    result = summarize_run(spec, blocks, vllm_options([]))
    assert result["throughput_ratio"]["values"] == [pytest.approx(0.5)]
    assert result["classes"]["steered"]["failed"] == 1
    assert result["errors_sample"] == ["Bad Request"]


def _run(k, c, ratio, *, p=1.0, prompt=32, mode="actadd", ttft=(1.0, 1.0), neighbours=None):
    return {"spec": {"num_configs": k, "concurrency": c, "mode": mode, "steered_fraction": p, "input_len": prompt,
                     "output_len": 64},
            "ratios": {"output_throughput": ratio, "median_ttft": ttft[0], "p99_ttft": ttft[1]},
            "neighbour_ratios": neighbours or {}, "throughput_ratio": {"median": ratio, "min": ratio, "max": ratio}}


def _only(checks, *words):
    """The one check whose target mentions every word."""
    (check,) = [c for c in checks if all(word in c["target"] for word in words)]
    return check


def test_targets():
    runs = [_run(1, 32, 1.0), _run(8, 32, 0.995), _run(32, 32, 0.98, ttft=(1.03, 1.2)), _run(128, 32, 0.96),
            _run(32, 32, 0.985, prompt=4096)]
    checks = check_targets(runs, {"median": 0.995, "min": 0.99, "max": 1.0})
    assert _only(checks, "throughput >= 0.97", "32-token")["passed"]
    assert not _only(checks, "long prompts", "4096-token")["passed"]
    assert not _only(checks, "steered TTFT", "32-token")["passed"]  # p99 1.2
    assert _only(checks, "steered TTFT", "4096-token")["passed"]
    assert _only(checks, "plain vLLM")["passed"]
    assert not _only(checks, "does not fall as K grows", "32-token")["passed"]  # 0.96 < 1.0 - 0.02
    assert _only(check_targets([_run(1, 32, 1.0), _run(128, 32, 0.985)]), "does not fall as K grows")["passed"]
    assert not [c for c in check_targets([_run(8, 16, 0.5)]) if "TTFT" in c["target"] or "0.97" in c["target"]]


def test_neighbour_target():
    calm = {"median_ttft": 1.01, "p99_ttft": 1.04, "output_throughput_at_concurrency": 0.97}
    slowed = dict(calm, output_throughput_at_concurrency=0.9)
    check = _only(check_targets([_run(256, 32, 1.0, p=0.5, neighbours=calm)], store="redis +2 ms"), "beside steered")
    assert check["passed"] and "redis +2 ms" in check["target"]
    assert not _only(check_targets([_run(256, 32, 1.0, p=0.5, neighbours=slowed)]), "beside steered")["passed"]


def test_plot(tmp_path):
    runs = [_run(1, 32, 1.0), _run(32, 32, 0.99), _run(32, 8, 1.01), _run(32, 32, 0.97, mode="constant"),
            _run(32, 32, 0.98, p=0.5)]
    plot_runs(runs, tmp_path / "p.png", "title", plain_vs_plugin={"median": 0.995})
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_options_that_would_break_the_design_are_refused():
    with pytest.raises(BenchError, match="-C"):
        vllm_options(["--max-concurrency", "4"])
    with pytest.raises(BenchError, match="--warmup"):
        vllm_options(["--num-warmups", "3"])
    with pytest.raises(BenchError, match="--rows"):
        RunSpec(rows=8, input_len=4).validate()
    assert vllm_options([]).temperature == 0.0


def test_server_options_need_serve(capsys):
    assert bench_main(["--url", "http://127.0.0.1:9", "--store", "redis"]) == 1
    assert "--serve" in capsys.readouterr().err
