"""One shard unit: a shard's stream of items through the loop, split into the data part, the
quarantine part and, last, the manifest that marks the shard done."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mils_pipeline.config import RunConfig
from mils_pipeline.io.manifest import manifest_url, read_manifest, shard_is_done, write_manifest
from mils_pipeline.io.shards import ShardInfo
from mils_pipeline.io.sink import QUARANTINE_SCHEMA, data_schema, join_url, remove_leftover_temporaries, write_parquet
from mils_pipeline.optimize import ItemResult, Rejection
from mils_pipeline.policy import check_run
from mils_pipeline.prefetch import prefetch
from mils_pipeline.run.report import Cost, ShardReport
from mils_pipeline.run.runtime import Progress, Runtime, model_builds, no_progress
from mils_pipeline.run.stages import shard_items
from mils_pipeline.settings import settings

log = logging.getLogger(__name__)


def shard_outputs(output: str, shard: ShardInfo) -> dict[str, str]:
    """The files one shard unit writes, the manifest last."""
    return {
        "quarantine": join_url(output, "quarantine", f"part-{shard.name}.parquet"),
        "data": join_url(output, "data", f"part-{shard.name}.parquet"),
        "manifest": manifest_url(output, shard),
    }


def _quarantine_row(shard: ShardInfo, rejection: Rejection) -> dict[str, Any]:
    return {
        "key": rejection.key,
        "source_shard": shard.name,
        "member": rejection.member,
        "error_type": rejection.error_type,
        "message": rejection.message,
    }


def _provenance(runtime: Runtime, shard: ShardInfo, created_at: datetime) -> dict[str, Any]:
    """The columns every row of one shard shares: computed once per shard."""
    return {
        "source_shard": shard.name,
        "modality": runtime.config.modality,
        "generator": runtime.generator.identity.as_row(),
        "scorer": runtime.scorer.identity.as_row(),
        "scorers": runtime.scorer_rows(),
        "prompt_sha256": runtime.optimizer.prompt_sha256,
        "config_sha256": runtime.config.config_sha256(),
        "seed_pool_id": runtime.seed_pool.id,
        "run_id": runtime.run_id,
        "created_at": created_at,
    }


def _data_row(result: ItemResult, provenance: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    row: dict[str, Any] = {
        **provenance,
        "key": result.key,
        "media_sha256": result.meta["media_sha256"],
        "caption": result.caption,
        "score": result.score,
        "candidates": [asdict(c) for c in result.candidates],
        "trajectory": [asdict(r) for r in result.trajectory],
        "rounds": result.rounds,
        "stop_reason": result.stop_reason,
        "cost": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "texts_scored": result.texts_scored,
            "texts_encoded": result.texts_encoded,
            "texts_cached": result.texts_cached,
            "media_encoded": result.media_encoded,
            "empty_replies": result.empty_replies,
        },
    }
    if config.output.include_media:
        row[config.modality] = result.meta["media"]
    return row


def caption_shard(runtime: Runtime, shard: ShardInfo, output: str, progress: Progress = no_progress) -> ShardReport:
    """Caption one shard into ``output``. Skips a shard already done with this config and input.
    The worker policy is checked first: a unit may come from anyone who can submit one."""
    config = runtime.config
    check_run(config, shard.url, output, shard.name)
    config_sha = config.config_sha256()
    models = runtime.model_identities()
    if shard_is_done(read_manifest(output, shard), shard, config_sha, output, runtime.seed_pool.id, models):
        log.info("shard %s is already done for config %s; skipping", shard.name, config_sha[:12])
        return ShardReport(shard=shard.name, status="skipped")

    progress(f"shard {shard.name}", 0, None)
    started = time.perf_counter()
    targets = shard_outputs(output, shard)
    for url in targets.values():
        if remove_leftover_temporaries(url):
            log.warning("removed temporary files a killed earlier run left beside %s", url)
    items = shard_items(
        shard,
        config.modality,
        runtime.decode_options(),
        config.output.include_media,
        config.storage.allow_pipe_urls,
    )
    quarantine: list[Rejection] = []
    results: list[ItemResult] = []
    for outcome in runtime.optimizer.run(prefetch(items, depth=2 * config.optimize.max_active_items)):
        if isinstance(outcome, Rejection):
            quarantine.append(outcome)
        else:
            results.append(outcome)
            progress(f"shard {shard.name}", 1, None)
    results.sort(key=lambda r: r.meta["order"])

    created_at = datetime.now(UTC)
    write_started = time.perf_counter()
    quarantined = write_parquet(
        targets["quarantine"],
        [{**_quarantine_row(shard, r), "run_id": runtime.run_id, "created_at": created_at} for r in quarantine],
        QUARANTINE_SCHEMA,
        config.output.compression,
    )
    provenance = _provenance(runtime, shard, created_at)
    written = write_parquet(
        targets["data"],
        [_data_row(r, provenance, config) for r in results],
        data_schema(config.output.include_media, config.modality),
        config.output.compression,
    )
    seconds = time.perf_counter() - started
    cost = Cost(
        loop=runtime.optimizer.stats,
        text_encoder=runtime.encoder.stats,
        seconds_read=sum(r.seconds_read for r in quarantine) + sum(r.meta["seconds_read"] for r in results),
        seconds_decode=sum(r.seconds_decode for r in quarantine) + sum(r.meta["seconds_decode"] for r in results),
        seconds_write=time.perf_counter() - write_started,
    )
    # orchestration: prompts, parsing, merging, waits on the prefetch thread; the shard's wall time
    # less generation, scoring and writing (reading and decoding overlap it in the background)
    cost.seconds_other = max(0.0, seconds - cost.loop.seconds_generate - cost.seconds_scoring - cost.seconds_write)
    body = {
        "status": "done",
        "config_sha256": config_sha,
        "run_id": runtime.run_id,
        "seed_pool_id": runtime.seed_pool.id,
        **models,
        "scorers": runtime.scorer_rows(),
        "rows": written,
        "quarantined": quarantined,
        "mean_score": float(np.mean([r.score for r in results])) if results else None,
        "mean_rounds": float(np.mean([r.rounds for r in results])) if results else None,
        "stop_reasons": dict(Counter(r.stop_reason for r in results)),
        "seconds": round(seconds, 3),
        "cost": cost.as_dict(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # which machine wrote the shard (MILS_WORKER_NAME when a deployment sets it), and how many
        # models its process had built by then: 1 scorer and 1 generator for every shard of a unit
        "worker": {
            "name": settings().mils_worker_name or socket.gethostname(),
            "pid": os.getpid(),
            "models_built": model_builds(),
        },
    }
    write_manifest(output, shard, body)
    return ShardReport.from_manifest(shard.name, "done", body)
