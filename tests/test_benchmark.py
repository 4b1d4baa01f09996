"""The throughput benchmark runs end to end on a tiny workload and reports what it promises."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_naive_mode_reports_ratios_from_one_run(tmp_path, capsys):
    benchmark = load_benchmark()
    report = benchmark.main(
        [
            "--items", "3", "--pool-size", "2100", "--top-k", "4", "--new", "4", "--rounds", "1",
            "--threads", "1", "--naive", "--naive-items", "1", "--naive-max-tokens", "48",
            "--workdir", str(tmp_path), "--json", str(tmp_path / "report.json"),
        ]
    )  # fmt: skip
    optimized, naive, ratio = report["optimized"], report["naive"], report["ratio_naive_over_optimized"]
    assert optimized["items"] == 3 and naive["items"] == 1
    # the naive loop embeds the whole pool for its item; the optimized one never re-embeds it
    assert naive["text_encodes_per_item"] >= 2100 > optimized["text_encodes_per_item"]
    assert ratio["encodes_per_item"] > 100
    assert naive["completion_tokens_per_item"] > 0 and optimized["completion_tokens_per_item"] > 0
    assert 0 <= optimized["share_outside_generation"] < 1 and optimized["peak_rss_mib"] > 0
    assert (tmp_path / "report.json").is_file()
    printed = capsys.readouterr().out
    assert "naive / optimized" in printed and "items_per_hour" in printed and "load average" in printed
