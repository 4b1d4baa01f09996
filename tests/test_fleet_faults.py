"""The fleet under faults, for real: a local Prefect server set up by ``python -m mils_pipeline.fleet``
(the ``mils-gpu`` limit and the automation that crashes flow runs whose heartbeats stopped), the
``caption_shard/gpu`` deployment from deploy/prefect.yaml, two process workers.

- A worker SIGKILLed together with the unit it runs (a machine lost) and, on the other worker, a
  unit's own process SIGKILLed, both mid-shard: neither unit stays Running, both slots come back,
  the parent names both shards with the reason, and a rerun captions only those two.
- A worker process SIGKILLed alone: its unit does not stay Running, no slot stays held, no row is
  lost or doubled.
- ``mils-gpu`` with one slot: units on two workers never overlap; with two they do.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.fleet import CRASHED_MESSAGE, GPU_LIMIT, GPU_SLOT_LEASE_SECONDS
from mils_pipeline.io.shards import write_shard
from tests.conftest import run_settings
from tests.fleet import (  # noqa: F401  (prefect_env, fleet: fixtures)
    CRASH_AFTER,
    REPO,
    Api,
    ancestors,
    fleet,
    prefect,
    prefect_env,
    setup_fleet,
    start_workers,
    stop,
    ts,
    unit_process,
)

PARENT = """
import json, sys
from flows.caption import caption_dataset_flow
summary = caption_dataset_flow(sys.argv[1], sys.argv[2], config=json.loads(sys.argv[3]),
                               shard_deployment='caption_shard/gpu', poll_seconds=1,
                               shards_per_unit=1, shard_retries=0)
print('SUMMARY', json.dumps(summary))
"""


KILL_PER_SHARD = 4  # samples per shard in the kill test
KILL_AFTER = 6  # seconds a unit's shard task has run when it is killed


def sample_keys(name: str, per_shard: int, photos: dict[str, bytes]) -> list[str]:
    kinds = sorted(photos)
    return [f"{name}_{kinds[i % len(kinds)]}{i}" for i in range(per_shard)]


def add_shards(directory: Path, photos: dict[str, bytes], names: list[str], per_shard: int) -> None:
    """Shards of ``per_shard`` samples each, the bundled photos in turn."""
    for name in names:
        samples = [
            (key, {"jpg": photos[key.split("_")[-1].rstrip("0123456789")]})
            for key in sample_keys(name, per_shard, photos)
        ]
        write_shard(str(directory / f"{name}.tar"), samples)


def every_key(output: Path) -> list[str]:
    """Keys of every data and quarantine row of the dataset."""
    keys = pq.read_table(output / "data").column("key").to_pylist()
    quarantine = output / "quarantine"
    if quarantine.exists() and any(quarantine.glob("*.parquet")):
        keys += pq.read_table(quarantine).column("key").to_pylist()
    return keys


@pytest.mark.slow
def test_a_unit_killed_with_its_worker_or_alone_is_crashed_its_slot_comes_back_and_a_rerun_does_only_its_shard(
    fleet,  # noqa: F811  (the fixture imported above)
    tmp_path,
    photos,
    pool_dir,
):
    env = fleet
    printed = setup_fleet(env, gpus=2)
    assert f"{GPU_LIMIT}: 2 slot(s)" in printed
    api = Api(env)
    (automation,) = [a for a in api.automations() if a["name"].startswith("mils: crash")]
    assert automation["trigger"]["posture"] == "Proactive" and automation["trigger"]["within"] == CRASH_AFTER

    names = [f"shard-{i}" for i in range(4)]
    add_shards(tmp_path / "in", photos, names, per_shard=KILL_PER_SHARD)
    output = tmp_path / "out"
    config = json.dumps(run_settings(pool_dir, max_rounds=2))  # SmolLM2 rewrites: a shard takes a while
    command = [sys.executable, "-c", PARENT, str(tmp_path / "in"), str(output), config]
    workers = dict(zip(("w1", "w2"), start_workers(env, tmp_path, "w1", "w2"), strict=True))
    logs = open(tmp_path / "parent.log", "w")
    parent = subprocess.Popen(command, env=env, stdout=logs, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        # on each worker, the first unit whose "caption shard" task has run for KILL_AFTER seconds
        # (its mils-gpu slot taken, its models loading or captioning): w1 is SIGKILLed with it (the
        # machine is lost), on w2 only the unit's process is, and w2 goes on
        victims: dict[str, dict] = {}
        deadline = time.monotonic() + 400
        while len(victims) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, (tmp_path / "parent.log").read_text()
            runs = {r["id"]: r for r in api.unit_runs(str(output))}
            for task_run in api.shard_tasks(list(runs)):
                started = ts(task_run["start_time"])
                if task_run["state_type"] != "RUNNING" or time.time() - started < KILL_AFTER:
                    continue
                try:
                    pid = unit_process(task_run["flow_run_id"])
                    (worker,) = [name for name, w in workers.items() if w.pid in ancestors(pid)]
                except (AssertionError, ValueError, OSError):
                    continue  # ended meanwhile
                if worker in victims:
                    continue
                slots = api.active_slots()
                os.kill(pid, signal.SIGKILL)
                if worker == "w1":
                    os.kill(workers["w1"].pid, signal.SIGKILL)
                shard = runs[task_run["flow_run_id"]]["parameters"]["shards"][0]["name"]
                victims[worker] = {
                    "flow_run": task_run["flow_run_id"],
                    "shard": shard,
                    "killed_at": time.time(),
                    "slots_in_use": slots,
                    "ran": time.time() - started,
                }
            time.sleep(0.5)

        # watch both killed units until they are final, and the slots until a leaked one came back
        # (two units leaked both slots: the other units wait for one)
        slot_back = None
        while parent.poll() is None and time.monotonic() < deadline + 600:
            runs = {r["id"]: r for r in api.unit_runs(str(output))}
            for victim in victims.values():
                state = runs[victim["flow_run"]]["state"]
                if "state" not in victim and state["type"] in {"CRASHED", "FAILED", "COMPLETED", "CANCELLED"}:
                    victim["state"] = state
                    victim["final_after"] = ts(state["timestamp"]) - victim["killed_at"]
            if slot_back is None and api.active_slots() < 2:
                slot_back = time.time() - max(v["killed_at"] for v in victims.values())
            time.sleep(1)
        parent.wait(timeout=600)
        parent_log = (tmp_path / "parent.log").read_text()
        print("killed units:", json.dumps(victims, indent=1, default=str))
        print(f"a leaked slot back {slot_back} s after the second kill")
        print("parent:", parent_log.strip().splitlines()[-1])

        # neither unit stayed Running: w1's set Crashed by the heartbeat automation, w2's by its worker
        assert victims["w1"]["state"]["name"] == "Crashed", victims
        assert victims["w1"]["state"]["message"] == CRASHED_MESSAGE.format(seconds=CRASH_AFTER)
        assert CRASH_AFTER - 30 - 5 <= victims["w1"]["final_after"] <= CRASH_AFTER + 15, (
            victims
        )  # heartbeats: 30 s apart
        assert victims["w2"]["state"]["name"] == "Crashed", victims
        assert "-9" in victims["w2"]["state"]["message"], victims
        # each held its slot when killed; both came back when their leases ran out (the other two units
        # ran after that, on w2, with limit 2), and none is held now
        assert all(v["slots_in_use"] >= 1 for v in victims.values()), victims
        assert slot_back is not None and slot_back <= GPU_SLOT_LEASE_SECONDS + 15, slot_back
        assert api.active_slots() == 0
        # the kills came mid-shard: the two shards have no manifest, the others have theirs
        manifests = {p.stem for p in (output / "_manifests").glob("*.json")}
        killed = {v["shard"] for v in victims.values()}
        assert manifests == set(names) - killed, manifests
        # the parent names both shards with the reason it read from each unit's flow run
        assert parent.returncode != 0
        error = parent_log.strip().splitlines()[-1]
        assert error.startswith("mils_pipeline.errors.ShardsFailedError: 2 shard(s) failed"), parent_log[-3000:]
        assert f"{victims['w1']['shard']}: flow run" in error and "ended Crashed: no heartbeat" in error, error
        assert f"{victims['w2']['shard']}: flow run" in error and "-9" in error, error

        # the rerun (w2 left) captions only the two killed shards; every key exactly once
        rerun_started = time.monotonic()
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    finally:
        stop(parent)
        logs.close()
        for process in workers.values():
            stop(process)
    assert rerun.returncode == 0, f"{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}"
    summary = json.loads(rerun.stdout.split("SUMMARY", 1)[1])
    print(f"rerun: {time.monotonic() - rerun_started:.0f} s, {summary['processed']} done, {summary['skipped']} skipped")
    assert summary["processed"] == 2 and summary["skipped"] == 2, summary
    keys = every_key(output)
    assert sorted(keys) == sorted(k for n in names for k in sample_keys(n, KILL_PER_SHARD, photos))
    assert api.active_slots() == 0


def process_ends(pid: int, within: float) -> bool:
    """Whether ``pid`` is gone (or a zombie: exited, waiting for a reaper) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z" or time.monotonic() > deadline:
            return state == "Z"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_worker_process_killed_alone_leaves_no_unit_running_and_no_slot_held_and_loses_no_row(
    fleet,  # noqa: F811  (the fixture imported above)
    tmp_path,
    photos,
    pool_dir,
):
    """Only the `prefect worker` process is SIGKILLed (its unit runs in a session of its own, so the
    kill does not reach it): whatever the orphaned unit then does, its run ends, its slot is free,
    and the parent's outcome matches the manifests, with every key once after at most one rerun."""
    env = fleet
    setup_fleet(env, gpus=2)
    api = Api(env)
    names = ["shard-0", "shard-1"]
    add_shards(tmp_path / "in", photos, names, per_shard=KILL_PER_SHARD)
    output = tmp_path / "out"
    config = json.dumps(run_settings(pool_dir, max_rounds=2))
    command = [sys.executable, "-c", PARENT, str(tmp_path / "in"), str(output), config]
    workers = dict(zip(("w1", "w2"), start_workers(env, tmp_path, "w1", "w2"), strict=True))
    logs = open(tmp_path / "parent.log", "w")
    parent = subprocess.Popen(command, env=env, stdout=logs, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        victim = None
        deadline = time.monotonic() + 400
        while victim is None:
            assert parent.poll() is None and time.monotonic() < deadline, (tmp_path / "parent.log").read_text()
            runs = {r["id"]: r for r in api.unit_runs(str(output))}
            for task_run in api.shard_tasks(list(runs)):
                if task_run["state_type"] != "RUNNING" or time.time() - ts(task_run["start_time"]) < KILL_AFTER:
                    continue
                try:
                    pid = unit_process(task_run["flow_run_id"])
                    if workers["w1"].pid in ancestors(pid):
                        victim = {"flow_run": task_run["flow_run_id"], "pid": pid}
                except (AssertionError, ValueError, OSError):
                    continue
            time.sleep(0.5)
        os.kill(workers["w1"].pid, signal.SIGKILL)
        killed_at = time.time()
        parent.wait(timeout=600)
        state = {r["id"]: r for r in api.unit_runs(str(output))}[victim["flow_run"]]["state"]
        parent_log = (tmp_path / "parent.log").read_text()
        print(
            f"w1's unit: {state['name']} ({state['message']}) {ts(state['timestamp']) - killed_at:.1f} s after the kill"
        )
        print("parent:", parent_log.strip().splitlines()[-1][:400])
        assert state["type"] in {"COMPLETED", "FAILED", "CRASHED"}, state  # not left Running
        assert process_ends(victim["pid"], within=60)  # nor its process (it may still be exiting after its report)
        assert api.active_slots() == 0
        manifests = {p.stem for p in (output / "_manifests").glob("*.json")}
        if parent.returncode == 0:
            assert manifests == set(names)
        else:
            error = parent_log.strip().splitlines()[-1]
            assert error.startswith("mils_pipeline.errors.ShardsFailedError: 1 shard(s) failed"), parent_log[-3000:]
            (unfinished,) = set(names) - manifests
            assert f"{unfinished}: flow run" in error, error
            rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
            assert rerun.returncode == 0, f"{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}"
            assert json.loads(rerun.stdout.split("SUMMARY", 1)[1])["processed"] == 1
    finally:
        stop(parent)
        logs.close()
        for process in workers.values():
            stop(process)
    assert sorted(every_key(output)) == sorted(k for n in names for k in sample_keys(n, KILL_PER_SHARD, photos))


@pytest.mark.slow
def test_mils_gpu_with_one_slot_keeps_units_of_two_workers_apart_and_with_two_lets_them_overlap(
    fleet,  # noqa: F811  (the fixture imported above)
    tmp_path,
    photos,
    pool_dir,
):
    env = fleet
    api = Api(env)
    config = json.dumps(run_settings(pool_dir, max_rounds=2))  # SmolLM2 rewrites: shards of several seconds
    names = [f"shard-{i}" for i in range(4)]
    workers = start_workers(env, tmp_path, "w1", "w2")
    units: dict[int, list[dict]] = {}
    try:
        for slots in (1, 2):
            setup_fleet(env, gpus=slots)
            source, output = tmp_path / f"in-{slots}", tmp_path / f"out-{slots}"
            add_shards(source, photos, names, per_shard=6)  # shards longer than the workers' start apart
            command = [sys.executable, "-c", PARENT, str(source), str(output), config]
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
            assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            manifests = [json.loads(p.read_text()) for p in (output / "_manifests").glob("*.json")]
            assert len(manifests) == 4
            # each unit's shard from its manifest (end to the second, and its length), and from the
            # server the shard task's start and end (to the microsecond)
            runs = api.unit_runs(str(output))
            tasks = {t["flow_run_id"]: t for t in api.shard_tasks([r["id"] for r in runs])}
            units[slots] = sorted(
                (
                    {
                        "shard": m["shard"],
                        "worker": m["worker"]["name"],
                        "end": ts(m["finished_at"]),
                        "start": ts(m["finished_at"]) - m["seconds"],
                    }
                    for m in manifests
                ),
                key=lambda unit: unit["start"],
            )
            for unit in units[slots]:
                (run,) = [r for r in runs if r["parameters"]["shards"][0]["name"] == unit["shard"]]
                unit["task_start"], unit["task_end"] = (
                    ts(tasks[run["id"]]["start_time"]),
                    ts(tasks[run["id"]]["end_time"]),
                )
            assert api.active_slots() == 0
    finally:
        for process in workers:
            stop(process)
    print(json.dumps(units, indent=1))

    def overlaps(unit_list: list[dict], start: str, end: str) -> int:
        return sum(b[start] < a[end] for i, a in enumerate(unit_list) for b in unit_list[i + 1 :])

    for unit_list in units.values():
        assert {u["worker"] for u in unit_list} == {"w1", "w2"}, unit_list  # both workers had units
    serial = sorted(units[1], key=lambda unit: unit["task_start"])
    assert overlaps(serial, "task_start", "task_end") == 0, serial
    # the manifests agree: each shard ended (to the second) before the next one's start
    assert all(b["start"] >= a["end"] - 1 for a, b in itertools.pairwise(serial)), serial
    parallel = sorted(units[2], key=lambda unit: unit["task_start"])
    assert overlaps(parallel, "task_start", "task_end") >= 1, parallel
    assert overlaps(parallel, "start", "end") >= 1, parallel


def test_the_fleet_command_refuses_what_would_crash_healthy_runs_and_matches_the_worker_image(tmp_path):
    from mils_pipeline import fleet as fleet_setup

    image = (REPO / "deploy" / "Dockerfile.gpu-worker").read_text()
    assert f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY={fleet_setup.HEARTBEAT_SECONDS}" in image
    assert fleet_setup.CRASH_AFTER_SECONDS >= 3 * fleet_setup.HEARTBEAT_SECONDS  # a late heartbeat or two crash nothing
    assert fleet_setup.CRASH_AFTER_SECONDS > 180  # nor a run that sends Prefect's default of one per 180 s
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    assert compose["services"]["fleet"]["command"][:3] == ["python", "-m", "mils_pipeline.fleet"]
    trigger = fleet_setup.zombie_automation(120).trigger
    assert trigger.within.total_seconds() == 120 and trigger.posture == "Proactive"
    assert "prefect.flow-run.Completed" in trigger.expect  # a run that ended is never a zombie
    with pytest.raises(ValueError, match="at least 60"):
        fleet_setup.zombie_automation(45)
    for args, message in (
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--gpus", "2", "--crash-after", "30"], "--crash-after must be at least 60"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "mils_pipeline.fleet", *args], capture_output=True, text=True, cwd=REPO
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "mils_pipeline.fleet", "--gpus", "2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "PREFECT_HOME": str(tmp_path / "prefect-home")},  # no profile setting it either
    )
    assert result.returncode == 2 and "PREFECT_API_URL is not set" in result.stderr, result.stderr
