"""`mils rescore`: a finished dataset's kept candidates scored by another scorer (a second judge, a
newer model, an audit), with no generation, written as a new dataset version beside its parent.

Every row of the parent is copied with its own columns (caption, score, provenance, the parent's
``config_sha256`` and ``run_id``) and gains the new scorer's view: ``candidates[].rescore`` for
each kept candidate, ``rescore`` for the caption, ``rescore_caption`` / ``rescore_best`` for the
candidate the new scorer ranks first, ``rescore_rank_correlation`` (Spearman, the item's
candidates under both scorers), and ``rescore_scorer``, ``rescore_id``, ``rescore_run_id``,
``rescored_at``. The media come back from the source shards the parent's manifests name (or from
the rows, when the parent stored them). Quarantined samples have no rows and stay out; the parent's
quarantine is carried over, and media the new scorer cannot decode join it with the reason.

A rescore is identified by ``rescore_id``: the hash of the new scorer's output-affecting settings,
the modality and the parent's config hashes. Shards are written like a caption run's (data,
quarantine, manifest last, each file whole): a rerun skips the shards already rescored with the
same id from the same parent shard, a different scorer into the same location is refused as a new
version, and OUT may never be the dataset or lie inside it. The card and ``rescore.json`` give
the lineage and how the two scorers agree.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import yaml

from mils_pipeline.config import RunConfig, config_from_dict, output_affecting, sha256_json
from mils_pipeline.errors import ConfigError, MediaDecodeError, OutputError, ShardReadError, ShardsFailedError
from mils_pipeline.io.derived import SourceMediaError, locations_overlap, matched_samples, source_urls
from mils_pipeline.io.manifest import read_manifests, write_manifest
from mils_pipeline.io.parquet import parquet_file, read_columns, read_parquet
from mils_pipeline.io.shards import ShardInfo
from mils_pipeline.io.sink import (
    MODEL_STRUCT,
    QUARANTINE_SCHEMA,
    join_url,
    remove_leftover_temporaries,
    write_bytes_whole,
    write_parquet,
)
from mils_pipeline.io.storage import configure_storage
from mils_pipeline.media import decode
from mils_pipeline.policy import check_run
from mils_pipeline.run.gpu import GpuClaim, claim_gpus
from mils_pipeline.run.runtime import Progress, new_run_id, no_progress, uses_gpu
from mils_pipeline.score import CachedTextEncoder, Scorer, build_scorer, build_text_encoder
from mils_pipeline.settings import settings

log = logging.getLogger(__name__)

# Bundled scorers `--scorer NAME` names (the toy-world judges; they work offline).
BUNDLED_SCORERS = ("toy-scorer", "toy-audit")
SUMMARY = "rescore.json"
RESCORE_HISTOGRAM = "rescore_histogram.png"
NOT_A_DATASET = (
    "{url} is not a mils dataset: it has no data/part-*.parquet and no _manifests/. Pass the output "
    "location of `mils caption` (the folder or s3:// prefix that holds data/, quarantine/ and _manifests/)"
)
# The columns a rescore adds to every row, after the parent's.
RESCORE_FIELDS = (
    pa.field("rescore", pa.float32()),  # the new scorer's score of `caption`
    pa.field("rescore_caption", pa.string()),  # the kept candidate the new scorer ranks first
    pa.field("rescore_best", pa.float32()),  # its score under the new scorer
    pa.field("rescore_rank_correlation", pa.float32()),  # Spearman over the item's candidates; null below 2
    pa.field("rescore_scorer", MODEL_STRUCT),
    pa.field("rescore_id", pa.string()),
    pa.field("rescore_run_id", pa.string()),
    pa.field("rescored_at", pa.timestamp("us", tz="UTC")),
)
AGREEMENT_COLUMNS = ("caption", "score", "rescore", "rescore_caption", "rescore_best", "rescore_rank_correlation")


class RescoreError(OutputError):
    """The rescore cannot be made as asked."""


# --- which scorer ---------------------------------------------------------------------------------


def scorer_spec(spec: str | dict[str, Any]) -> dict[str, Any]:
    """The scorer settings ``--scorer`` names: a bundled judge (toy-scorer, toy-audit), a YAML file
    of scorer settings (the keys of a run config's ``scorer`` section, or a run config holding
    one), or the settings themselves (a flow parameter)."""
    if isinstance(spec, dict):
        return dict(spec)
    if spec in BUNDLED_SCORERS:
        from mils_pipeline.toyworld.corpus import scorer_settings

        return scorer_settings(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"--scorer {spec!r} is neither a bundled scorer ({', '.join(BUNDLED_SCORERS)}) nor a YAML file of scorer "
            "settings (e.g. backend: open_clip, model: ViT-B-16-SigLIP, checkpoint: weights.safetensors)"
        )
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"--scorer file {spec} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"--scorer file {spec} must hold a mapping of scorer settings")
    section = loaded.get("scorer", loaded)
    if not isinstance(section, dict):
        raise ConfigError(f"--scorer file {spec}: its scorer section must be a mapping of settings")
    return section


def dataset_modality(dataset: str) -> str | None:
    """The modality of the dataset's rows (None when it has none). Starts no thread: the
    refusals that follow it end the process at once."""
    fs, root = fsspec.core.url_to_fs(dataset)
    for path in sorted(fs.glob(join_url(root, "data", "part-*.parquet"))):
        with fs.open(path, "rb") as fh:
            column = read_parquet(fh, ["modality"]).column("modality")
        if len(column):
            return str(column[0].as_py())
    return None


def rescore_config(
    dataset: str,
    scorer: str | dict[str, Any] | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    config: dict[str, Any] | None = None,
) -> RunConfig:
    """The settings of a rescore: the ``scorer`` section (from ``scorer``, else from the config file
    or dict), ``--set`` overrides over it, storage settings, and the dataset's own modality."""
    overrides = list(overrides or [])
    data: dict[str, Any] = dict(config or {})
    if config_path is not None:
        try:
            loaded = yaml.safe_load(Path(config_path).expanduser().read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {config_path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_path} must hold a mapping of settings")
        data = loaded or {}
    # before the dataset is read: the worker policy allows reading it, and the store is reachable
    reach = config_from_dict({"storage": data.get("storage") or {}}, [o for o in overrides if o.startswith("storage.")])
    check_run(reach, dataset)
    configure_storage(reach.storage)
    if scorer is not None:
        data["scorer"] = scorer_spec(scorer)
    elif "scorer" not in data and not any(o.strip().startswith("scorer.") for o in overrides):
        raise ConfigError(
            "say which scorer rescores the dataset: --scorer toy-audit (a bundled judge), --scorer scorer.yaml "
            "(scorer settings), or a scorer section in --config / --set scorer.KEY=VALUE"
        )
    if data.get("extra_scorers"):
        raise ConfigError("a rescore scores with one scorer (the scorer section): remove extra_scorers")
    modality = dataset_modality(dataset)
    if modality is not None:
        if data.get("modality") not in (None, modality):
            raise ConfigError(f"the config says modality {data['modality']}, and {dataset} holds {modality} items")
        data["modality"] = modality
    return config_from_dict(data, overrides)


def rescore_id(config: RunConfig, parent_config_sha256: list[str]) -> str:
    """What identifies a rescore: the new scorer's output-affecting settings, the modality and the
    parent's config hashes."""
    canonical = {
        "modality": config.modality,
        "scorer": output_affecting(config.scorer),
        "parent_config_sha256": sorted(parent_config_sha256),
    }
    return sha256_json(canonical)


# --- planning -------------------------------------------------------------------------------------


@dataclass
class RescorePlan:
    """A rescore checked before anything is written: which parent shards to rescore into OUT."""

    dataset: str
    out: str
    config: RunConfig
    rescore_id: str
    manifests: dict[str, dict[str, Any]]  # the parent's finished shards
    todo: list[str]
    done: list[str]  # rescored earlier with this id from the same parent shard
    unfinished: list[str]  # parent data parts without a finished manifest: left out

    def parent_sha256(self, shard: str) -> str:
        return sha256_json(self.manifests[shard])


def _data_parts(dataset: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(dataset)
    names = [p.rsplit("/", 1)[-1] for p in fs.glob(join_url(root, "data", "part-*.parquet"))]
    return sorted(n.removeprefix("part-").removesuffix(".parquet") for n in names)


def plan_rescore(dataset: str, out: str, config: RunConfig) -> RescorePlan:
    """Check the dataset, OUT and the worker policy; list the shards to rescore."""
    check_run(config, dataset, out)
    configure_storage(config.storage)
    try:
        overlap = locations_overlap(dataset, out)
    except (ValueError, ImportError, OSError) as exc:
        raise RescoreError(f"cannot read {dataset} or write {out}: {exc}") from exc
    if overlap:
        raise RescoreError(
            f"OUT ({out}) is, holds or lies inside the dataset ({dataset}): a rescore is a new dataset version, "
            "never written in place; choose another location"
        )
    parent = read_manifests(dataset)
    parts = _data_parts(dataset)
    if not parts and not parent:
        raise RescoreError(NOT_A_DATASET.format(url=dataset))
    if any("rescore" in m for m in parent.values()):
        first = next(m["rescore"] for m in parent.values() if "rescore" in m)
        raise RescoreError(
            f"{dataset} is itself a rescore of {first['parent']['dataset']}: rescore that dataset instead (each "
            "rescore is a version of the caption run, with its own scores beside the run's)"
        )
    finished = {name: m for name, m in parent.items() if m.get("status", "done") == "done"}
    parent_hashes = sorted({str(m.get("config_sha256")) for m in finished.values()})
    rid = rescore_id(config, parent_hashes)
    existing = read_manifests(out)
    todo, done = [], []
    for name in sorted(finished):
        earlier = existing.get(name)
        if earlier is not None and _rescored_earlier(earlier, name, dataset, out, rid, sha256_json(finished[name])):
            done.append(name)
        else:
            todo.append(name)
    unfinished = [p for p in parts if p not in finished]
    return RescorePlan(dataset, out, config, rid, finished, todo, done, unfinished)


def _rescored_earlier(manifest: dict[str, Any], shard: str, dataset: str, out: str, rid: str, parent_sha: str) -> bool:
    """Whether OUT's manifest of ``shard`` is this rescore of this same parent shard; an error when
    OUT holds something else there (another scorer's rescore, another dataset, a caption run)."""
    earlier = manifest.get("rescore")
    if not earlier:
        raise RescoreError(
            f"{out} already holds shard {shard!r} of a caption run, not a rescore: write the rescore to a new location"
        )
    if earlier.get("id") != rid:
        raise RescoreError(
            f"{out} already holds shard {shard!r} rescored with another scorer or parent (rescore id "
            f"{str(earlier.get('id'))[:12]}, this one {rid[:12]}): another scorer is a new dataset version; "
            "write it to a new location"
        )
    if earlier.get("parent", {}).get("dataset") != dataset:
        raise RescoreError(
            f"{out} holds a rescore of {earlier.get('parent', {}).get('dataset')}, not of {dataset}: write this "
            "rescore to a new location"
        )
    return earlier.get("parent", {}).get("manifest_sha256") == parent_sha


# --- scoring --------------------------------------------------------------------------------------


@dataclass
class Rescorer:
    """The new scorer of one process, built once and used for every shard it rescores."""

    config: RunConfig
    scorer: Scorer
    encoder: CachedTextEncoder
    run_id: str
    gpu_claim: GpuClaim | None = None

    def close(self) -> None:
        if self.encoder.store is not None:
            self.encoder.store.close()
        if self.gpu_claim is not None:
            self.gpu_claim.release()


def build_rescorer(config: RunConfig, run_id: str | None = None) -> Rescorer:
    configure_storage(config.storage)
    gpu_claim = claim_gpus() if uses_gpu(config) else None
    try:
        scorer = build_scorer(config.scorer, config.modality)
        encoder = build_text_encoder(scorer, config.scorer)
    except BaseException:
        if gpu_claim is not None:
            gpu_claim.release()
        raise
    return Rescorer(config, scorer, encoder, run_id or new_run_id(), gpu_claim)


_RESCORERS: dict[str, Rescorer] = {}


def shared_rescorer(config: RunConfig, run_id: str | None = None) -> Rescorer:
    """The process's rescorer for this config, built on first use (a flow's shard tasks share it)."""
    key = config.model_dump_json()
    if key not in _RESCORERS:
        _RESCORERS[key] = build_rescorer(config, run_id)
    return _RESCORERS[key]


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def release_rescorers() -> None:
    while _RESCORERS:
        _RESCORERS.popitem()[1].close()


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (ties ranked by their mean), over the pairs where both are finite;
    None with fewer than two pairs or when either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


@dataclass
class _Scored:
    """A shard's rows as the new scorer saw them, and what it cost."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # parent row index -> new columns
    rejections: list[dict[str, Any]] = field(default_factory=list)
    texts_encoded: int = 0
    texts_truncated: int = 0
    media_encoded: int = 0


def _new_columns(row: dict[str, Any], new: np.ndarray, caption_score: float) -> dict[str, Any]:
    candidates = row.get("candidates") or []
    best = int(np.argmax(new)) if len(new) else None  # ties: the parent's order (best first) decides
    correlation = spearman(np.array([c["score"] for c in candidates], dtype=float), new) if len(new) > 1 else None
    return {
        "candidates": [{**c, "rescore": float(s)} for c, s in zip(candidates, new, strict=True)],
        "rescore": caption_score,
        "rescore_caption": candidates[best]["text"] if best is not None else row["caption"],
        "rescore_best": float(new[best]) if best is not None else caption_score,
        "rescore_rank_correlation": correlation,
    }


def _score_batch(rescorer: Rescorer, batch: list[tuple[int, dict[str, Any], Any]], scored: _Scored) -> None:
    """One media encoder call and one text encoder call for a batch of decoded rows."""
    media = rescorer.scorer.embed_media([m for _, _, m in batch])
    texts: list[str] = []
    spans = []
    for _, row, _ in batch:
        start = len(texts)
        texts += [c["text"] for c in row.get("candidates") or []] + [row["caption"] or ""]
        spans.append((start, len(texts)))
    before = rescorer.encoder.stats.encoded
    embeddings = rescorer.encoder.encode(texts)
    scored.texts_encoded += rescorer.encoder.stats.encoded - before
    scored.texts_truncated += int(np.sum(rescorer.scorer.truncated(texts))) if texts else 0
    scored.media_encoded += len(batch)
    for (index, row, _), (start, end), embedding in zip(batch, spans, media, strict=True):
        scores = embeddings[start:end] @ embedding
        scored.rows[index] = _new_columns(row, scores[:-1].astype(np.float32), float(scores[-1]))
    rescorer.encoder.release(texts)


def _row_media(
    shard: str, url: str, rows: list[dict[str, Any]], media_column: str | None
) -> Iterator[tuple[int, bytes, str]]:
    """(row index, media bytes, member name) of every row: from the rows when the parent stored its
    media, else from the source shard (matched by key and media hash)."""
    if media_column is not None:
        for index, row in enumerate(rows):
            stored = row.get(media_column) or {}
            if stored.get("bytes") is not None:
                yield index, stored["bytes"], stored.get("path") or row["key"]
        return
    positions = {id(row): index for index, row in enumerate(rows)}
    for ext, media, row in matched_samples(shard, url, rows):
        yield positions[id(row)], media, f"{row['key']}.{ext}"


def _score_shard(
    rescorer: Rescorer,
    shard: str,
    url: str,
    rows: list[dict[str, Any]],
    media_column: str | None,
    progress: Progress,
) -> _Scored:
    scored = _Scored()
    options = rescorer.scorer.decode_options
    batch: list[tuple[int, dict[str, Any], Any]] = []
    for index, data, member in _row_media(shard, url, rows, media_column):
        row = rows[index]
        try:
            decoded = decode(rescorer.config.modality, data, **options)
        except MediaDecodeError as exc:  # decodable for the run's scorer, not with this one's options
            scored.rejections.append(
                {
                    "key": row["key"],
                    "source_shard": shard,
                    "member": member,
                    "error_type": exc.error_type,
                    "message": str(exc),
                }
            )
            progress(f"rescore {shard}", 1, len(rows))
            continue
        batch.append((index, row, decoded))
        if len(batch) >= rescorer.scorer.media_batch_size:
            _score_batch(rescorer, batch, scored)
            progress(f"rescore {shard}", len(batch), len(rows))
            batch = []
    if batch:
        _score_batch(rescorer, batch, scored)
        progress(f"rescore {shard}", len(batch), len(rows))
    rejected = {r["key"] for r in scored.rejections}
    missing = [row["key"] for i, row in enumerate(rows) if i not in scored.rows and row["key"] not in rejected]
    if missing:
        raise RescoreError(
            f"{len(missing)} row(s) of shard {shard} hold no media bytes in the dataset's {media_column!r} column "
            f"({', '.join(missing[:10])}), so there is nothing to score them against: the dataset was written "
            "with part of its media missing. Caption this shard again into a new output with "
            "output.include_media: true, and rescore that"
        )
    return scored


def _rescored_schema(parent: pa.Schema) -> pa.Schema:
    fields = []
    for f in parent:
        if f.name == "candidates":
            struct = f.type.value_type
            f = pa.field("candidates", pa.list_(pa.struct([*struct, pa.field("rescore", pa.float32())])))
        fields.append(f)
    return pa.schema([*fields, *RESCORE_FIELDS])


def _read_parquet(url: str) -> pa.Table | None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as fh:
            return read_parquet(fh)
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class ShardOutcome:
    """How one shard's rescore ended: ``done``, ``skipped`` (rescored earlier) or ``failed`` with a reason."""

    shard: str
    status: str
    reason: str | None = None
    rows: int = 0
    quarantined: int = 0  # new rejections only


def rescore_shard(rescorer: Rescorer, plan: RescorePlan, shard: str, progress: Progress = no_progress) -> ShardOutcome:
    """Rescore one parent shard into ``plan.out``: data part, quarantine part, manifest last."""
    started = time.perf_counter()
    manifest = plan.manifests[shard]
    info = ShardInfo(name=shard, **manifest["input"])
    check_run(plan.config, info.url, plan.out, shard)
    targets = {
        "quarantine": join_url(plan.out, "quarantine", f"part-{shard}.parquet"),
        "data": join_url(plan.out, "data", f"part-{shard}.parquet"),
    }
    for url in targets.values():
        remove_leftover_temporaries(url)
    table = _read_parquet(join_url(plan.dataset, "data", f"part-{shard}.parquet"))
    if table is None:
        raise RescoreError(f"{plan.dataset} has a finished manifest for shard {shard} and no data/part-{shard}.parquet")
    if any(name in table.schema.names for name in ("rescore", "rescore_id")):
        raise RescoreError(f"{plan.dataset} shard {shard} is already rescored: rescore its parent dataset instead")
    rows = table.to_pylist()
    media_column = next((m for m in ("image", "video", "audio") if m in table.schema.names), None)
    url = info.url if media_column else source_urls([shard], plan.manifests, plan.dataset)[shard]
    progress(f"rescore {shard}", 0, len(rows))
    scored = _score_shard(rescorer, shard, url, rows, media_column, progress)

    created_at = datetime.now(UTC)
    identity = rescorer.scorer.identity.as_row()
    shared = {
        "rescore_scorer": identity,
        "rescore_id": plan.rescore_id,
        "rescore_run_id": rescorer.run_id,
        "rescored_at": created_at,
    }
    out_rows = [{**row, **scored.rows[i], **shared} for i, row in enumerate(rows) if i in scored.rows]
    compression = plan.config.output.compression
    parent_quarantine = _read_parquet(join_url(plan.dataset, "quarantine", f"part-{shard}.parquet"))
    carried = parent_quarantine.to_pylist() if parent_quarantine is not None else []
    rejected = [{**r, "run_id": rescorer.run_id, "created_at": created_at} for r in scored.rejections]
    quarantined = write_parquet(targets["quarantine"], carried + rejected, QUARANTINE_SCHEMA, compression)
    written = write_parquet(targets["data"], out_rows, _rescored_schema(table.schema), compression)
    new_scores = np.array([r["rescore"] for r in out_rows], dtype=float)
    changed = sum(r["rescore_caption"] != r["caption"] for r in out_rows)
    body = {
        **{k: v for k, v in manifest.items() if k not in ("manifest_version", "shard", "input")},
        "rows": written,
        "quarantined": quarantined,
        "rescore": {
            "id": plan.rescore_id,
            "run_id": rescorer.run_id,
            "scorer": identity,
            "parent": {
                "dataset": plan.dataset,
                "config_sha256": manifest.get("config_sha256"),
                "run_id": manifest.get("run_id"),
                "manifest_sha256": plan.parent_sha256(shard),
            },
            "rows": written,
            "quarantined": len(rejected),
            "mean_rescore": float(new_scores.mean()) if new_scores.size else None,
            "best_caption_changed": int(changed),
            "texts_encoded": scored.texts_encoded,
            "texts_truncated": scored.texts_truncated,
            "media_encoded": scored.media_encoded,
            "seconds": round(time.perf_counter() - started, 3),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "worker": {"name": settings().mils_worker_name or socket.gethostname(), "pid": os.getpid()},
        },
    }
    write_manifest(plan.out, info, body)
    return ShardOutcome(shard, "done", rows=written, quarantined=len(rejected))


# --- the dataset ----------------------------------------------------------------------------------


def read_agreement_columns(out: str) -> pa.Table | None:
    """The columns the agreement figures read, of every rescored row (None: not a rescored dataset)."""
    fs, root = fsspec.core.url_to_fs(out)
    tables = []
    for path in sorted(fs.glob(join_url(root, "data", "part-*.parquet"))):
        with fs.open(path, "rb") as fh:
            part = parquet_file(fh)
            if "rescore" not in part.schema_arrow.names:
                return None
            tables.append(read_columns(part, list(AGREEMENT_COLUMNS)))
    return pa.concat_tables(tables) if tables else None


def agreement(table: pa.Table) -> dict[str, Any]:
    """How the run's scorer and the new one agree over a rescored dataset's rows."""
    score = table.column("score").to_numpy(zero_copy_only=False).astype(float)
    new = table.column("rescore").to_numpy(zero_copy_only=False).astype(float)
    per_item = table.column("rescore_rank_correlation").to_numpy(zero_copy_only=False).astype(float)
    per_item = per_item[np.isfinite(per_item)]
    captions = zip(table.column("caption").to_pylist(), table.column("rescore_caption").to_pylist(), strict=True)
    changed = sum(old != new for old, new in captions)
    items = table.num_rows
    return {
        "items": items,
        "item_rank_correlation": spearman(score, new),
        "candidate_rank_correlation": float(per_item.mean()) if per_item.size else None,
        "best_caption_changed": int(changed),
        "best_caption_changed_share": changed / items if items else None,
        "mean_score": float(score.mean()) if items else None,
        "mean_rescore": float(new.mean()) if items else None,
    }


@dataclass
class RescoreReport:
    dataset: str
    out: str
    rescore_id: str
    run_id: str
    outcomes: list[ShardOutcome]
    unfinished: list[str]
    figures: dict[str, Any]
    seconds: float = 0.0

    @property
    def failures(self) -> dict[str, str]:
        return {o.shard: o.reason or "failed" for o in self.outcomes if o.status == "failed"}

    def summary_lines(self) -> list[str]:
        count = {s: sum(o.status == s for o in self.outcomes) for s in ("done", "skipped", "failed")}
        f = self.figures

        def show(value: float | None, fmt: str) -> str:
            return "n/a" if value is None else format(value, fmt)

        lines = [
            f"rescored {self.dataset} into {self.out} (rescore id {self.rescore_id[:12]})",
            f"shards:        {count['done']} rescored, {count['skipped']} already done, {count['failed']} failed",
            f"items:         {sum(o.rows for o in self.outcomes)} rescored in this run, {f.get('items', 0)} in the "
            f"dataset, {sum(o.quarantined for o in self.outcomes)} newly quarantined",
            f"agreement:     rank correlation of item scores {show(f.get('item_rank_correlation'), '.3f')}, of each "
            f"item's candidates {show(f.get('candidate_rank_correlation'), '.3f')} (mean); best caption changed for "
            f"{f.get('best_caption_changed', 0)} items ({show(f.get('best_caption_changed_share'), '.1%')})",
            f"mean score:    run's scorer {show(f.get('mean_score'), '.4f')}, "
            f"new scorer {show(f.get('mean_rescore'), '.4f')}",
        ]
        if self.unfinished:
            lines.append(
                f"left out:      {len(self.unfinished)} shard(s) of the dataset with no finished manifest "
                f"({', '.join(self.unfinished[:5])}): finish the caption run, then rerun this command"
            )
        return lines

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "out": self.out,
            "rescore_id": self.rescore_id,
            "run_id": self.run_id,
            "shards": {o.shard: o.status for o in self.outcomes},
            "unfinished": self.unfinished,
            **self.figures,
        }


def finish_rescore(plan: RescorePlan) -> dict[str, Any]:
    """The card (the parent's, with a section on the rescore), ``rescore.json`` and the new score's
    histogram; returns the agreement figures."""
    from mils_pipeline import plots
    from mils_pipeline.run.card import HISTOGRAM, write_rescore_card

    table = read_agreement_columns(plan.out)
    figures = agreement(table) if table is not None else {}
    manifests = [m for _, m in sorted(read_manifests(plan.out).items()) if "rescore" in m]
    first = manifests[0]["rescore"] if manifests else {}
    summary = {
        "rescore_id": plan.rescore_id,
        "run_id": sorted({m["rescore"]["run_id"] for m in manifests}),
        "modality": plan.config.modality,
        "scorer": first.get("scorer"),
        "scorer_settings": plan.config.scorer.model_dump(mode="json"),
        "parent": {
            "dataset": plan.dataset,
            "config_sha256": sorted({str(m["rescore"]["parent"]["config_sha256"]) for m in manifests}),
            "run_id": sorted({str(m["rescore"]["parent"]["run_id"]) for m in manifests}),
        },
        "shards": len(manifests),
        "texts_encoded": sum(m["rescore"]["texts_encoded"] for m in manifests),
        "texts_truncated": sum(m["rescore"]["texts_truncated"] for m in manifests),
        "agreement": figures,
    }
    parent_card = _read_bytes(join_url(plan.dataset, "README.md"))
    histogram = _read_bytes(join_url(plan.dataset, HISTOGRAM))
    if histogram is not None:
        write_bytes_whole(join_url(plan.out, HISTOGRAM), histogram)
    images = []
    if table is not None and table.num_rows:
        try:
            image = plots.score_histogram(table.column("rescore").to_numpy(zero_copy_only=False), fmt="png")
        except ConfigError as exc:
            log.warning("card without the new scorer's histogram: %s", exc)
        else:
            write_bytes_whole(join_url(plan.out, RESCORE_HISTOGRAM), image)
            images.append(RESCORE_HISTOGRAM)
    scores = {
        name: table.column(name).to_numpy(zero_copy_only=False).astype(float) if table is not None else np.zeros(0)
        for name in ("score", "rescore", "rescore_best")
    }
    write_rescore_card(
        plan.out, parent_card.decode("utf-8", errors="replace") if parent_card else None, summary, scores, images
    )
    write_bytes_whole(join_url(plan.out, SUMMARY), json.dumps(summary, indent=2, sort_keys=True).encode())
    return figures


def _read_bytes(url: str) -> bytes | None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


ShardRunner = Callable[[RescorePlan], Iterator[ShardOutcome]]


class InProcessRescore:
    """Shards one after another in this process, on one scorer. A shard whose source is missing,
    changed or damaged fails alone; any other error stops the rescore."""

    def __init__(self, progress: Progress = no_progress) -> None:
        self.progress = progress
        self.run_id = ""

    def __call__(self, plan: RescorePlan) -> Iterator[ShardOutcome]:
        rescorer = build_rescorer(plan.config)
        self.run_id = rescorer.run_id
        try:
            for shard in plan.todo:
                try:
                    yield rescore_shard(rescorer, plan, shard, self.progress)
                except (SourceMediaError, ShardReadError) as exc:
                    log.error("shard %s failed: %s", shard, exc)
                    yield ShardOutcome(shard, "failed", str(exc))
        finally:
            rescorer.close()


def rescore_dataset(
    dataset: str,
    out: str,
    config: RunConfig,
    progress: Progress = no_progress,
    runner: ShardRunner | None = None,
    plan: Callable[[str, str, RunConfig], RescorePlan] = plan_rescore,
    finish: Callable[[RescorePlan], dict[str, Any]] = finish_rescore,
) -> RescoreReport:
    """Rescore every finished shard of ``dataset`` not yet rescored into ``out`` with ``config.scorer``;
    write the card; report. ``runner``, ``plan`` and ``finish`` may be wrapped by an orchestrator."""
    started = time.perf_counter()
    job = plan(dataset, out, config)
    runner = runner or InProcessRescore(progress)
    outcomes = list(runner(job)) if job.todo else []
    outcomes += [ShardOutcome(s, "skipped") for s in job.done]
    failed = [o for o in outcomes if o.status == "failed"]
    # the card is written when this run rescored a shard, or when an earlier run was stopped after its
    # last shard and before its card (a rerun with nothing to do writes nothing else)
    if len(failed) < len(job.todo) or (job.done and not _exists(join_url(out, SUMMARY))):
        figures = finish(job)
    else:
        table = read_agreement_columns(out)
        figures = agreement(table) if table is not None else {}
    run_id = str(getattr(runner, "run_id", ""))
    report = RescoreReport(dataset, out, job.rescore_id, run_id, outcomes, job.unfinished, figures)
    report.seconds = time.perf_counter() - started
    if report.failures:
        raise ShardsFailedError(report.failures, report)
    return report
