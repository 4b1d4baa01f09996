"""The one run driver: plan, run the shard units, finish the dataset, report.

How units run is the only thing that differs between the CLI and the flows, so it is a parameter:
a ``UnitRunner`` takes the shards to do and yields one ``UnitOutcome`` per shard. ``InProcessRunner``
captions them in this process (the CLI, tests, benchmarks); the Prefect flows pass runners that
submit each unit as a task or as a flow run of a deployment (flows/caption.py). Whatever the
runner, a failed unit never stops the others, the card is written when any unit succeeded, the
report is built from the manifests, and the run ends with ``ShardsFailedError`` naming every
failed shard and its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import ShardReadError, ShardsFailedError
from mils_pipeline.io.manifest import read_manifests
from mils_pipeline.io.shards import ShardInfo
from mils_pipeline.policy import check_run
from mils_pipeline.run.card import write_card
from mils_pipeline.run.plan import ShardPlan, plan_shards
from mils_pipeline.run.report import RunReport, ShardReport
from mils_pipeline.run.runtime import Progress, Runtime, build_runtime, no_progress
from mils_pipeline.run.shard import caption_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitOutcome:
    """How one shard unit ended: ``done``, ``skipped`` (found done), or ``failed`` with a reason."""

    shard: str
    status: str
    reason: str | None = None


class UnitRunner(Protocol):
    """Runs shard units and yields one outcome per shard, in any order."""

    run_id: str  # the run id units write into rows ("" when units run elsewhere)
    seconds_setup: float  # time this process spent loading models for the units

    def run(self, shards: Sequence[ShardInfo], output: str, config: RunConfig) -> Iterator[UnitOutcome]: ...


class InProcessRunner:
    """Units one after another in this process, on one runtime (built on first need, or given).
    A shard whose input cannot be read fails alone; any other error stops the run."""

    def __init__(self, runtime: Runtime | None = None, progress: Progress = no_progress) -> None:
        self.runtime = runtime
        self.progress = progress
        self.run_id = runtime.run_id if runtime else ""
        self.seconds_setup = 0.0

    def run(self, shards: Sequence[ShardInfo], output: str, config: RunConfig) -> Iterator[UnitOutcome]:
        if self.runtime is not None and self.runtime.config.config_sha256() != config.config_sha256():
            raise ValueError("the runner was given a runtime built for another config")
        runtime = self.runtime or build_runtime(config, progress=self.progress)
        if self.runtime is None:
            self.run_id, self.seconds_setup = runtime.run_id, runtime.seconds_setup
        try:
            for shard in shards:
                try:
                    yield UnitOutcome(shard.name, caption_shard(runtime, shard, output, self.progress).status)
                except ShardReadError as exc:  # this shard's input is at fault: the other shards go on
                    log.error("shard %s failed: %s", shard.name, exc)
                    yield UnitOutcome(shard.name, "failed", str(exc))
        finally:
            if self.runtime is None:
                runtime.close()


def finish_dataset(output: str, config: RunConfig) -> str | None:
    """Write the dataset card over every finished shard; push to the hub when configured.
    Returns the hub URL when pushed."""
    write_card(output, config)
    if config.publish.hub_repo:
        from mils_pipeline.io.publish import push_to_hub

        return push_to_hub(output, config.publish.hub_repo, private=config.publish.private)
    return None


def report_run(
    output: str, plan: ShardPlan, outcomes: dict[str, UnitOutcome], runner: UnitRunner, seconds: float
) -> RunReport:
    """The run's report, from the manifests it left (and the outcomes of units that left none)."""
    manifests = read_manifests(output) if plan.shards else {}
    shards = []
    for shard in plan.shards:
        outcome = outcomes.get(shard.name)
        if outcome is not None and outcome.status == "failed":
            shards.append(ShardReport(shard=shard.name, status="failed", reason=outcome.reason))
            continue
        manifest = manifests.get(shard.name)
        status = outcome.status if outcome is not None else "skipped"
        shards.append(ShardReport.from_manifest(shard.name, status if manifest else "not done", manifest))
    return RunReport(output, runner.run_id, shards, seconds=seconds, seconds_setup=runner.seconds_setup)


def run_dataset(
    source: str,
    output: str,
    config: RunConfig,
    runner: UnitRunner,
    select: Sequence[str] | None = None,
    plan: Callable[..., ShardPlan] = plan_shards,
    finish: Callable[[str, RunConfig], str | None] = finish_dataset,
) -> RunReport:
    """Caption every shard under ``source`` (or those matching ``select``) not yet done into
    ``output`` through ``runner``; write the card; report. ``plan`` and ``finish`` may be wrapped
    by an orchestrator (retries), never replaced by other logic. The worker policy is checked
    first: a refused run lists nothing, loads nothing and writes nothing."""
    check_run(config, source, output)
    started = time.perf_counter()
    shard_plan = plan(source, output, config, select)
    outcomes = {o.shard: o for o in runner.run(shard_plan.todo, output, config)} if shard_plan.todo else {}
    failed = [o for o in outcomes.values() if o.status == "failed"]
    hub_url = finish(output, config) if len(failed) < len(shard_plan.todo) else None
    report = report_run(output, shard_plan, outcomes, runner, time.perf_counter() - started)
    report.hub_url = hub_url
    if report.failures:
        raise ShardsFailedError(report.failures, report)
    return report


def caption_dataset(
    source: str,
    output: str,
    config: RunConfig,
    runtime: Runtime | None = None,
    progress: Progress = no_progress,
    select: Sequence[str] | None = None,
) -> RunReport:
    """Caption every shard under ``source`` not yet done into ``output``, in this process."""
    return run_dataset(source, output, config, InProcessRunner(runtime, progress), select)
