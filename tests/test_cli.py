"""The `mils` command as a user runs it: a subprocess, real files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.io.shards import write_shard
from tests.conftest import run_settings


def mils(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mils_pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )


def test_caption_command_with_config_file_and_overrides(tmp_path, photos, pool_dir):
    write_shard(str(tmp_path / "in" / "a.tar"), [(n, {"jpg": photos[n]}) for n in ("astronaut", "coins")])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_settings(pool_dir, max_rounds=3)))
    result = mils(
        "caption",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "-c",
        str(config),
        "--set",
        "optimize.max_rounds=1",
        "--quiet",
        "--profile",
    )
    assert result.returncode == 0, result.stderr
    assert "items:         2 captioned, 0 quarantined" in result.stdout
    assert "mean best score" in result.stdout and "wall time" in result.stdout
    assert "time split" in result.stdout and "generation" in result.stdout and "encodes per item" in result.stdout
    assert re.search(r"useful token share \d+%", result.stdout) and "round 1: " in result.stdout
    table = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert {r["rounds"] for r in table} == {1}

    again = mils(
        "caption",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "-c",
        str(config),
        "--set",
        "optimize.max_rounds=1",
        "--quiet",
    )
    assert again.returncode == 0 and "(1 already done, skipped)" in again.stdout
    assert "time split" not in again.stdout


@pytest.mark.parametrize("override", ["optimize.top_k=-3", "optimize.top_k=many"], ids=["bad-value", "bad-type"])
def test_invalid_config_is_refused_before_any_work(tmp_path, override):
    result = mils("caption", str(tmp_path / "in"), str(tmp_path / "out"), "--set", override)
    assert result.returncode == 2
    assert "optimize.top_k" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_source_is_a_clear_error(tmp_path):
    result = mils("caption", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_config_reference_lists_settings():
    result = mils("config", "--reference")
    assert result.returncode == 0 and "| `optimize.top_k` | `50` |" in result.stdout


def test_demo_captions_toy_scenes_and_compares_with_the_references(tmp_path):
    result = mils(
        "demo",
        *("--out", str(tmp_path / "demo"), "--items", "3", "--quiet"),
        *("--set", "optimize.max_rounds=1", "--set", "optimize.new_per_round=4"),
    )
    assert result.returncode == 0, result.stderr
    assert "items:         3 captioned, 1 quarantined" in result.stdout
    assert result.stdout.count("reference: ") == 3
    assert result.stdout.count("best seed: [") == 3
    assert "| best seed |" in result.stdout and "| final (MILS) |" in result.stdout
    assert "score:toy-scorer" in result.stdout
    line = r"captions better than their best seed: (\d+) of 3 .*; worse: (\d+); changed: (\d+)"
    counted = re.search(line, result.stdout)
    assert counted, result.stdout
    better, worse, changed = map(int, counted.groups())
    assert better + worse <= changed <= 3
    table = pq.read_table(tmp_path / "demo" / "captions" / "data")
    assert table.num_rows == 3
    assert {"key", "caption", "score", "candidates", "trajectory", "generator", "scorer"} <= set(table.schema.names)
    assert pq.read_table(tmp_path / "demo" / "shards" / "references.parquet").num_rows == 3
    report = tmp_path / "demo" / "captions" / "report" / "index.html"
    assert f"report: {report} (open it in a browser" in result.stdout and report.is_file()


def test_readme_configuration_reference_matches_the_code():
    reference = mils("config", "--reference").stdout.strip()
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert reference in readme, "README's configuration reference is stale: paste `mils config --reference`"


def test_importing_the_library_loads_no_model_framework():
    code = (
        "import sys, mils_pipeline.run, mils_pipeline.cli\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'llama_cpp', 'vllm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("share", ["7", "0", "-0.5", "half"])
def test_export_refuses_a_top_fraction_outside_0_1_before_reading_the_dataset(tmp_path, share):
    # the dataset does not exist: a refusal that came after reading it would say so instead
    result = mils("export", str(tmp_path / "no-dataset"), str(tmp_path / "out"), "--top-fraction", share)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--top-fraction: must be a share in (0, 1], e.g. 0.5 for the best half; got '{share}'" in result.stderr
    assert "not a mils dataset" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("hours", ["0", "-3", "inf", "lots"])
def test_estimate_refuses_a_gpu_budget_that_is_not_above_0_before_the_pilot(tmp_path, hours):
    # the source does not exist: a refusal that came after planning the pilot would say so instead
    result = mils("estimate", str(tmp_path / "no-source"), "--max-gpu-hours", hours)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--max-gpu-hours: must be a number of GPU-hours above 0, e.g. 200; got '{hours}'" in result.stderr
    assert "does not exist" not in result.stderr
