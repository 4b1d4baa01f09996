"""Bounded waves on a real Prefect server: with ``max_units_in_flight=1`` and two workers online, the
parent submits a unit only after the previous one ended, so no two unit flow runs overlap."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

from mils_pipeline.io.shards import write_shard
from tests.conftest import run_settings
from tests.fleet import REPO, prefect, prefect_env, start_workers, stop  # noqa: F401  (prefect_env: fixture)

PARENT = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from flows.caption import caption_dataset_flow
summary = caption_dataset_flow(sys.argv[1], sys.argv[2], config=json.loads(sys.argv[3]),
                               shard_deployment='caption_shard/gpu', poll_seconds=1,
                               shards_per_unit=1, shard_retries=0, max_units_in_flight=1)
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=['gpu'])))
units = [{'state': r.state.name, 'start': r.start_time.timestamp(), 'end': r.end_time.timestamp(),
          'shards': [s['name'] for s in r.parameters['shards']]} for r in runs]
print('SUMMARY', json.dumps({'summary': summary, 'units': units}))
"""


def test_max_units_in_flight_1_runs_units_one_after_another_on_two_workers(
    prefect_env,  # noqa: F811  (the fixture imported above)
    tmp_path,
    photos,
    pool_dir,
):
    env = prefect_env
    prefect(env, "work-pool", "create", "gpu", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--name", "gpu", "--prefect-file", "deploy/prefect.yaml")
    names = [f"shard-{i}" for i in range(3)]
    for name in names:
        write_shard(str(tmp_path / "in" / f"{name}.tar"), [(f"{name}_coins", {"jpg": photos["coins"]})])
    workers = start_workers(env, tmp_path, "w1", "w2")
    config = json.dumps(run_settings(pool_dir, max_rounds=1))
    command = [sys.executable, "-c", PARENT, str(tmp_path / "in"), str(tmp_path / "out"), config]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    finally:
        for process in workers:
            stop(process)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout.split("SUMMARY", 1)[1])
    assert report["summary"]["processed"] == 3
    units = sorted(report["units"], key=lambda unit: unit["start"])
    assert [unit["state"] for unit in units] == ["Completed"] * 3
    assert sorted(shard for unit in units for shard in unit["shards"]) == names  # one unit per shard
    for earlier, later in itertools.pairwise(units):
        assert later["start"] >= earlier["end"], units  # the next unit started only after the last ended
