"""A soak with faults: the fleet of tests/test_fleet_faults.py (a real Prefect server set up by
``python -m mils_pipeline.fleet``, the ``caption_shard/gpu`` deployment, process workers), here with
three workers, 60 small shards read from and captioned to a moto S3 server on loopback (s3fs), and
the generator behind llama.cpp's OpenAI-compatible server (SmolLM2, the openai backend). While the
run goes on:

- the S3 server is stopped and, seconds later, started again on the same port;
- worker ``w1`` is SIGKILLed together with the unit it runs, mid-shard (a machine lost);
- the generator server is SIGKILLed (its in-flight requests lose their connection) and started again.

The run plus at most one rerun ends with every key exactly once across data and quarantine, a
manifest for every shard, no unit left Running and no ``mils-gpu`` slot held; a watcher that reads
every version of every visible object throughout never finds one that does not parse whole. The
figures (wall times, retries, units rerun) are printed (``-s``) for RELIABILITY.md.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.config import StorageConfig
from mils_pipeline.io.manifest import read_manifest, read_manifests, write_manifest
from mils_pipeline.io.shards import ShardInfo
from mils_pipeline.io.storage import configure_storage
from tests.conftest import BUCKET as SHARED_BUCKET
from tests.conftest import LLAMA_THREADS, run_settings
from tests.fleet import (  # noqa: F401  (prefect_env, fleet: fixtures)
    REPO,
    Api,
    ancestors,
    fleet,
    free_port,
    prefect_env,
    setup_fleet,
    start_workers,
    stop,
    ts,
    unit_process,
)
from tests.vllm.conftest import API_KEY, SERVED_MODEL, Server
from tests.watch import VisibleFilesWatcher, dataset_keys, write_corpus

SHARDS = 60
PER_SHARD = 2  # images per shard
SHARDS_PER_UNIT = 20  # a unit per worker, its models loaded once
WORKERS = ("w1", "w2", "w3")
BUCKET = "soak"
# the faults, each when this many shards have their manifest (and the one before it is over)
S3_AT, KILL_AT, GENERATOR_AT = 10, 20, 32
S3_DOWN_SECONDS = 6
PARENT = """
import json, sys
from flows.caption import caption_dataset_flow
summary = caption_dataset_flow(sys.argv[1], sys.argv[2], config=json.loads(sys.argv[3]),
                               shard_deployment='caption_shard/gpu', poll_seconds=1,
                               shards_per_unit=int(sys.argv[4]), shard_retries=1)
print('SUMMARY', json.dumps(summary))
"""
GENERATOR_RETRY = re.compile(r"generator server \S+: .*; retry \d+ of \d+")
S3_RETRY = "Retry needed, retrying request"


class VisibleObjectsWatcher(VisibleFilesWatcher):
    """``VisibleFilesWatcher`` on an object store: lists the output over and over and reads every
    visible part and manifest whole, each version of it (its ETag) once, so a half-written or
    overwritten object would be caught. A read that cannot reach the store (the outage) is counted,
    never taken for a partial file: only bytes that arrived whole and do not parse are problems."""

    def __init__(self, fs, output: str) -> None:
        super().__init__(Path(output))
        self.fs, self.url = fs, output
        self.versions: dict[str, str] = {}
        self.unreachable = 0

    def manifests(self) -> int:
        return sum("/_manifests/" in path for path in list(self.versions))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sweep()
            time.sleep(0.2)

    def sweep(self) -> None:
        try:
            listed = self.fs.find(self.url, detail=True)
        except Exception:  # noqa: BLE001 - the store is down: nothing is visible to read
            self.unreachable += 1
            return
        for path, info in listed.items():
            kind = path.rsplit("/", 2)[-2]
            if not (kind in {"data", "quarantine"} and path.endswith(".parquet")) and not (
                kind == "_manifests" and path.endswith(".json")
            ):
                continue
            version = str(info.get("ETag") or (info.get("size"), info.get("LastModified")))
            if self.versions.get(path) == version:
                continue
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                continue
            except Exception:  # noqa: BLE001 - no bytes arrived (connection refused or lost)
                self.unreachable += 1
                continue
            try:
                if path.endswith(".json"):
                    json.loads(data)
                else:
                    pq.read_table(io.BytesIO(data))
            except Exception as exc:  # noqa: BLE001 - every kind of unreadable object is a finding
                self.problems.append(f"{path}: {exc}")
            else:
                self.reads += 1
                self.versions[path] = version


class GeneratorServer(Server):
    """llama.cpp's server (tests/vllm/conftest.py's ``Server``), restarted with the run's requests
    waiting: a restarted llama.cpp server answers the clients' retried completions one at a time,
    so the first start's readiness check (``GET /models`` within 5 s) can wait behind them; the
    restart waits for its answer as long as that takes."""

    def restart(self, timeout: float = 600.0) -> float:
        """SIGKILL the server, start it again; seconds until it answered ``GET /models``."""
        import httpx

        self.kill()
        started = time.perf_counter()
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        while time.perf_counter() - started < timeout:
            assert self.process.poll() is None, f"{self.name} exited: {self.log.read_text()[-3000:]}"
            try:
                models = httpx.get(
                    f"{self.url}/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=timeout
                )
                if models.status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                time.sleep(0.5)
        raise AssertionError(f"{self.name} did not answer within {timeout:.0f} s of its restart")


class RestartableS3:
    """A moto S3 server on a fixed loopback port; moto keeps its buckets in this process, so a
    server started again on the port serves the same objects."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def logging_settings(path: Path) -> Path:
    """Prefect's own logging config plus botocore's retry decisions (DEBUG), so the processes of
    the run log each S3 request they retry, as `mils -v` does for one process."""
    import prefect

    config = yaml.safe_load((Path(prefect.__file__).parent / "logging" / "logging.yml").read_text())
    config["loggers"]["botocore.retries.standard"] = {"level": "DEBUG"}
    path.write_text(yaml.safe_dump(config))
    return path


def count(logs: list[Path], pattern: str | re.Pattern) -> int:
    found = 0
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        found += len(pattern.findall(text)) if isinstance(pattern, re.Pattern) else text.count(pattern)
    return found


@pytest.mark.slow
@pytest.mark.vllm  # a real OpenAI-compatible server
def test_soak_three_workers_sixty_shards_a_worker_the_s3_server_and_the_generator_server_killed(
    fleet,  # noqa: F811  (the fixture imported above)
    tmp_path,
    photos,
    pool_dir,
    monkeypatch,
):
    import s3fs

    credentials = {"AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak", "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    from mils_pipeline.generate.llamacpp import default_model_path

    s3 = RestartableS3()
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(default_model_path()), "--model_alias", SERVED_MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", str(LLAMA_THREADS), "--api_key", API_KEY,
    ]  # fmt: skip
    generator = GeneratorServer(
        "llama_cpp.server", command, {**os.environ, "HF_HUB_OFFLINE": "1"}, port, tmp_path / "llm.log"
    )
    workers: dict[str, subprocess.Popen] = {}
    parent = None
    watcher = None
    try:
        generator.start(timeout=120)
        fs = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": s3.endpoint},
            config_kwargs={"retries": {"max_attempts": 1}},  # the watcher counts an outage, it does not wait it out
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        fs.mkdir(BUCKET)
        keys = write_corpus(tmp_path / "in", photos, shards=SHARDS, per_shard=PER_SHARD)
        fs.put(str(tmp_path / "in") + "/", f"{BUCKET}/in/", recursive=True)
        source, output = f"s3://{BUCKET}/in", f"s3://{BUCKET}/out"

        settings = run_settings(pool_dir, max_rounds=1, new_per_round=2)  # one LLM request per image
        settings["generator"] = {"backend": "openai", "base_url": generator.url, "model": SERVED_MODEL}
        settings["storage"] = {"endpoint_url": s3.endpoint}
        env = {
            **fleet,
            **credentials,
            "OPENAI_API_KEY": API_KEY,
            "MILS_GENERATOR_BASE_URLS": generator.url,
            "PREFECT_LOGGING_SETTINGS_PATH": str(logging_settings(tmp_path / "logging.yml")),
        }
        setup_fleet(env, gpus=len(WORKERS))  # a slot per worker: the lost unit's leaked slot blocks no one
        api = Api(env)
        run = [sys.executable, "-c", PARENT, source, output, json.dumps(settings), str(SHARDS_PER_UNIT)]

        watcher = VisibleObjectsWatcher(fs, f"{BUCKET}/out")
        watcher.start()
        workers = dict(zip(WORKERS, start_workers(env, tmp_path, *WORKERS), strict=True))
        parent_log = tmp_path / "parent.log"
        started = time.monotonic()
        with parent_log.open("w") as log:
            parent = subprocess.Popen(
                run, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
        faults: dict[str, dict] = {}

        def running() -> None:
            assert parent.poll() is None, f"the run ended before the faults: {parent_log.read_text()[-3000:]}"
            assert time.monotonic() - started < 1200, "the run did not reach its faults in 20 minutes"
            time.sleep(0.3)

        # 1. the S3 server stopped, then started again on its port
        while watcher.manifests() < S3_AT:
            running()
        faults["s3"] = {"at": time.monotonic() - started, "manifests": watcher.manifests()}
        s3.stop()
        time.sleep(S3_DOWN_SECONDS)
        s3.start()

        # 2. w1 lost with its unit, mid-shard (the unit's shard task has run a second)
        while watcher.manifests() < KILL_AT or "w1" not in faults:
            running()
            if watcher.manifests() < KILL_AT:
                continue
            runs = {r["id"]: r for r in api.unit_runs(output)}
            for task_run in api.shard_tasks(list(runs)):
                if task_run["state_type"] != "RUNNING" or time.time() - ts(task_run["start_time"]) < 1:
                    continue
                try:
                    pid = unit_process(task_run["flow_run_id"])
                    if workers["w1"].pid not in ancestors(pid):
                        continue
                except (AssertionError, ValueError, OSError):
                    continue  # ended meanwhile
                os.kill(pid, signal.SIGKILL)
                os.kill(workers["w1"].pid, signal.SIGKILL)
                faults["w1"] = {
                    "at": time.monotonic() - started,
                    "killed_at": time.time(),
                    "flow_run": task_run["flow_run_id"],
                    "shard": task_run["name"].removeprefix("caption shard "),
                    "manifests": watcher.manifests(),
                }
                break

        # 3. the generator server SIGKILLed with requests in flight, then started again
        while watcher.manifests() < GENERATOR_AT:
            running()
        faults["generator"] = {"at": time.monotonic() - started, "manifests": watcher.manifests()}
        faults["generator"]["answered_after_restart"] = round(generator.restart(), 1)

        parent.wait(timeout=1800)
        wall = time.monotonic() - started
        first = parent_log.read_text()
        units_first = {r["id"]: r for r in api.unit_runs(output)}
        lost = units_first[faults["w1"]["flow_run"]]["state"]

        # at most one rerun, on the two workers left
        rerun_started = time.monotonic()
        rerun = subprocess.run(run, env=env, capture_output=True, text=True, timeout=1800, cwd=REPO)
        rerun_wall = time.monotonic() - rerun_started
        time.sleep(1)  # a last sweep after the rerun's last object
        watcher.stop.set()
        watcher.join()
        watcher.sweep()
        found = dataset_keys(f"{BUCKET}/out/data", fs)
        if fs.exists(f"{BUCKET}/out/quarantine") and fs.ls(f"{BUCKET}/out/quarantine"):
            found += dataset_keys(f"{BUCKET}/out/quarantine", fs)
        manifests = [json.loads(blob) for blob in fs.cat(fs.ls(f"{BUCKET}/out/_manifests")).values()]
        card = fs.cat_file(f"{BUCKET}/out/README.md").decode()
    finally:
        if watcher is not None:
            watcher.stop.set()
        if parent is not None:
            stop(parent)
        for process in workers.values():
            stop(process)
        generator.kill()
        s3.stop()

    assert rerun.returncode == 0, f"{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}"
    summary = json.loads(rerun.stdout.split("SUMMARY", 1)[1])
    units = {r["id"]: r for r in api.unit_runs(output)}
    rerun_units = [r for i, r in units.items() if i not in units_first]
    tasks = api.shard_tasks(list(units))
    logs = [tmp_path / f"{w}.log" for w in WORKERS] + [parent_log]
    figures = {
        "wall_seconds": round(wall, 1),
        "rerun_wall_seconds": round(rerun_wall, 1),
        "faults": {k: {f: v for f, v in fault.items() if f != "killed_at"} for k, fault in faults.items()},
        "lost_unit": {"state": lost["name"], "after_kill": round(ts(lost["timestamp"]) - faults["w1"]["killed_at"], 1)},
        "units": len(units_first),
        "units_rerun": len(rerun_units),
        "shards_rerun": summary["processed"],
        "generator_retries": count(logs, GENERATOR_RETRY),
        "s3_retries": count(logs, S3_RETRY),
        "shard_task_retries": sum(max(0, t["run_count"] - 1) for t in tasks),
        "shard_seconds_mean": round(sum(m["seconds"] for m in manifests) / len(manifests), 2),
        "generate_seconds_mean": round(
            sum(m["cost"]["loop"]["seconds_generate"] for m in manifests) / len(manifests), 2
        ),
        "watcher": {"objects_read": watcher.reads, "unreachable": watcher.unreachable},
    }
    print("SOAK", json.dumps(figures, indent=1))
    print("first run:", first.strip().splitlines()[-1][:600])

    # the first run failed naming the lost unit's shard; the rerun captioned only unfinished shards
    assert lost["name"] == "Crashed", lost
    error = first.strip().splitlines()[-1]
    assert error.startswith("mils_pipeline.errors.ShardsFailedError"), first[-3000:]
    assert f"{faults['w1']['shard']}: flow run" in error, error
    failed_first = int(error.split("ShardsFailedError: ", 1)[1].split(" ", 1)[0])
    assert 1 <= failed_first <= SHARDS_PER_UNIT, error
    lost_name = units_first[faults["w1"]["flow_run"]]["name"]
    assert re.findall(r"flow run (\S+) ended", error) == [lost_name] * failed_first, error  # its shards, no other
    # the rerun did those shards and counted the others done (it read the manifests the units wrote)
    assert summary["processed"] == failed_first and summary["skipped"] == SHARDS - failed_first, summary
    assert summary["items"] == SHARDS * PER_SHARD and summary["failed"] == 0, summary
    assert f"| {SHARDS} | {SHARDS * PER_SHARD} | 0 |" in card  # the card the rerun wrote counts every shard
    assert rerun_units and all(r["state"]["name"] == "Completed" for r in rerun_units), rerun_units
    # every fault was met: requests to both servers were retried
    assert figures["s3_retries"] >= 1 and figures["generator_retries"] >= 1, figures
    # every key exactly once, every shard done, nothing left running or held, nothing partial seen
    assert sorted(found) == sorted(keys)
    assert len(manifests) == SHARDS
    assert all(r["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED"} for r in units.values()), units
    assert api.active_slots() == 0
    assert watcher.problems == [], watcher.problems
    assert watcher.reads >= 2 * SHARDS  # every part and manifest at least


def test_manifests_that_other_processes_wrote_after_a_listing_are_read(s3, s3_endpoint):
    """Found by the soak: a fan-out parent lists the manifests when it plans, its units write theirs
    from other processes, and s3fs's cached listing of the plan hid those from the parent's later
    reads; one missing from the cache made fs.cat fail and the whole read came back empty. The
    rerun's summary counted 0 shards done of 60 and its dataset card was written from no manifest."""
    import s3fs

    configure_storage(StorageConfig(endpoint_url=s3_endpoint))
    output = f"s3://{SHARED_BUCKET}/out"
    shards = [
        ShardInfo(url=f"s3://{SHARED_BUCKET}/in/s{i}.tar", name=f"s{i}", size=1, etag=None, mtime=None)
        for i in range(3)
    ]
    write_manifest(output, shards[0], {"status": "done"})
    assert set(read_manifests(output)) == {"s0"}  # the plan's listing, which s3fs keeps
    unit = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)  # a unit's
    for shard in shards[1:]:
        unit.pipe(f"{SHARED_BUCKET}/out/_manifests/{shard.name}.json", json.dumps({"shard": shard.name}).encode())
    assert set(read_manifests(output)) == {"s0", "s1", "s2"}
    assert read_manifest(output, shards[2]) == {"shard": "s2"}
