"""The Prefect flows against a real temporary Prefect server (prefect_test_harness)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from mils_pipeline.io.shards import write_shard
from tests.conftest import BUCKET, run_settings


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_shards(directory, photos, names):
    for name in names:
        write_shard(
            str(directory / f"{name}.tar"), [(f"{name}_{n}", {"jpg": photos[n]}) for n in ("chelsea", "rocket")]
        )


def artifacts(key: str | None = None, type_: str | None = None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType

    with get_client(sync_client=True) as client:
        flt = ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]) if key else None,
            type=ArtifactFilterType(any_=[type_]) if type_ else None,
        )
        return client.read_artifacts(artifact_filter=flt)


def test_caption_dataset_flow_runs_shards_in_process_then_reruns_as_a_no_op(prefect_server, tmp_path, photos, pool_dir):
    from flows.caption import backfill_flow, caption_dataset_flow

    write_shards(tmp_path / "in", photos, ["shard-000", "shard-001"])
    config = run_settings(pool_dir, max_rounds=1)
    out = str(tmp_path / "out")

    summary = caption_dataset_flow(str(tmp_path / "in"), out, config=config)
    assert summary["processed"] == 2 and summary["items"] == 4 and summary["skipped"] == 0
    assert pq.read_table(tmp_path / "out" / "data").num_rows == 4
    tables = artifacts(key="mils-run-shards")
    assert tables and "shard-001" in tables[0].data
    assert artifacts(type_="progress")
    assert summary["report"] == str(tmp_path / "out" / "report" / "index.html")
    assert (tmp_path / "out" / "report" / "thumbs" / "0.jpg").is_file()
    [link] = artifacts(key="mils-report")
    assert (tmp_path / "out" / "report" / "index.html").as_uri() in link.data
    [headline] = artifacts(key="mils-report-summary")
    assert "| 4 | 4 | 0 |" in headline.data

    again = caption_dataset_flow(str(tmp_path / "in"), out, config=config)
    assert again["processed"] == 0 and again["skipped"] == 2 and again["items"] == 4

    write_shards(tmp_path / "in", photos, ["shard-002"])
    backfill = backfill_flow(str(tmp_path / "in"), out, config=config)
    assert backfill["processed"] == 1 and backfill["skipped"] == 2
    keys = pq.read_table(tmp_path / "out" / "data").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 6


def test_a_failing_shard_unit_does_not_stop_the_others_and_the_flow_fails_naming_it(
    prefect_server, tmp_path, photos, pool_dir
):
    from flows.caption import caption_dataset_flow
    from mils_pipeline.errors import ShardsFailedError

    write_shards(tmp_path / "in", photos, ["shard-000", "shard-001"])
    config = run_settings(pool_dir, max_rounds=0)
    out = tmp_path / "out"
    blocker = out / "quarantine" / "part-shard-000.parquet"
    blocker.mkdir(parents=True)  # the first unit cannot write its (first) output file

    state = caption_dataset_flow(str(tmp_path / "in"), str(out), config=config, shard_retries=0, return_state=True)
    assert state.is_failed()
    with pytest.raises(ShardsFailedError, match="shard-000"):
        state.result()
    assert (out / "_manifests" / "shard-001.json").is_file()  # the unit after it ran to the end

    blocker.rmdir()
    summary = caption_dataset_flow(str(tmp_path / "in"), str(out), config=config, shard_retries=0)
    assert summary["processed"] == 1 and summary["skipped"] == 1
    keys = pq.read_table(out / "data").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 4


def test_generator_server_down_costs_retries_then_a_clear_failed_state(
    prefect_server, tmp_path, photos, pool_dir, monkeypatch
):
    import socket

    from prefect.client.orchestration import get_client

    from flows.caption import caption_dataset_flow
    from mils_pipeline.errors import ShardsFailedError

    with socket.socket() as sock:  # a port nothing listens on: the server is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    write_shards(tmp_path / "in", photos, ["shard-000"])
    monkeypatch.setenv("MILS_GENERATOR_BASE_URLS", f"http://127.0.0.1:{port}/v1")  # the worker policy allows it
    config = run_settings(pool_dir, max_rounds=1)
    config["generator"] = {
        "backend": "openai",
        "base_url": f"http://127.0.0.1:{port}/v1",
        "model": "smollm2",
        "max_retries": 2,
        "retry_backoff": 0.1,
        "request_timeout": 5,
    }
    state = caption_dataset_flow(
        str(tmp_path / "in"), str(tmp_path / "out"), config=config, shard_retries=1, return_state=True
    )
    assert state.is_failed()
    # the first request a unit makes is the model listing, when its runtime is built: 3 attempts each
    with pytest.raises(ShardsFailedError, match=r"failed GET models after 3 attempt\(s\)") as err:
        state.result()
    assert f"127.0.0.1:{port}" in str(err.value) and "generator.base_url" in str(err.value)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert run.state.is_failed()
    [unit] = [t for t in task_runs if t.name.startswith("caption shard")]
    assert unit.run_count == 2 and unit.state.is_failed()  # shard_retries=1: the unit ran twice, then failed
    assert not (tmp_path / "out" / "_manifests" / "shard-000.json").exists()


def test_backfill_over_a_listed_range_of_shards(prefect_server, tmp_path, photos, pool_dir):
    from flows.caption import backfill_flow

    write_shards(tmp_path / "in", photos, ["shard-000", "shard-001", "shard-010"])
    summary = backfill_flow(
        str(tmp_path / "in"), str(tmp_path / "out"), config=run_settings(pool_dir, max_rounds=1), select=["shard-00*"]
    )
    assert summary["shards"] == 2 and summary["processed"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == [
        "part-shard-000.parquet",
        "part-shard-001.parquet",
    ]


def test_build_seed_pool_flow_writes_a_pool(prefect_server, tmp_path):
    from flows.caption import build_seed_pool_flow

    result = build_seed_pool_flow("everyday-photos", 10, str(tmp_path), config={"generator": {"threads": 2}})
    assert result["size"] == 10
    assert (tmp_path / f"{result['id']}.txt").is_file()


def test_flow_reads_shards_from_s3_and_writes_the_dataset_to_s3(
    prefect_server, s3, s3_endpoint, tmp_path, photos, pool_dir, monkeypatch
):
    from flows.caption import caption_dataset_flow

    write_shards(tmp_path / "in", photos, ["shard-000", "shard-001"])
    for path in (tmp_path / "in").iterdir():
        s3.put_file(str(path), f"{BUCKET}/flow-in/{path.name}")
    config = {**run_settings(pool_dir, max_rounds=1), "storage": {"endpoint_url": s3_endpoint}}

    summary = caption_dataset_flow(f"s3://{BUCKET}/flow-in", f"s3://{BUCKET}/flow-out", config=config)
    assert summary["processed"] == 2 and summary["items"] == 4
    s3.invalidate_cache()
    assert sorted(s3.ls(f"{BUCKET}/flow-out/data")) == [
        f"{BUCKET}/flow-out/data/part-shard-000.parquet",
        f"{BUCKET}/flow-out/data/part-shard-001.parquet",
    ]
    again = caption_dataset_flow(f"s3://{BUCKET}/flow-in", f"s3://{BUCKET}/flow-out", config=config)
    assert again["processed"] == 0 and again["skipped"] == 2


def test_secrets_are_redacted_from_the_logs_prefect_stores(prefect_server, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from flows.caption import run_logger

    secret = "sk-live-" + "q7" * 12
    monkeypatch.setenv("OPENAI_API_KEY", secret)

    @flow(name="leaky")
    def leaky() -> None:
        run_logger().warning("calling the server with key %s", secret)
        raise RuntimeError(f"the server echoed the key {secret}")

    state = leaky(return_state=True)
    assert state.is_failed()
    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        run_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        logs = client.read_logs(log_filter=run_filter)
    text = "\n".join(log.message for log in logs)
    assert "calling the server with key ***" in text  # the message, and the failure's traceback:
    assert "RuntimeError: the server echoed the key ***" in text
    assert secret not in text


class DeadEngine:
    """A generator whose engine has died: every call fails, as a crashed vLLM engine's would."""

    def __init__(self, identity) -> None:
        self.identity = identity
        self.calls = 0
        self.closed = False

    def generate(self, prompts, params, seeds):
        from mils_pipeline.errors import GenerationError

        self.calls += 1
        raise GenerationError("the engine core process died")

    def close(self) -> None:
        self.closed = True


def test_a_unit_that_fails_inside_a_model_is_retried_on_freshly_loaded_models(
    prefect_server, tmp_path, photos, pool_dir
):
    from flows.caption import caption_dataset_flow
    from mils_pipeline.config import RunConfig
    from mils_pipeline.run import runtime as runtimes

    write_shards(tmp_path / "in", photos, ["shard-000"])
    settings = run_settings(pool_dir, max_rounds=1)
    config = RunConfig.model_validate(settings)
    broken = runtimes.shared_runtime(config)  # the worker's cached models, whose engine then dies
    real = broken.generator
    dead = DeadEngine(real.identity)
    broken.generator = broken.optimizer.generator = dead
    try:
        summary = caption_dataset_flow(str(tmp_path / "in"), str(tmp_path / "out"), config=settings, shard_retries=1)
        assert summary["processed"] == 1 and summary["items"] == 2 and summary["failed"] == 0
        assert dead.calls == 1 and dead.closed  # the first attempt failed, and its runtime was closed
        assert runtimes.shared_runtime(config) is not broken  # the retry built its own
    finally:
        real.close()
        runtimes.release_runtimes()


def test_a_run_over_its_gpu_budget_is_refused_before_any_shard_with_the_figures(
    prefect_server, tmp_path, photos, pool_dir
):
    from flows.caption import caption_dataset_flow
    from mils_pipeline.estimate import GpuBudgetExceededError

    write_shards(tmp_path / "in", photos, ["shard-000", "shard-001"])
    config = run_settings(pool_dir, max_rounds=1, operators=["crossover"])
    out = tmp_path / "out"
    with pytest.raises(GpuBudgetExceededError, match="GPU-hours on H100-80GB") as refused:
        caption_dataset_flow(str(tmp_path / "in"), str(out), config=config, max_gpu_hours=1e-9, estimate_pilot=2)
    assert refused.value.estimate.shards == 2
    assert not (out / "data").exists() or not list((out / "data").iterdir())  # nothing captioned
    [refusal] = artifacts(key="mils-estimate")
    assert "**refused**" in refusal.data and "| GPU-hours |" in refusal.data

    with pytest.raises(ValueError, match="mils estimate SOURCE"):  # a fan-out parent has no models to pilot with
        caption_dataset_flow(str(tmp_path / "in"), str(out), config=config, max_gpu_hours=10.0, shard_deployment="x/y")

    summary = caption_dataset_flow(str(tmp_path / "in"), str(out), config=config, max_gpu_hours=10.0, estimate_pilot=2)
    assert summary["processed"] == 2 and summary["items"] == 4
    assert len(artifacts(key="mils-estimate")) == 2  # the estimate within budget is published too


def test_a_refusal_in_planning_fails_at_once_and_an_io_failure_is_retried(prefect_server, tmp_path, photos, pool_dir):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.caption import caption_dataset_flow
    from mils_pipeline.errors import OutputError, is_refusal

    write_shards(tmp_path / "in", photos, ["shard-000"])
    out = str(tmp_path / "out")
    caption_dataset_flow(str(tmp_path / "in"), out, config=run_settings(pool_dir, max_rounds=0))
    # Another config into the same output: a new dataset version, refused by the plan (no retry can change that)
    state = caption_dataset_flow(
        str(tmp_path / "in"), out, config=run_settings(pool_dir, max_rounds=1), return_state=True
    )
    assert state.is_failed()
    with pytest.raises(OutputError, match="new output location"):
        state.result()
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    [plan] = [t for t in task_runs if t.name.startswith("list shards and manifests")]
    assert plan.run_count == 1 and plan.state.is_failed()

    # What the condition tells apart: an error of ours wrapping an I/O failure is retried, a check is not
    try:
        try:
            raise ConnectionResetError("the store went away")
        except OSError as exc:
            raise OutputError("cannot read the manifests") from exc
    except OutputError as wrapped:
        assert not is_refusal(wrapped)
    assert is_refusal(OutputError("holds another dataset version"))
    assert not is_refusal(OSError("disk"))
    assert not is_refusal(ValueError("not ours"))
