"""Fan-out for real: a local Prefect server, deployments from deploy/prefect.yaml, two process
workers on one pool, and a parent run whose units of several shards load their models once and
land every shard exactly once, across a failed unit and its rerun."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from mils_pipeline.io.shards import write_shard
from tests.conftest import run_settings
from tests.fleet import REPO, prefect, prefect_env, start_workers, stop  # noqa: F401  (prefect_env: fixture)


def test_prefect_yaml_deploys_and_units_of_shards_load_their_models_once_and_reruns_do_only_unfinished_shards(
    prefect_env,  # noqa: F811  (the fixture imported above)
    tmp_path,
    photos,
    pool_dir,
):
    env = prefect_env
    for pool in ("control", "gpu"):
        prefect(env, "work-pool", "create", pool, "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    listed = prefect(env, "deployment", "ls").stdout
    for name in ("caption_dataset/nightly", "backfill/backfill", "caption_shard/gpu", "build_seed_pool/seed-pool"):
        assert name in listed

    def add_shards(*names: str) -> None:
        for name in names:
            write_shard(
                str(tmp_path / "in" / f"{name}.tar"),
                [(f"{name}_{n}", {"jpg": photos[n]}) for n in ("coins", "coffee")],
            )

    first = [f"shard-{i:03d}" for i in range(4)]
    add_shards(*first)
    workers = start_workers(env, tmp_path, "w1", "w2")
    parent = (
        "import json, sys\n"
        "from flows.caption import caption_dataset_flow\n"
        "summary = caption_dataset_flow(sys.argv[1], sys.argv[2], config=json.loads(sys.argv[3]),\n"
        "                               shard_deployment='caption_shard/gpu', poll_seconds=2,\n"
        "                               shards_per_unit=2, shard_retries=0)\n"
        "print('SUMMARY', json.dumps(summary))\n"
    )
    config = json.dumps(run_settings(pool_dir, max_rounds=1))
    command = [sys.executable, "-c", parent, str(tmp_path / "in"), str(tmp_path / "out"), config]

    def run_parent() -> subprocess.CompletedProcess:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)

    try:
        result = run_parent()
        # three new shards on two workers: units [004, 005] and [006]; shard-004 fails on its
        # worker (it cannot write its output), shard-005 of the same unit finishes
        add_shards("shard-004", "shard-005", "shard-006")
        blocker = tmp_path / "out" / "quarantine" / "part-shard-004.parquet"
        blocker.mkdir()
        failed = run_parent()
        blocker.rmdir()
        rerun = run_parent()
    finally:
        for process in workers:
            stop(process)
    worker_logs = "\n".join((tmp_path / f"{w}.log").read_text()[-1500:] for w in ("w1", "w2"))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{worker_logs}"
    summary = json.loads(result.stdout.split("SUMMARY", 1)[1])
    assert summary["processed"] == 4 and summary["items"] == 8
    manifests = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "_manifests").glob("*.json")}
    first_units: dict[tuple[str, int], list[str]] = {}
    for name in first:
        worker = manifests[name]["worker"]
        first_units.setdefault((worker["name"], worker["pid"]), []).append(name)
        # the unit's process built one scorer and one generator, whichever of its shards this is
        assert worker["models_built"] == {"scorer": 1, "generator": 1}, manifests[name]
    assert sorted(first_units.values()) == [first[:2], first[2:]]  # two units, two shards each, one process each
    assert {name for name, _ in first_units} == {"w1", "w2"}

    assert failed.returncode != 0
    message = failed.stderr.strip().splitlines()[-1]  # the parent's error: the unit's error inside it
    assert message.startswith("mils_pipeline.errors.ShardsFailedError: 1 shard(s) failed (shard-004: flow run"), (
        failed.stderr[-3000:]
    )
    assert "part-shard-004.parquet" in message  # the unit's own error, read back from its flow run

    assert rerun.returncode == 0, f"{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}"
    again = json.loads(rerun.stdout.split("SUMMARY", 1)[1])
    assert again["processed"] == 1 and again["skipped"] == 6  # only the shard the failed unit left unfinished
    keys = pq.read_table(tmp_path / "out" / "data").column("key").to_pylist()
    every_shard = [*first, "shard-004", "shard-005", "shard-006"]
    assert sorted(keys) == sorted(f"{n}_{p}" for n in every_shard for p in ("coins", "coffee"))  # none lost or twice


def test_units_hold_at_most_shards_per_unit_and_leave_no_online_worker_without_one():
    from flows.caption import units_of

    shards = [f"shard-{i:03d}" for i in range(10)]
    assert units_of(shards, 8, workers=1) == [shards[:8], shards[8:]]
    assert [len(u) for u in units_of(shards, 8, workers=4)] == [3, 3, 3, 1]
    assert units_of(shards[:4], 8, workers=4) == [[s] for s in shards[:4]]  # 4 GPUs: 4 units of 1
    assert [len(u) for u in units_of([f"s{i}" for i in range(100)], 8, workers=2)] == [8] * 12 + [4]
    assert [s for unit in units_of(shards, 3, workers=20) for s in unit] == shards  # in order, each once
    with pytest.raises(ValueError, match="shards_per_unit"):
        units_of(shards, 0)
