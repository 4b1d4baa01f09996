"""Prefect flows: how shard units run on Prefect, around mils_pipeline's one run driver.

- ``caption_dataset``: ``mils_pipeline.run.run_dataset`` with a unit runner that captions each shard
  as a task of this flow run, or (with ``shard_deployment``) submits units of ``shards_per_unit``
  shards as flow runs of the ``caption_shard`` deployment on a work pool; planning and finishing
  run as retried tasks.
- ``caption_shard``: one unit, a batch of shards captioned one after another in one process, so
  the models load once per unit and not once per shard (a process or Kubernetes worker starts a new
  process for every flow run); deployable on its own (one worker per GPU).
- ``backfill``: ``caption_dataset`` under another name, for schedules over new shards (or a
  ``select``ed range): planning skips every shard already done for this config.
- ``build_seed_pool``: write a seed pool for a theme with the run's generator.

Planning, failure isolation, the card, the summary, the cost report and the HTML report are the
library's; this module adds retries, concurrency limits, fan-out and artifacts (the shards table,
progress, and a link to the HTML report written beside the dataset with its headline figures).
Shard outputs are idempotent (manifests are written last), so a retried or rerun unit never
duplicates rows.

Parameters come from anyone who can create a flow run: each flow checks them against the worker
policy of the machine it runs on (``mils_pipeline.policy``) before it reads a file, loads a model or
writes anything; a refusal is a Failed flow run with a ``PolicyError``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.tasks import exponential_backoff

from mils_pipeline.config import RunConfig, config_from_dict, load_config
from mils_pipeline.errors import GenerationError, ModelUnavailableError, ShardsFailedError, is_refusal
from mils_pipeline.estimate import DEFAULT_PILOT, GpuBudgetExceededError, check_gpu_budget, estimate_markdown
from mils_pipeline.fleet import GPU_LIMIT, GPU_SLOT_LEASE_SECONDS
from mils_pipeline.html_report import write_report
from mils_pipeline.io.manifest import read_manifest, shard_is_done
from mils_pipeline.io.shards import ShardInfo
from mils_pipeline.logs import install_log_redaction
from mils_pipeline.policy import check_run, check_worker_file
from mils_pipeline.run import (
    RunReport,
    ShardPlan,
    UnitOutcome,
    caption_shard,
    discard_runtime,
    finish_dataset,
    plan_shards,
    run_dataset,
    shared_runtime,
)
from mils_pipeline.seeding import build_seed_pool

# GPU_LIMIT: the global concurrency limit that caps shard units fleet-wide (one slot per GPU). Create
# it with `python -m mils_pipeline.fleet --gpus <GPUs>` (with the automation that crashes units whose
# heartbeats stopped); while it does not exist, units run unthrottled (each worker still runs at most
# `--limit` units, see deploy/). A unit holds one slot for its whole life, leased for
# GPU_SLOT_LEASE_SECONDS and renewed by its process: a killed unit's slot comes back when the lease ends.
READS_PER_POLL = 200  # flow runs read in one API call while waiting for units
# Shards per deployed unit: the models load once per unit, so a unit of 8 spends one load on 8
# shards; a lost worker still costs only the unit's unfinished shards (each shard has its manifest).
SHARDS_PER_UNIT = 8
# Unit flow runs submitted and not yet final at any time: the parent submits the next unit as one
# ends, so the server holds a bounded number of live runs and each poll is one read per 200 of them.
MAX_UNITS_IN_FLIGHT = 64


def run_logger():
    """The run's Prefect logger, with secrets redacted from everything Prefect's handlers write
    (console and the API's log store)."""
    install_log_redaction()
    return get_run_logger()


def resolve_config(
    config: dict[str, Any] | None = None, config_path: str | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """The run config from a dict (deployment parameters) or a YAML file of this machine (one the
    worker policy allows), plus overrides."""
    if config is not None:
        return config_from_dict(config, overrides)
    if config_path is not None:
        check_worker_file(config_path, "config_path")
    return load_config(config_path, overrides)


def gpu_slot_held() -> AbstractContextManager[None]:
    """One slot of ``mils-gpu`` (waits for it when the fleet's GPUs are all busy; nothing when the
    limit does not exist), leased for ``GPU_SLOT_LEASE_SECONDS`` and renewed while held, so a process
    killed while holding it gives it back when the lease runs out."""
    return concurrency(GPU_LIMIT, occupy=1, lease_duration=GPU_SLOT_LEASE_SECONDS)


def retry_unless_refused(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed task unless what it raised is a refusal the
    same call gives again (``errors.is_refusal``: a config mismatch, an output holding another
    dataset version); those fail at once instead of after the backoff of every retry."""
    return not (isinstance(state.data, BaseException) and is_refusal(state.data))


@task(
    name="list shards and manifests",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_unless_refused,
)
def plan_task(source: str, output: str, config: RunConfig, select: Sequence[str] | None) -> ShardPlan:
    return plan_shards(source, output, config, select)


@task(
    name="caption shard",
    task_run_name="caption shard {shard[name]}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
)
def caption_shard_task(shard: dict[str, Any], output: str, config: RunConfig, gpu_slot: bool = True) -> dict[str, Any]:
    """One shard, holding a ``mils-gpu`` slot while it loads models and captions (``gpu_slot``;
    a unit flow holds one slot for all its shards and passes False)."""
    logger = run_logger()
    with gpu_slot_held() if gpu_slot else nullcontext():
        try:
            report = caption_shard(shared_runtime(config), ShardInfo(**shard), output)
        except (GenerationError, ModelUnavailableError, RuntimeError):
            # failed inside a model (a dead vLLM engine, a CUDA error): the retry loads afresh
            discard_runtime(config)
            raise
    logger.info(
        "shard %s: %s, %d rows, %d quarantined, %.1f s",
        report.shard,
        report.status,
        report.rows,
        report.quarantined,
        report.seconds or 0.0,
    )
    return report.table_row()


@task(name="write dataset card and publish", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def finish_task(output: str, config: RunConfig) -> str | None:
    return finish_dataset(output, config)


@task(name="write the HTML report", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def report_task(output: str) -> str:
    """The dataset's HTML report in ``report/`` beside it, linked from the flow run with its headline figures."""
    report = write_report(output)
    link = report.index if "://" in report.index else Path(report.index).as_uri()
    create_link_artifact(link=link, link_text="HTML report", key="mils-report", description=f"HTML report of {output}")
    create_markdown_artifact(markdown=report.markdown(), key="mils-report-summary", description=f"{output}: headline")
    return report.index


@flow(name="caption_shard")
def caption_shard_flow(
    shards: list[dict[str, Any]], output: str, config: dict[str, Any], retries: int = 2
) -> list[dict[str, Any]]:
    """One unit: ``shards`` captioned one after another in this process, which builds the models on
    the first shard and keeps them for the rest, holding one ``mils-gpu`` slot throughout (the
    limit caps units, so it caps loaded models). Every shard is checked against this worker's policy
    before any model loads. A failed shard (after ``retries``) does not stop the others; the unit
    then fails naming it, and the shards it finished keep their manifests."""
    run_config = RunConfig.model_validate(config)
    for shard in shards:
        check_run(run_config, shard["url"], output, shard["name"])
    task = caption_shard_task.with_options(retries=retries)
    rows, failures = [], {}
    with gpu_slot_held():  # one GPU for the unit: from before its models load until its last shard ends
        for shard in shards:
            state = task(shard, output, run_config, gpu_slot=False, return_state=True)
            if state.is_completed():
                rows.append(state.result())
            else:
                failures[shard["name"]] = state.message or "failed"
    if failures:
        raise ShardsFailedError(failures)
    return rows


def units_of(shards: Sequence[ShardInfo], size: int, workers: int = 1) -> list[list[ShardInfo]]:
    """``shards`` in units of at most ``size``, in order, and small enough that each of ``workers``
    gets one while there are shards to go round (4 shards on 4 workers: 4 units of 1, not 1 of 4)."""
    if size < 1:
        raise ValueError(f"shards_per_unit must be at least 1, got {size}")
    size = max(1, min(size, -(-len(shards) // max(1, workers))))
    return [list(shards[start : start + size]) for start in range(0, len(shards), size)]


def online_workers(deployment: str) -> int:
    """How many workers of ``deployment``'s work pool are online now (at least 1: units wait in
    the pool for a worker that is not up yet)."""
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name
        if not pool:
            return 1
        online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        return max(1, len(client.read_workers_for_work_pool(pool, worker_filter=online)))


class _Progress:
    """The flow's progress artifact: shard units finished of those to do."""

    def __init__(self) -> None:
        self.id: Any = None
        self.total = 0
        self.finished = 0

    def start(self, total: int) -> None:
        self.total = total
        self.id = create_progress_artifact(progress=0.0, description=f"shard units done of {total}")

    def advance(self, count: int = 1) -> None:
        self.finished += count
        update_progress_artifact(self.id, progress=100.0 * self.finished / max(self.total, 1))


class TaskUnitRunner:
    """Each shard unit a task of this flow run (retried ``retries`` times), one after another."""

    run_id = ""
    seconds_setup = 0.0

    def __init__(self, retries: int, progress: _Progress) -> None:
        self.retries = retries
        self.progress = progress

    def run(self, shards: Sequence[ShardInfo], output: str, config: RunConfig) -> Iterator[UnitOutcome]:
        logger = run_logger()
        unit = caption_shard_task.with_options(retries=self.retries)
        self.progress.start(len(shards))
        for shard in shards:
            state = unit(shard.to_dict(), output, config, return_state=True)
            if state.is_completed():
                yield UnitOutcome(shard.name, state.result()["status"])
            else:
                logger.error("shard %s failed after %d retries: %s", shard.name, self.retries, state.message)
                yield UnitOutcome(shard.name, "failed", state.message or "failed")
            self.progress.advance()


class DeploymentUnitRunner:
    """Units of ``shards_per_unit`` shards, each a flow run of ``deployment`` on its work pool, in
    bounded waves: at most ``max_in_flight`` runs submitted and not yet final, the next unit
    submitted as one ends. The runs in flight are polled in batches (one filtered API call per
    ``READS_PER_POLL`` runs), so a 10,000-shard corpus costs a bounded number of flow runs and of
    API calls per minute. A shard of a failed unit counts as done when it left its finished manifest."""

    run_id = ""
    seconds_setup = 0.0

    def __init__(
        self,
        deployment: str,
        poll_seconds: float,
        progress: _Progress,
        shards_per_unit: int,
        retries: int,
        max_in_flight: int = MAX_UNITS_IN_FLIGHT,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_units_in_flight must be at least 1, got {max_in_flight}")
        self.deployment = deployment
        self.poll_seconds = poll_seconds
        self.progress = progress
        self.shards_per_unit = shards_per_unit
        self.retries = retries
        self.max_in_flight = max_in_flight

    def run(self, shards: Sequence[ShardInfo], output: str, config: RunConfig) -> Iterator[UnitOutcome]:
        parameters = {"output": output, "config": config.model_dump(mode="json"), "retries": self.retries}
        workers = online_workers(self.deployment)
        waiting = deque(units_of(shards, self.shards_per_unit, workers))
        run_logger().info(
            "%d shards in %d units for %s (%d workers online), at most %d in flight",
            len(shards),
            len(waiting),
            self.deployment,
            workers,
            self.max_in_flight,
        )
        self.progress.start(len(waiting))
        config_sha = config.config_sha256()
        in_flight: dict[UUID, list[ShardInfo]] = {}
        with get_client(sync_client=True) as client:
            while waiting or in_flight:
                while waiting and len(in_flight) < self.max_in_flight:
                    unit = waiting.popleft()
                    flow_run = run_deployment(
                        name=self.deployment,
                        parameters={"shards": [shard.to_dict() for shard in unit], **parameters},
                        timeout=0,
                        as_subflow=False,
                    )
                    in_flight[flow_run.id] = unit
                finished = 0
                pending = list(in_flight)
                for start in range(0, len(pending), READS_PER_POLL):
                    batch = FlowRunFilter(id=FlowRunFilterId(any_=pending[start : start + READS_PER_POLL]))
                    for flow_run in client.read_flow_runs(flow_run_filter=batch, limit=READS_PER_POLL):
                        state = flow_run.state
                        if state is None or not state.is_final():
                            continue
                        finished += 1
                        reason = f"flow run {flow_run.name} ended {state.name}: {state.message or 'no message'}"
                        for shard in in_flight.pop(flow_run.id):
                            if state.is_completed() or shard_is_done(
                                read_manifest(output, shard), shard, config_sha, output
                            ):
                                yield UnitOutcome(shard.name, "done")
                            else:
                                yield UnitOutcome(shard.name, "failed", reason)
                if finished:
                    self.progress.advance(finished)
                if in_flight and not (finished and waiting):  # a slot just freed: submit the next unit now
                    time.sleep(self.poll_seconds)


def _publish_report(report: RunReport) -> None:
    create_table_artifact(
        table=[s.table_row() for s in report.shards],
        key="mils-run-shards",
        description=f"{report.output}: shards, items, wall time {report.seconds:.0f} s",
    )


@task(name="estimate the run against its GPU budget")
def budget_task(
    source: str,
    output: str,
    config: RunConfig,
    select: Sequence[str] | None,
    max_gpu_hours: float,
    gpu: str | None,
    pilot: int,
) -> dict[str, Any]:
    """Caption a pilot of the corpus (mils_pipeline.estimate) and refuse the run when the upper
    estimate of its GPU-hours exceeds ``max_gpu_hours``; the figures go to an artifact either way."""
    try:
        estimate = check_gpu_budget(source, config, max_gpu_hours, pilot=pilot, gpu=gpu, select=select, output=output)
    except GpuBudgetExceededError as exc:
        create_markdown_artifact(
            markdown=estimate_markdown(exc.estimate, max_gpu_hours),
            key="mils-estimate",
            description=f"{source}: refused, over the GPU budget",
        )
        raise
    create_markdown_artifact(
        markdown=estimate_markdown(estimate, max_gpu_hours),
        key="mils-estimate",
        description=f"{source}: estimate within the GPU budget",
    )
    return estimate.to_dict()


@flow(name="caption_dataset")
def caption_dataset_flow(
    source: str,
    output: str,
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    select: list[str] | None = None,
    shard_deployment: str | None = None,
    poll_seconds: float = 5.0,
    shard_retries: int = 2,
    shards_per_unit: int = SHARDS_PER_UNIT,
    max_units_in_flight: int = MAX_UNITS_IN_FLIGHT,
    max_gpu_hours: float | None = None,
    estimate_gpu: str | None = None,
    estimate_pilot: int = DEFAULT_PILOT,
) -> dict[str, Any]:
    """Caption every shard under ``source`` not yet done into ``output``.

    With ``max_gpu_hours`` the flow first captions a pilot of ``estimate_pilot`` random items of
    the shards still to do (``mils estimate``) and refuses the run, before any shard is captioned,
    when the upper end of the estimate's interval for GPU-hours on ``estimate_gpu`` (default: the
    cost model's reference GPU) exceeds it; the figures are in the error and an artifact. The pilot
    runs in this flow's process, so ``max_gpu_hours`` is for runs without ``shard_deployment`` (a
    fan-out parent is refused: estimate on a GPU machine with ``mils estimate`` first).

    With ``shard_deployment`` (e.g. ``caption_shard/gpu``) the shards go to that deployment's work
    pool in units of at most ``shards_per_unit`` (one model load each; fewer when that leaves a
    worker online without a unit), in bounded waves: at most ``max_units_in_flight`` unit flow runs
    submitted and not yet final, the next submitted as one ends, so a corpus of 10,000 shards keeps
    a bounded number of runs on the server and the flow's polling a bounded number of API calls
    (one filtered read per 200 runs in flight every ``poll_seconds``). The flow waits for all of
    them; without ``shard_deployment``, shards run here. Each shard is retried ``shard_retries``
    times. A failed shard never stops the others: the flow fails at the end, naming the failed
    shards and why, and a rerun does only those.
    """
    if max_gpu_hours is not None and shard_deployment:
        raise ValueError(
            "max_gpu_hours captions a pilot in this flow's own process, and a fan-out parent (shard_deployment) "
            "runs where the run's models are not (the control pool): run `mils estimate SOURCE --config RUN.yaml "
            "--max-gpu-hours H` on a GPU machine before submitting the run, or leave max_gpu_hours out"
        )
    run_config = resolve_config(config, config_path, overrides)
    if max_gpu_hours is not None:
        budget_task(source, output, run_config, select, max_gpu_hours, estimate_gpu, estimate_pilot)
    progress = _Progress()
    runner = (
        DeploymentUnitRunner(
            shard_deployment, poll_seconds, progress, shards_per_unit, shard_retries, max_units_in_flight
        )
        if shard_deployment
        else TaskUnitRunner(shard_retries, progress)
    )
    try:
        report = run_dataset(source, output, run_config, runner, select, plan=plan_task, finish=finish_task)
    except ShardsFailedError as exc:
        _publish_report(exc.summary)
        raise
    _publish_report(report)
    index = report_task(output)
    run_logger().info("%s; HTML report: %s", "; ".join(report.summary_lines()), index)
    return {**report.summary(), "report": index}


backfill_flow = caption_dataset_flow.with_options(
    name="backfill",
    description="Caption the shards under the source (or matching `select`, e.g. ['shard-01*']) that have no "
    "finished manifest for this config: new shards since the last run, or failed ones.",
)


@flow(name="build_seed_pool")
def build_seed_pool_flow(
    theme: str,
    size: int,
    directory: str | None = None,
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    run_config = resolve_config(config, config_path)
    check_run(run_config, output=directory)
    pool = build_seed_pool(run_config, theme, size, directory, seed=seed)
    run_logger().info("seed pool %s: %d texts in %s", pool.id, len(pool.texts), pool.path)
    return {"id": pool.id, "size": len(pool.texts), "path": str(pool.path)}
