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


# a tiny workload: 2,100 pool texts, K = N = 4, one round, one llama.cpp thread
TINY = ["--pool-size", "2100", "--top-k", "4", "--new", "4", "--rounds", "1", "--threads", "1"]


@pytest.mark.slow
def test_naive_mode_reports_ratios_from_one_run(tmp_path, capsys):
    benchmark = load_benchmark()
    report = benchmark.main(
        [
            "--items", "3", *TINY, "--naive", "--naive-items", "1", "--naive-max-tokens", "48",
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


@pytest.mark.slow
def test_reference_engine_runs_the_papers_engine_beside_the_optimized_path(tmp_path, capsys):
    benchmark = load_benchmark()
    report = benchmark.main(
        [
            "--items", "2", *TINY, "--reference-engine", "--reference-items", "2", "--reference-caps", "12,24",
            "--reference-batch", "2", "--workdir", str(tmp_path),
        ]
    )  # fmt: skip
    for cap in (12, 24):
        reference = report[f"reference_engine_cap_{cap}"]
        assert reference["items"] == 2 and reference["max_tokens"] == cap
        assert reference["generate_calls"] == 1  # two items in lockstep: one pipeline call for the round
        assert 0 < reference["completion_tokens_per_item"] <= cap  # only its own cap stops it
        assert reference["final_mean_score"] is not None and 0 <= reference["useful_token_share"] <= 1
        assert set(report[f"ratio_reference_engine_cap_{cap}_over_optimized"]) >= {"wall_seconds_per_item"}
    assert 0 <= report["optimized"]["useful_token_share"] <= 1
    assert "reference engine cap 24 / optimized" in capsys.readouterr().out


QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


@pytest.mark.slow
def test_quality_benchmark_reports_every_stage_with_intervals_and_differences(tmp_path, capsys):
    import json

    spec = importlib.util.spec_from_file_location("quality_benchmark", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "quality.json"
    assert module.main(
        [
            "--scenes", "3", "--rounds", "1", "--top-k", "3", "--new-per-round", "3", "--word-proposals", "8",
            "--configs", "paper=rewrite;all=rewrite,mutate,crossover", "--bootstrap", "50",
            "--threads", "1", "--json", str(out),
        ]
    ) == 0  # fmt: skip
    report = json.loads(out.read_text())
    names = list(report["figures"])
    assert names[0] == "a. seeds only"
    assert [n.split(" (")[0] for n in names[1:]] == [
        "b. equal budget for paper", "c. paper, round 1", "b. equal budget for all", "c. all, round 1"
    ]  # fmt: skip
    for figures in report["figures"].values():
        assert {"METEOR", "CIDEr", "count", "shape", "colour", "position"} <= set(figures)
        assert {"score:toy-scorer", "score:toy-audit"} <= set(figures)
        for mean, low, high in figures.values():
            assert low <= mean + 1e-9 and mean <= high + 1e-9
    assert set(report["differences"]) == {
        "paper − seeds only", "paper − its equal budget", "all − seeds only", "all − its equal budget"
    }  # fmt: skip
    for captions in report["captions"].values():
        assert set(captions) == {"bench_000000", "bench_000001", "bench_000002"}
    # the word operators proposed and were priced; the baseline never had more than the loop spent
    assert report["spent"]["all"]["proposals"].get("mutate", 0) > 0
    assert report["spent"]["paper"]["completion_tokens"] > 0
    assert "| stage |" in capsys.readouterr().out
