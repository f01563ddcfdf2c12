"""The core speed benchmark and the digits benchmark, on small settings."""

import pytest

from bp_apps.experiments.bench import bench_size, format_core_table, run_core_bench, step_matmul_flops
from bp_apps.experiments.bench_digits import DigitsRecipe, run_digits_bench, time_to_accuracy


def test_step_flops_counts_forward_weight_and_input_gradients():
    # 784-128-128-10 at batch 64: forward 2·64·(784·128 + 128·128 + 128·10), weight grads the same,
    # input grads for all but the first layer.
    forward = 2 * 64 * (784 * 128 + 128 * 128 + 128 * 10)
    assert step_matmul_flops(64, [784, 128, 128, 10]) == 3 * forward - 2 * 64 * 784 * 128


def test_core_bench_report_shape():
    report = run_core_bench(sizes=((8, 16), (16, 32)), repeats=3)
    assert report["matmul_gflops"] > 0
    assert [(r["batch"], r["hidden"]) for r in report["results"]] == [(8, 16), (16, 32)]
    for r in report["results"]:
        assert {"batch", "hidden", "engine_ms", "autograd_ms", "engine_gflops"} <= set(r)
        assert r["engine_ms"] > 0 and r["autograd_ms"] > 0
    assert "matmul_gflops" in report["results"][1] and "matmul_gflops" not in report["results"][0]
    assert "| 16 | 32 |" in format_core_table(report)


def test_bench_size_leaves_both_models_training_equally():
    result = bench_size(4, 8, repeats=2, warmup=1)
    assert result["speedup"] == pytest.approx(result["autograd_ms"] / result["engine_ms"])


def test_time_to_accuracy():
    assert time_to_accuracy([1.0, 2.0, 3.0], [0.5, 0.9, 0.95], 0.9) == 2.0
    assert time_to_accuracy([1.0, 2.0], [0.5, 0.6], 0.9) is None


def test_digits_bench_small_recipe():
    report = run_digits_bench(seeds=[0], recipe=DigitsRecipe(hidden=(32,), epochs=3))
    run = report["runs"][0]
    assert 0.8 < run["engine_test_accuracy"] <= 1.0
    assert 0.5 < run["sklearn_test_accuracy"] <= 1.0
    assert run["engine_seconds_to_common"] <= run["engine_train_seconds"]
    ratio = run["sklearn_seconds_to_common"] / run["engine_seconds_to_common"]
    assert run["speedup_to_common_accuracy"] == pytest.approx(ratio)
    if run["engine_test_accuracy"] >= run["sklearn_test_accuracy"]:
        assert run["speedup_full_training"] == pytest.approx(run["sklearn_train_seconds"] / run["engine_train_seconds"])
    else:
        assert run["speedup_full_training"] is None
