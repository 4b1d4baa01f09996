"""Prefect flow ``rescore_dataset``: a finished dataset's kept candidates scored by another scorer,
written as a new dataset version (``mils_pipeline.rescore``; `mils rescore` is the same run in one
process).

The library's one driver (``mils_pipeline.rescore.rescore_dataset``) runs it; this flow passes a
shard runner that rescores each parent shard as a retried task (the scorer loads once per process),
wraps planning and finishing as retried tasks, and adds artifacts: a table of the shards, the two
scorers' agreement (``mils-rescore-agreement``) and the HTML report of the new dataset, linked as
the caption flows link theirs. Shard outputs are idempotent (manifests last, skipped by rescore id),
so a retried or rerun shard never duplicates rows. Parameters are checked against the worker policy
before a file is read, a model loaded or anything written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff

from flows.caption import gpu_slot_held, report_task, retry_unless_refused, run_logger
from mils_pipeline.config import RunConfig
from mils_pipeline.errors import ShardsFailedError
from mils_pipeline.policy import check_worker_file
from mils_pipeline.rescore import (
    BUNDLED_SCORERS,
    RescorePlan,
    RescoreReport,
    ShardOutcome,
    finish_rescore,
    plan_rescore,
    release_rescorers,
    rescore_config,
    rescore_dataset,
    rescore_shard,
    shared_rescorer,
)


@task(
    name="list the shards to rescore",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=retry_unless_refused,
)
def plan_task(dataset: str, out: str, config: RunConfig) -> RescorePlan:
    return plan_rescore(dataset, out, config)


@task(
    name="rescore shard",
    task_run_name="rescore shard {shard}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
)
def rescore_shard_task(plan: RescorePlan, shard: str) -> dict[str, Any]:
    with gpu_slot_held():  # the model loads inside the slot; a killed process's slot comes back with its lease
        outcome = rescore_shard(shared_rescorer(plan.config), plan, shard)
    run_logger().info("shard %s: %d rows rescored, %d newly quarantined", shard, outcome.rows, outcome.quarantined)
    return {"shard": outcome.shard, "status": outcome.status, "rows": outcome.rows, "quarantined": outcome.quarantined}


@task(name="write the card and rescore.json", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def finish_task(plan: RescorePlan) -> dict[str, Any]:
    return finish_rescore(plan)


class TaskShardRunner:
    """Each shard a task of this flow run (retried ``retries`` times), one after another; a shard
    that fails after its retries does not stop the others."""

    run_id = ""

    def __init__(self, retries: int) -> None:
        self.retries = retries

    def __call__(self, plan: RescorePlan) -> Iterator[ShardOutcome]:
        unit = rescore_shard_task.with_options(retries=self.retries)
        for shard in plan.todo:
            state = unit(plan, shard, return_state=True)
            if state.is_completed():
                self.run_id = shared_rescorer(plan.config).run_id
                yield ShardOutcome(**state.result())
            else:
                run_logger().error("shard %s failed after %d retries: %s", shard, self.retries, state.message)
                yield ShardOutcome(shard, "failed", state.message or "failed")


def _publish(report: RescoreReport) -> None:
    create_table_artifact(
        table=[{"shard": o.shard, "status": o.status, "items": o.rows, "reason": o.reason} for o in report.outcomes],
        key="mils-rescore-shards",
        description=f"{report.out}: shards rescored from {report.dataset}",
    )
    create_markdown_artifact(
        markdown="\n".join(["```", *report.summary_lines(), "```"]),
        key="mils-rescore-agreement",
        description=f"{report.out}: how the run's scorer and the new one agree",
    )


@flow(name="rescore_dataset")
def rescore_dataset_flow(
    dataset: str,
    out: str,
    scorer: str | dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    shard_retries: int = 2,
) -> dict[str, Any]:
    """Score every kept candidate of ``dataset`` with ``scorer`` (a bundled judge such as
    ``toy-audit``, a YAML file of scorer settings on the worker, or the settings as a dict; else
    the ``scorer`` section of ``config`` / ``config_path``) into ``out``, a new dataset version.
    Rerunning skips the shards already rescored; a failed shard fails the flow at the end, naming it."""
    for path, setting in ((config_path, "config_path"), (scorer, "scorer")):
        if isinstance(path, str) and path not in BUNDLED_SCORERS:
            check_worker_file(path, setting)
    run_config = rescore_config(dataset, scorer, config_path, overrides, config)
    runner = TaskShardRunner(shard_retries)
    try:
        report = rescore_dataset(dataset, out, run_config, runner=runner, plan=plan_task, finish=finish_task)
    except ShardsFailedError as exc:
        if isinstance(exc.summary, RescoreReport):
            _publish(exc.summary)
        raise
    finally:
        release_rescorers()  # the model and its GPU claim are not kept past the flow run
    _publish(report)
    index = report_task(out)
    run_logger().info("%s; HTML report: %s", "; ".join(report.summary_lines()), index)
    return {**report.summary(), "report": index}
