"""The bench's bookkeeping, without a server: percentiles, interleaving, targets, the plot."""
from __future__ import annotations

from steer_server import bench


def test_percentile():
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([1, 2, 3, 4, 5], 50) == 3
    assert bench.percentile([0, 10], 99) == 9.9


def test_mixed_pattern_spreads_the_fraction():
    flags = bench.mixed_pattern(100, 0.25)
    assert sum(flags) == 25
    assert all(sum(flags[i:i + 4]) == 1 for i in range(0, 100, 4))
    assert not any(bench.mixed_pattern(10, 0.0)) and all(bench.mixed_pattern(10, 1.0))


def test_block_order_alternates_which_class_goes_first():
    assert bench.block_order(3) == [True, False, False, True, True, False]


def test_class_stats_counts_and_rates():
    records = [bench.RequestRecord(True, 0, 0, start=0.0, end=2.0, ttft=0.5, gaps=[0.1] * 15, output_tokens=16,
                                   prompt_tokens=8) for _ in range(4)]
    records.append(bench.RequestRecord(True, 1, 0, start=0.0, end=1.0, error="boom"))
    stats = bench.class_stats(records, concurrency=4)
    assert stats["completed"] == 4 and stats["errors"] == 1 and stats["output_tokens"] == 64
    assert stats["output_tok_s"] == 4 * 64 / 8.0  # C * tokens / busy time
    walled = bench.class_stats(records, concurrency=4, wall=4.0)
    assert walled["output_tok_s"] == 16.0 and walled["requests_s"] == 1.0


def _run(k, c, ratio, low=None, high=None, mode="actadd"):
    return {"design": "blocks", "spec": {"num_configs": k, "concurrency": c, "mode": mode},
            "ratios": {"output_tok_s": ratio},
            "spread": {"min": ratio if low is None else low, "max": ratio if high is None else high}}


def test_targets():
    runs = [_run(1, 32, 1.0), _run(8, 32, 0.995), _run(32, 32, 0.98), _run(128, 32, 0.96)]
    checks = bench.check_targets(runs, {"median": 0.995, "min": 0.99, "max": 1.0})
    by_name = {c["target"].split(" (")[0].split(" >=")[0]: c for c in checks}
    assert by_name["steered/unsteered throughput"]["passed"]
    assert by_name["plugin loaded but unused / plain vLLM"]["passed"]
    assert not by_name["ratio does not fall as K grows"]["passed"]  # 0.96 < 1.0 - 0.02
    assert bench.check_targets([_run(1, 32, 1.0), _run(128, 32, 0.985)])[0]["passed"]  # within noise


def test_plot(tmp_path):
    runs = [_run(1, 32, 1.0), _run(32, 32, 0.99, 0.98, 1.0), _run(32, 8, 1.01), _run(32, 32, 0.97, mode="constant")]
    bench.plot_runs(runs, tmp_path / "p.png", plain_vs_plugin={"median": 0.995})
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_warmup_touches_every_config():
    assert bench.warmup_pattern(32, 0) == [False] * 32
    flags = bench.warmup_pattern(32, 8)
    assert len(flags) == 32 and sum(flags) == 16
    flags = bench.warmup_pattern(32, 128)
    assert sum(flags) == 128 and len(flags) == 144
