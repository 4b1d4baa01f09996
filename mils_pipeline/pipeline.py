"""Shards in, Parquet out: the caption run as plain functions (flows call these).

``build_runtime`` loads the models and the seed pool once per process; ``caption_shard`` turns one
shard into its data part, quarantine part and manifest; ``caption_dataset`` does every shard of a
source and writes the dataset card.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import MediaDecodeError, SeedPoolError, ShardReadError, ShardsFailedError
from mils_pipeline.generate import Generator, build_generator
from mils_pipeline.hashing import bytes_sha256
from mils_pipeline.io.card import write_card
from mils_pipeline.io.manifest import (
    check_not_done_under_another_name,
    manifest_url,
    read_manifest,
    read_manifests,
    shard_is_done,
    write_manifest,
)
from mils_pipeline.io.shards import ShardDamagedError, ShardInfo, iter_samples, list_shards
from mils_pipeline.io.sink import (
    QUARANTINE_SCHEMA,
    check_writable,
    data_schema,
    join_url,
    remove_leftover_temporaries,
    write_parquet,
)
from mils_pipeline.io.storage import configure_storage
from mils_pipeline.media import decode, pick_media
from mils_pipeline.memory import apply_gpu_plan, plan_for_worker
from mils_pipeline.optimize import ItemInput, ItemResult, MilsOptimizer
from mils_pipeline.prefetch import prefetch
from mils_pipeline.score import CachedTextEncoder, Scorer, build_scorer, build_text_encoder
from mils_pipeline.score.objective import MEDIA_PARTS, Component
from mils_pipeline.seeding import SeedPool, load_seed_pool, pool_embeddings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int | None], None]  # (what, advance, total)


def _no_progress(what: str, advance: int, total: int | None) -> None:
    return None


@dataclass
class Runtime:
    """Models, seed pool and loop of one process, built once and reused for every shard."""

    config: RunConfig
    generator: Generator
    scorer: Scorer
    encoder: CachedTextEncoder
    seed_pool: SeedPool
    optimizer: MilsOptimizer
    run_id: str
    seconds_setup: float

    @property
    def extra_components(self) -> list[Component]:
        """Scorers combined with the main one (a video's sound track), from the objective."""
        return self.optimizer.objective.components[1:]

    def close(self) -> None:
        self.generator.close()
        for encoder in [self.encoder, *(c.encoder for c in self.extra_components)]:
            if encoder.store is not None:
                encoder.store.close()

    def decode_options(self) -> dict[str, Any]:
        """What the scorers ask of the decoder (frames per clip, audio rate and windows)."""
        options: dict[str, Any] = dict(getattr(self.scorer, "decode_options", {}))
        for component in self.extra_components:
            options.update(getattr(component.scorer, "decode_options", {}))
        return options

    def scorer_rows(self) -> list[dict[str, Any]]:
        """Every scorer of the objective, with its weight: the `scorers` column."""
        return [
            {"name": c.name, "weight": c.weight, **c.scorer.identity.as_row()}
            for c in self.optimizer.objective.components
        ]


def build_runtime(config: RunConfig, run_id: str | None = None, progress: Progress = _no_progress) -> Runtime:
    started = time.perf_counter()
    configure_storage(config.storage)
    pool = load_seed_pool(config.seed_pool.pool, config.seed_pool.dir)
    scorer = build_scorer(config.scorer, config.modality)
    plan = plan_for_worker(config, scorer)
    if plan is not None:  # one setting (gpu.memory_fraction) sizes vLLM and the scorer together
        log.info("GPU memory plan: %s", plan.describe())
        config = apply_gpu_plan(config, plan)
        scorer.media_batch_size = plan.media_batch_size
    embeddings = pool_embeddings(
        pool,
        scorer,
        config.scorer.text_batch_size,
        config.seed_pool.dir,
        progress=lambda n: progress("embedding seed pool", n, len(pool.texts)),
    )
    extra_components = []
    for extra in config.extra_scorers:
        extra_scorer = build_scorer(extra, extra.media)
        extra_embeddings = pool_embeddings(pool, extra_scorer, extra.text_batch_size, config.seed_pool.dir)
        extra_encoder = build_text_encoder(extra_scorer, extra)
        extra_components.append(
            Component(extra.media, extra.weight, extra_encoder, extra_embeddings, MEDIA_PARTS[extra.media])
        )
    generator = build_generator(config.generator)
    encoder = build_text_encoder(scorer, config.scorer)
    optimizer = MilsOptimizer(generator, encoder, pool, embeddings, config, extra_components)
    return Runtime(
        config=config,
        generator=generator,
        scorer=scorer,
        encoder=encoder,
        seed_pool=pool,
        optimizer=optimizer,
        run_id=run_id or new_run_id(),
        seconds_setup=time.perf_counter() - started,
    )


_RUNTIMES: dict[str, Runtime] = {}


def shared_runtime(config: RunConfig) -> Runtime:
    """The process's runtime for this config, built on first use: a process that captions many
    shards loads its models and seed pool once."""
    key = config.model_dump_json()
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        runtime = _RUNTIMES[key] = build_runtime(config)
    return runtime


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@dataclass
class ShardResult:
    shard: str
    status: str  # "done" or "skipped"
    rows: int = 0
    quarantined: int = 0
    mean_score: float | None = None
    mean_rounds: float | None = None
    stop_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cost: dict[str, Any] = field(default_factory=dict)


def _quarantine_row(shard: ShardInfo, key: str, member: str, error_type: str, message: str) -> dict[str, Any]:
    return {"key": key, "source_shard": shard.name, "member": member, "error_type": error_type, "message": message}


def _decoded_items(
    shard: ShardInfo,
    config: RunConfig,
    quarantine: list[dict[str, Any]],
    timings: dict[str, float],
    options: dict[str, Any] | None = None,
) -> Iterator[ItemInput]:
    """Decoded items of a shard in order; every sample that cannot be captioned becomes a
    quarantine row instead. Runs in the prefetch thread."""
    seen: set[str] = set()
    order = 0
    samples = iter_samples(shard.url, allow_pipe=config.storage.allow_pipe_urls)
    while True:
        started = time.perf_counter()
        try:
            raw = next(samples)
        except StopIteration:
            return
        except ShardDamagedError as exc:
            quarantine.append(_quarantine_row(shard, exc.key, "", "damaged_shard", str(exc)))
            return
        finally:
            timings["read"] += time.perf_counter() - started
        started = time.perf_counter()
        member = raw.member_names[0] if raw.member_names else raw.key
        if raw.key in seen:
            quarantine.append(
                _quarantine_row(
                    shard, raw.key, member, "duplicate_key", "a sample with this key came earlier in the shard"
                )
            )
            continue
        seen.add(raw.key)
        try:
            ext, data = pick_media(raw.members, config.modality)
            media = decode(config.modality, data, **(options or {}))
        except MediaDecodeError as exc:
            quarantine.append(_quarantine_row(shard, raw.key, member, exc.error_type, str(exc)))
            continue
        finally:
            timings["decode"] += time.perf_counter() - started
        meta: dict[str, Any] = {"order": order, "media_sha256": bytes_sha256(data), "member": f"{raw.key}.{ext}"}
        if config.output.include_media:
            meta["media"] = {"bytes": data, "path": f"{raw.key}.{ext}"}
        order += 1
        yield ItemInput(key=raw.key, media=media, meta=meta)


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


def _shard_outputs(output: str, shard: ShardInfo) -> dict[str, str]:
    """The files one shard unit writes, the manifest last."""
    return {
        "quarantine": join_url(output, "quarantine", f"part-{shard.name}.parquet"),
        "data": join_url(output, "data", f"part-{shard.name}.parquet"),
        "manifest": manifest_url(output, shard),
    }


def _model_identities(runtime: Runtime) -> dict[str, dict[str, Any]]:
    return {"generator": runtime.generator.identity.as_row(), "scorer": runtime.scorer.identity.as_row()}


def _delta(before: Any, after: Any) -> Any:
    if isinstance(after, dict):
        return {k: _delta(before.get(k, 0), v) for k, v in after.items() if v != before.get(k, 0)}
    return round(after - before, 4) if isinstance(after, float) else after - before


def _cost_delta(before: Any, after: Any) -> dict[str, Any]:
    """What one shard added to cumulative counters (numbers, and dicts of numbers)."""
    old = asdict(before)
    return {name: _delta(old[name], value) for name, value in asdict(after).items()}


def caption_shard(runtime: Runtime, shard: ShardInfo, output: str, progress: Progress = _no_progress) -> ShardResult:
    """Caption one shard into ``output``. Skips a shard already done with this config and input."""
    config = runtime.config
    config_sha = config.config_sha256()
    if shard_is_done(
        read_manifest(output, shard), shard, config_sha, output, runtime.seed_pool.id, _model_identities(runtime)
    ):
        log.info("shard %s is already done for config %s; skipping", shard.name, config_sha[:12])
        return ShardResult(shard=shard.name, status="skipped")

    progress(f"shard {shard.name}", 0, None)
    started = time.perf_counter()
    targets = _shard_outputs(output, shard)
    for url in targets.values():
        if remove_leftover_temporaries(url):
            log.warning("removed temporary files a killed earlier run left beside %s", url)
    loop_before = copy.deepcopy(runtime.optimizer.stats)
    encoder_before = copy.deepcopy(runtime.encoder.stats)
    quarantine: list[dict[str, Any]] = []
    timings = {"read": 0.0, "decode": 0.0}
    decoded = _decoded_items(shard, config, quarantine, timings, runtime.decode_options())
    items = prefetch(decoded, depth=2 * config.optimize.max_active_items)
    results: list[ItemResult] = []
    for result in runtime.optimizer.run(items):
        if result.error is not None:
            quarantine.append(_quarantine_row(shard, result.key, result.meta["member"], *result.error))
        else:
            results.append(result)
        progress(f"shard {shard.name}", 1, None)
    results.sort(key=lambda r: r.meta["order"])

    created_at = datetime.now(UTC)
    write_started = time.perf_counter()
    for row in quarantine:
        row.update(run_id=runtime.run_id, created_at=created_at)
    quarantined = write_parquet(
        targets["quarantine"],
        quarantine,
        QUARANTINE_SCHEMA,
        config.output.compression,
    )
    provenance = _provenance(runtime, shard, created_at)
    rows = [_data_row(r, provenance, config) for r in results]
    written = write_parquet(
        targets["data"],
        rows,
        data_schema(config.output.include_media, config.modality),
        config.output.compression,
    )
    seconds_write = time.perf_counter() - write_started

    scores = [r.score for r in results]
    result = ShardResult(
        shard=shard.name,
        status="done",
        rows=written,
        quarantined=quarantined,
        mean_score=float(np.mean(scores)) if scores else None,
        mean_rounds=float(np.mean([r.rounds for r in results])) if results else None,
        stop_reasons=dict(Counter(r.stop_reason for r in results)),
        seconds=time.perf_counter() - started,
    )
    result.cost = {
        "loop": _cost_delta(loop_before, runtime.optimizer.stats),
        "text_encoder": _cost_delta(encoder_before, runtime.encoder.stats),
        "seconds_read": round(timings["read"], 4),
        "seconds_decode": round(timings["decode"], 4),
        "seconds_write": round(seconds_write, 4),
    }
    loop = result.cost["loop"]
    # orchestration: prompts, parsing, merging, waits on the prefetch thread; the shard's wall time
    # less generation, scoring and writing (reading and decoding overlap it in the background)
    accounted = loop.get("seconds_generate", 0) + loop.get("seconds_score", 0) + loop.get("seconds_media", 0)
    result.cost["seconds_other"] = round(max(0.0, result.seconds - accounted - seconds_write), 4)
    write_manifest(
        output,
        shard,
        {
            "status": "done",
            "config_sha256": config_sha,
            "run_id": runtime.run_id,
            "seed_pool_id": runtime.seed_pool.id,
            **_model_identities(runtime),
            "scorers": runtime.scorer_rows(),
            "rows": written,
            "quarantined": quarantined,
            "mean_score": result.mean_score,
            "stop_reasons": result.stop_reasons,
            "seconds": round(result.seconds, 3),
            "cost": result.cost,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            # which machine wrote the shard: MILS_WORKER_NAME when a deployment sets it
            "worker": {"name": os.environ.get("MILS_WORKER_NAME") or socket.gethostname(), "pid": os.getpid()},
        },
    )
    return result


@dataclass
class RunSummary:
    run_id: str
    output: str
    shards: list[ShardResult]
    seconds: float
    seconds_setup: float

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def quarantined(self) -> int:
        return sum(s.quarantined for s in self.shards)

    @property
    def skipped(self) -> int:
        return sum(s.status == "skipped" for s in self.shards)

    def cost_total(self, section: str, name: str) -> float:
        """A cost counter summed over the shards this run processed (``section`` "loop",
        "text_encoder", or "" for the shard-level timings)."""
        total = 0.0
        for shard in self.shards:
            figures = shard.cost.get(section, {}) if section else shard.cost
            total += figures.get(name, 0) or 0
        return total

    def time_split(self) -> dict[str, float]:
        """Where the wall time went. Decoding runs ahead in a background thread, overlapping the
        rest, so it is reported apart and is not part of the sum."""
        split = {
            "setup (models, seed pool)": self.seconds_setup,
            "generation": self.cost_total("loop", "seconds_generate"),
            "scoring (texts, seed pool, media)": self.cost_total("loop", "seconds_score")
            + self.cost_total("loop", "seconds_media"),
            "writing outputs": self.cost_total("", "seconds_write"),
        }
        split["other (orchestration, I/O waits)"] = max(0.0, self.seconds - sum(split.values()))
        split["reading + decoding (background, overlapped)"] = self.cost_total("", "seconds_read") + self.cost_total(
            "", "seconds_decode"
        )
        return split

    def mean(self, attribute: str) -> float | None:
        weighted = [(getattr(s, attribute), s.rows) for s in self.shards if getattr(s, attribute) is not None]
        total = sum(n for _, n in weighted)
        return sum(v * n for v, n in weighted) / total if total else None


@dataclass
class ShardPlan:
    """What a run over a source has to do: every shard it covers, and those not yet done."""

    shards: list[ShardInfo]
    todo: list[ShardInfo]

    @property
    def done(self) -> list[ShardInfo]:
        return [s for s in self.shards if s not in self.todo]


def plan_shards(source: str, output: str, config: RunConfig, select: Sequence[str] | None = None) -> ShardPlan:
    """List the shards under ``source`` (only names matching one of the ``select`` patterns, when
    given), check that ``output`` can take files, and find the shards without a finished manifest
    for this config: a backfill is a plan over the same source after new shards arrived."""
    configure_storage(config.storage)
    shards = list_shards(source, allow_pipe=config.storage.allow_pipe_urls)
    if select:
        shards = [s for s in shards if any(fnmatch.fnmatchcase(s.name, pattern) for pattern in select)]
        if not shards:
            raise ShardReadError(f"no shard under {source!r} matches {list(select)}")
    check_writable(output)
    manifests = read_manifests(output)
    check_not_done_under_another_name(manifests, shards, output)
    config_sha = config.config_sha256()
    pool_id = _seed_pool_id(config)
    todo = [s for s in shards if not shard_is_done(manifests.get(s.name), s, config_sha, output, pool_id)]
    return ShardPlan(shards=shards, todo=todo)


def _seed_pool_id(config: RunConfig) -> str | None:
    """The seed pool's content id when the pool is reachable from here (a planner on a control
    machine may not hold it; the shard units check it again where they run)."""
    try:
        return load_seed_pool(config.seed_pool.pool, config.seed_pool.dir).id
    except SeedPoolError:
        return None


def finish_dataset(output: str, config: RunConfig) -> str | None:
    """Write the dataset card over every finished shard; push to the hub when configured.
    Returns the hub URL when pushed."""
    write_card(output, config)
    if config.publish.hub_repo:
        from mils_pipeline.io.publish import push_to_hub

        return push_to_hub(output, config.publish.hub_repo, private=config.publish.private)
    return None


def caption_dataset(
    source: str,
    output: str,
    config: RunConfig,
    runtime: Runtime | None = None,
    progress: Progress = _no_progress,
    select: Sequence[str] | None = None,
) -> RunSummary:
    """Caption every shard under ``source`` (or those matching ``select``) that is not yet done
    into ``output``, in this process, and write the dataset card."""
    started = time.perf_counter()
    plan = plan_shards(source, output, config, select)
    results = [ShardResult(shard=s.name, status="skipped") for s in plan.done]
    if runtime is not None and runtime.config.config_sha256() != config.config_sha256():
        raise ValueError("caption_dataset was given a runtime built for another config")
    own_runtime = runtime is None and bool(plan.todo)
    if own_runtime:
        runtime = build_runtime(config, progress=progress)
    failures: dict[str, str] = {}
    try:
        for shard in plan.todo:
            assert runtime is not None
            try:
                results.append(caption_shard(runtime, shard, output, progress))
            except ShardReadError as exc:  # this shard's input is at fault: the other shards go on
                log.error("shard %s failed: %s", shard.name, exc)
                failures[shard.name] = str(exc)
    finally:
        if own_runtime and runtime is not None:
            runtime.close()
    if len(failures) < len(plan.todo):
        finish_dataset(output, config)
    summary = RunSummary(
        run_id=runtime.run_id if runtime else "",
        output=output,
        shards=results,
        seconds=time.perf_counter() - started,
        seconds_setup=runtime.seconds_setup if own_runtime and runtime else 0.0,
    )
    if failures:
        raise ShardsFailedError(failures, summary)
    return summary
