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


QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


@pytest.mark.slow
def test_quality_benchmark_reports_every_stage_with_both_scorers(tmp_path, capsys):
    import json

    spec = importlib.util.spec_from_file_location("quality_benchmark", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "quality.json"
    assert module.main(
        [
            "--scenes", "2", "--rounds", "1", "--top-k", "3", "--new-per-round", "3",
            "--modes", "rewrite,edit", "--hybrid", "--threads", "1", "--json", str(out),
        ]
    ) == 0  # fmt: skip
    report = json.loads(out.read_text())
    names = [stage["name"] for stage in report["stages"]]
    assert names[0].startswith("a. seeds only") and len(names) == 1 + 2 * 2 + 1
    assert [n.split(" (")[0] for n in names[1:5]] == [
        "b. equal budget for rewrite", "c. MILS rewrite, round 1", "b. equal budget for edit", "c. MILS edit, round 1"
    ]  # fmt: skip
    assert names[5].startswith("d. hybrid: +") and "then 1 rewrite round" in names[5]
    for stage in report["stages"]:
        assert set(stage["captions"]) == {"bench_000000", "bench_000001"}
        assert {"METEOR", "CIDEr", "count", "shape", "colour", "position"} <= set(stage["metrics"])
        assert {"score:toy-scorer", "score:toy-audit"} <= set(stage["metrics"])
    for mode in ("rewrite", "edit"):
        # the baseline never spends more than refinement did
        assert 0 <= report["completion_tokens_equal_budget"][mode] <= report["completion_tokens_mils"][mode]
    # the hybrid's seed texts cost at most half of rewrite's budget; its own round comes on top
    import re

    seed_tokens = int(re.search(r"seeds \((\d+) tokens\)", names[5]).group(1))
    assert seed_tokens <= report["completion_tokens_mils"]["rewrite"] // 2
    assert report["completion_tokens_mils"]["hybrid"] > seed_tokens
    assert "| stage |" in capsys.readouterr().out
