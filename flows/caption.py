"""Prefect flows: orchestration over mils_pipeline's plain functions, never logic of their own.

- ``caption_dataset``: plan the shards of a source, caption each shard unit (in this process, or
  fanned out to a work pool through a ``caption_shard`` deployment), write the card, publish.
- ``caption_shard``: one shard unit; deployable on its own (one per GPU worker slot).
- ``backfill``: ``caption_dataset`` over the shards (under a prefix, or matching a range of
  names) that have no finished manifest for this config yet.
- ``build_seed_pool``: write a seed pool for a theme with the run's generator.

Shard outputs are idempotent (manifests are written last), so a retried or rerun unit never
duplicates rows and a finished run reruns as a no-op.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.tasks import exponential_backoff

from mils_pipeline.config import RunConfig, config_from_dict, load_config
from mils_pipeline.errors import ShardsFailedError
from mils_pipeline.io.manifest import read_manifest
from mils_pipeline.io.shards import ShardInfo
from mils_pipeline.logs import install_log_redaction
from mils_pipeline.pipeline import caption_shard, finish_dataset, plan_shards, shared_runtime
from mils_pipeline.seeding import build_seed_pool

# Global concurrency limit that caps shard units fleet-wide (one slot per GPU). Create it with
# `prefect gcl create mils-gpu --limit <GPUs>`; while it does not exist, units run unthrottled
# (each worker still runs at most `--limit` units, see deploy/).
GPU_LIMIT = "mils-gpu"


def _run_logger():
    """The run's Prefect logger, with secrets redacted from everything Prefect's handlers write
    (console and the API's log store)."""
    install_log_redaction()
    return get_run_logger()


def resolve_config(
    config: dict[str, Any] | None = None, config_path: str | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """The run config from a dict (deployment parameters) or a YAML file, plus overrides."""
    if config is not None:
        return config_from_dict(config, overrides)
    return load_config(config_path, overrides)


@task(
    name="list shards and manifests",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
)
def plan_task(source: str, output: str, config: RunConfig, select: list[str] | None) -> dict[str, list[dict]]:
    plan = plan_shards(source, output, config, select)
    return {"shards": [s.to_dict() for s in plan.shards], "todo": [s.to_dict() for s in plan.todo]}


@task(
    name="caption shard",
    task_run_name="caption shard {shard[name]}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
)
def caption_shard_task(shard: dict[str, Any], output: str, config: RunConfig) -> dict[str, Any]:
    logger = _run_logger()
    runtime = shared_runtime(config)
    with concurrency(GPU_LIMIT, occupy=1):
        result = caption_shard(runtime, ShardInfo(**shard), output)
    logger.info(
        "shard %s: %s, %d rows, %d quarantined, %.1f s",
        result.shard,
        result.status,
        result.rows,
        result.quarantined,
        result.seconds,
    )
    return asdict(result)


@task(name="write dataset card and publish", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def finish_task(output: str, config: RunConfig) -> str | None:
    return finish_dataset(output, config)


@task(name="read shard manifest", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=1))
def manifest_task(output: str, shard: dict[str, Any]) -> dict[str, Any] | None:
    return read_manifest(output, ShardInfo(**shard))


@flow(name="caption_shard")
def caption_shard_flow(shard: dict[str, Any], output: str, config: dict[str, Any]) -> dict[str, Any]:
    """One shard unit: what a GPU worker slot runs."""
    return caption_shard_task(shard, output, RunConfig.model_validate(config))


def _wait_for_runs(run_ids: dict[str, Any], poll_seconds: float, progress_id: Any) -> dict[str, str]:
    """Wait until every child flow run is final, updating the progress artifact as they finish;
    returns shard name -> final state name."""
    states: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        while len(states) < len(run_ids):
            before = len(states)
            for name, run_id in run_ids.items():
                if name in states:
                    continue
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    states[name] = state.name
            if len(states) > before:
                update_progress_artifact(progress_id, progress=100.0 * len(states) / len(run_ids))
            if len(states) < len(run_ids):
                time.sleep(poll_seconds)
    return states


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
) -> dict[str, Any]:
    """Caption every shard under ``source`` not yet done into ``output``.

    With ``shard_deployment`` (e.g. ``caption_shard/gpu``) each shard unit is submitted to that
    deployment's work pool and the flow waits for all of them; without it, units run here, each
    retried ``shard_retries`` times. A failed unit never stops the others: the flow fails at the
    end, naming the failed shards, and a rerun does only those.
    """
    logger = _run_logger()
    started = time.perf_counter()
    run_config = resolve_config(config, config_path, overrides)
    plan = plan_task(source, output, run_config, select)
    todo = plan["todo"]
    logger.info("%d shards under %s, %d to do", len(plan["shards"]), source, len(todo))
    progress_id = create_progress_artifact(progress=0.0, description=f"shard units done of {len(todo)}")

    failed: list[str] = []
    reasons: dict[str, str] = {}
    if shard_deployment:
        runs = {
            shard["name"]: run_deployment(
                name=shard_deployment,
                parameters={"shard": shard, "output": output, "config": run_config.model_dump(mode="json")},
                timeout=0,
                as_subflow=False,
            ).id
            for shard in todo
        }
        logger.info("submitted %d shard units to %s", len(runs), shard_deployment)
        states = _wait_for_runs(runs, poll_seconds, progress_id)
        failed = sorted(name for name, state in states.items() if state != "Completed")
    else:
        unit = caption_shard_task.with_options(retries=shard_retries)
        for done, shard in enumerate(todo, start=1):
            # a unit that fails after its retries is reported at the end; the units after it still run
            state = unit(shard, output, run_config, return_state=True)
            if not state.is_completed():
                logger.error("shard %s failed after %d retries: %s", shard["name"], shard_retries, state.message)
                failed.append(shard["name"])
                reasons[shard["name"]] = state.message or "failed"
            update_progress_artifact(progress_id, progress=100.0 * done / len(todo))

    rows = []
    for shard in plan["shards"]:
        manifest = manifest_task(output, shard) or {}
        rows.append(
            {
                "shard": shard["name"],
                "status": "done" if manifest.get("status") == "done" else "not done",
                "items": manifest.get("rows", 0),
                "quarantined": manifest.get("quarantined", 0),
                "mean_score": round(manifest["mean_score"], 4) if manifest.get("mean_score") is not None else None,
                "seconds": manifest.get("seconds"),
            }
        )
    update_progress_artifact(progress_id, progress=100.0)
    hub_url = finish_task(output, run_config) if len(failed) < len(todo) else None
    wall = time.perf_counter() - started
    create_table_artifact(
        table=rows, key="mils-run-shards", description=f"{output}: shards, items, wall time {wall:.0f} s"
    )
    summary = {
        "output": output,
        "shards": len(plan["shards"]),
        "processed": len(todo) - len(failed),
        "skipped": len(plan["shards"]) - len(todo),
        "items": sum(r["items"] for r in rows),
        "quarantined": sum(r["quarantined"] for r in rows),
        "wall_seconds": round(wall, 1),
        "hub_url": hub_url,
    }
    if failed:
        raise ShardsFailedError({name: reasons.get(name, "see the unit's flow run for the error") for name in failed})
    return summary


@flow(name="backfill")
def backfill_flow(
    source: str,
    output: str,
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    select: list[str] | None = None,
    shard_deployment: str | None = None,
    shard_retries: int = 2,
) -> dict[str, Any]:
    """Caption the shards under ``source`` (or matching ``select``, e.g. ``["shard-01*"]``) that
    have no finished manifest for this config: new shards since the last run, or failed ones."""
    return caption_dataset_flow(
        source,
        output,
        config=config,
        config_path=config_path,
        overrides=overrides,
        select=select,
        shard_deployment=shard_deployment,
        shard_retries=shard_retries,
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
    pool = build_seed_pool(resolve_config(config, config_path), theme, size, directory, seed=seed)
    _run_logger().info("seed pool %s: %d texts in %s", pool.id, len(pool.texts), pool.path)
    return {"id": pool.id, "size": len(pool.texts), "path": str(pool.path)}
