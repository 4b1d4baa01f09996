"""Running a caption job: the runtime (models loaded once per process), the plan, a shard's
stages, one driver for every way units run, and one cost report built from manifests."""

from mils_pipeline.run.driver import (
    InProcessRunner,
    UnitOutcome,
    UnitRunner,
    caption_dataset,
    finish_dataset,
    run_dataset,
)
from mils_pipeline.run.plan import ShardPlan, plan_shards
from mils_pipeline.run.report import Cost, RunReport, ShardReport, dataset_cost
from mils_pipeline.run.runtime import (
    Runtime,
    build_runtime,
    discard_runtime,
    new_run_id,
    release_runtimes,
    shared_runtime,
)
from mils_pipeline.run.shard import caption_shard

__all__ = [
    "Cost",
    "InProcessRunner",
    "RunReport",
    "Runtime",
    "ShardPlan",
    "ShardReport",
    "UnitOutcome",
    "UnitRunner",
    "build_runtime",
    "caption_dataset",
    "caption_shard",
    "dataset_cost",
    "discard_runtime",
    "finish_dataset",
    "new_run_id",
    "plan_shards",
    "release_runtimes",
    "run_dataset",
    "shared_runtime",
]
