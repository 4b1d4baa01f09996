"""`mils export`: a finished dataset as training data, its media read back from the source shards.

A dataset holds captions and provenance, not media (unless it was asked to): the media come from
the source shards its manifests name, matched by key and media hash, shard by shard in the
shards' own order. Two formats, chosen from a registry by name: WebDataset tars (``webdataset``'s
``ShardWriter``: media + ``.txt`` caption + ``.json`` provenance per sample) and Hugging Face
Parquet files with an ``image``/``audio``/``video`` feature column the hub viewer shows.

Shards are written in a local temporary folder and each is copied to OUT (local or any fsspec
URL) when finished; the export manifest comes last and marks the export whole. On any error the
files already copied are removed: an export is whole or absent, never silently partial.
Quarantined samples are not in ``data/`` and so are never exported.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mils_pipeline.errors import OutputError
from mils_pipeline.io.derived import SourceMediaError, locations_overlap, matched_samples, source_urls
from mils_pipeline.io.manifest import read_manifests
from mils_pipeline.io.parquet import parquet_file, read_columns
from mils_pipeline.io.sink import join_url, write_bytes_whole

ROW_COLUMNS = (
    "key",
    "source_shard",
    "modality",
    "media_sha256",
    "caption",
    "score",
    "rounds",
    "stop_reason",
    "generator",
    "scorer",
    "prompt_sha256",
    "config_sha256",
    "seed_pool_id",
    "run_id",
)
RECORD_COLUMNS = ("source_shard", "key", "media_sha256", "score", "config_sha256", "run_id")
DEFAULT_MAX_COUNT = 10_000
DEFAULT_MAX_SIZE = 1_000_000_000  # bytes
MANIFEST_JSON = "export_manifest.json"
MANIFEST_PARQUET = "export_manifest.parquet"
NOT_A_DATASET = (
    "{url} is not a mils dataset: it has no data/part-*.parquet and no _manifests/. Pass the output "
    "location of `mils caption` (the folder or s3:// prefix that holds data/, quarantine/ and _manifests/)"
)
HF_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
---

# Captions exported from {dataset}

{samples} {modality} samples with MILS captions, exported by `mils export --format hf`.
Config hashes: {config_hashes}. Run ids: {run_ids}.
Each row's `provenance` column (JSON) says which source shard and key it came from.
"""


class ExportError(OutputError):
    """The export cannot be made as asked."""


@dataclass
class ExportReport:
    out: str
    format: str
    samples: int  # exported
    filtered: int  # rows of the dataset left out by --min-score / --top-fraction
    quarantined: int  # samples of the run in quarantine/, never exported
    files: list[str] = field(default_factory=list)  # shard files under OUT

    def summary_line(self) -> str:
        return (
            f"exported {self.samples} samples to {self.out} as {self.format} in {len(self.files)} files "
            f"({self.filtered} left out by the filters, {self.quarantined} quarantined samples not exported)"
        )


def _is_empty(fs: Any, path: str) -> bool:
    if not fs.exists(path):
        return True
    return not fs.isfile(path) and not fs.ls(path, detail=False)


def _read_rows(fs: Any, root: str, url: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(fs.glob(join_url(root, "data", "part-*.parquet"))):
        with fs.open(path, "rb") as fh:
            part = parquet_file(fh)
            missing = sorted(set(ROW_COLUMNS) - set(part.schema_arrow.names))
            if missing:
                raise ExportError(f"{path} lacks the columns {missing}: {NOT_A_DATASET.format(url=url)}")
            rows += read_columns(part, list(ROW_COLUMNS)).to_pylist()
    return rows


def _count_quarantined(fs: Any, root: str) -> int:
    total = 0
    for path in fs.glob(join_url(root, "quarantine", "part-*.parquet")):
        with fs.open(path, "rb") as fh:
            total += parquet_file(fh).metadata.num_rows
    return total


def select_rows(
    rows: list[dict[str, Any]], min_score: float | None = None, top_fraction: float | None = None
) -> list[dict[str, Any]]:
    """The rows to export: score at least ``min_score``, and within the best ``top_fraction`` of
    every row by score (rounded up; ties broken by key), in the dataset's own order."""
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ExportError(f"--top-fraction must be in (0, 1], got {top_fraction}")
    kept = list(range(len(rows)))
    if top_fraction is not None:
        scores = [-math.inf if row["score"] is None else row["score"] for row in rows]
        best = sorted(kept, key=lambda i: (-scores[i], rows[i]["key"]))
        kept = sorted(best[: math.ceil(top_fraction * len(rows))])
    if min_score is not None:
        kept = [i for i in kept if rows[i]["score"] is not None and rows[i]["score"] >= min_score]
    return [rows[i] for i in kept]


def provenance(row: dict[str, Any], source_url: str, dataset: str) -> dict[str, Any]:
    """What the ``.json`` of an exported sample says about where it came from and how it was captioned."""
    return {**{k: row[k] for k in ROW_COLUMNS}, "source_url": source_url, "dataset": dataset}


class _Writer:
    """Writes samples into local files under ``tmp``; ``publish`` is called with each finished one."""

    def __init__(self, tmp: str, max_count: int, max_size: int, publish: Callable[[str, str], None]) -> None:
        self.tmp, self.max_count, self.max_size, self.publish = tmp, max_count, max_size, publish

    def write(self, export_key: str, ext: str, media: bytes, row: dict[str, Any], prov: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def finish_out(self, out: str, summary: dict[str, Any]) -> None:
        """Anything the format adds beside its shards (a dataset card)."""


class WebDatasetWriter(_Writer):
    def __init__(self, tmp: str, max_count: int, max_size: int, publish: Callable[[str, str], None]) -> None:
        import webdataset as wds

        super().__init__(tmp, max_count, max_size, publish)
        self.sink = wds.ShardWriter(
            os.path.join(tmp, "shard-%06d.tar"),
            maxcount=max_count,
            maxsize=max_size,
            post=lambda path: publish(path, os.path.basename(path)),
            verbose=0,
        )

    def write(self, export_key: str, ext: str, media: bytes, row: dict[str, Any], prov: dict[str, Any]) -> None:
        self.sink.write(
            {
                "__key__": export_key,
                ext: media,
                "txt": (row["caption"] or "").encode(),
                "json": json.dumps(prov, sort_keys=True).encode(),
            }
        )

    def close(self) -> None:
        self.sink.close()


class HuggingFaceWriter(_Writer):
    """Parquet files ``data/train-NNNNN.parquet`` whose schema carries the ``datasets`` features, so
    ``load_dataset`` and the hub viewer see the media column as an Image/Audio/Video feature."""

    BATCH = 64  # rows per row group: media are never all held

    def __init__(self, tmp: str, max_count: int, max_size: int, publish: Callable[[str, str], None]) -> None:
        super().__init__(tmp, max_count, max_size, publish)
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.buffer: list[dict[str, Any]] = []
        self.files = self.count = self.size = 0
        self.path = ""

    def _schema(self, modality: str) -> pa.Schema:
        import datasets

        media = {"image": datasets.Image(), "audio": datasets.Audio(), "video": datasets.Video()}[modality]
        features = datasets.Features(
            {
                "key": datasets.Value("string"),
                modality: media,
                "caption": datasets.Value("string"),
                "score": datasets.Value("float32"),
                "source_shard": datasets.Value("string"),
                "source_key": datasets.Value("string"),
                "provenance": datasets.Value("string"),
            }
        )
        return features.arrow_schema

    def write(self, export_key: str, ext: str, media: bytes, row: dict[str, Any], prov: dict[str, Any]) -> None:
        if self.schema is None:
            self.schema = self._schema(row["modality"])
        if self.writer is None:
            self.path = os.path.join(self.tmp, f"train-{self.files:05d}.parquet")
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
            self.files += 1
        self.buffer.append(
            {
                "key": export_key,
                row["modality"]: {"bytes": media, "path": f"{row['key']}.{ext}"},
                "caption": row["caption"],
                "score": row["score"],
                "source_shard": row["source_shard"],
                "source_key": row["key"],
                "provenance": json.dumps(prov, sort_keys=True),
            }
        )
        self.count += 1
        self.size += len(media)
        if self.count >= self.max_count or self.size >= self.max_size:
            self._finish_file()
        elif len(self.buffer) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.buffer and self.writer is not None:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.buffer = []

    def _finish_file(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.publish(self.path, f"data/{os.path.basename(self.path)}")
        self.count = self.size = 0

    def close(self) -> None:
        self._finish_file()

    def finish_out(self, out: str, summary: dict[str, Any]) -> None:
        card = HF_CARD.format(
            dataset=summary["dataset"],
            samples=summary["samples"],
            modality=summary["modality"],
            config_hashes=", ".join(summary["config_sha256"]) or "none",
            run_ids=", ".join(summary["run_id"]) or "none",
        )
        write_bytes_whole(join_url(out, "README.md"), card.encode())


FORMATS: dict[str, type[_Writer]] = {"webdataset": WebDatasetWriter, "hf": HuggingFaceWriter}


def export_dataset(
    dataset: str,
    out: str,
    format: str = "webdataset",
    *,
    min_score: float | None = None,
    top_fraction: float | None = None,
    max_count: int = DEFAULT_MAX_COUNT,
    max_size: int = DEFAULT_MAX_SIZE,
    overwrite: bool = False,
) -> ExportReport:
    """Export the captioned samples of ``dataset`` (the output of `mils caption`) to ``out``."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if max_count < 1 or max_size < 1:
        raise ExportError("--max-count and --max-size must be positive")
    try:
        fs, root = fsspec.core.url_to_fs(dataset)
        out_fs, out_root = fsspec.core.url_to_fs(out)
    except (ValueError, ImportError, OSError) as exc:
        raise ExportError(f"cannot read {dataset} or write {out}: {exc}") from exc
    if locations_overlap(dataset, out):  # --overwrite or a failed export removes OUT
        raise ExportError(f"OUT ({out}) is, holds or lies inside the dataset ({dataset}): export to another location")
    manifests = read_manifests(dataset)
    if not fs.glob(join_url(root, "data", "part-*.parquet")) and not manifests:
        raise ExportError(NOT_A_DATASET.format(url=dataset))
    replace = not _is_empty(out_fs, out_root)
    if replace and not overwrite:
        raise ExportError(f"{out} exists and is not empty: choose a new location, or pass --overwrite to replace it")

    rows = _read_rows(fs, root, dataset)
    chosen = select_rows(rows, min_score, top_fraction)
    try:  # before OUT is touched: a missing shard leaves it as it was
        urls = source_urls((r["source_shard"] for r in chosen), manifests, dataset)
    except SourceMediaError as exc:
        raise ExportError(f"{exc}. Nothing was exported") from None
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for row in chosen:
        by_shard.setdefault(row["source_shard"], []).append(row)
    report = ExportReport(out, format, 0, len(rows) - len(chosen), _count_quarantined(fs, root))
    records: list[dict[str, Any]] = []
    if replace:
        out_fs.rm(out_root, recursive=True)

    def publish(local: str, name: str) -> None:
        target = join_url(out_root, name)
        out_fs.makedirs(posixpath.dirname(target), exist_ok=True)
        out_fs.put_file(local, target)
        os.remove(local)
        report.files.append(name)

    try:
        with tempfile.TemporaryDirectory(prefix="mils-export-") as tmp:
            writer = FORMATS[format](tmp, max_count, max_size, publish)
            for shard, url in urls.items():
                for ext, media, row in _exported_samples(shard, url, by_shard[shard]):
                    export_key = f"{report.samples:09d}"
                    writer.write(export_key, ext, media, row, provenance(row, url, dataset))
                    records.append({"export_key": export_key, "source_url": url, **{k: row[k] for k in RECORD_COLUMNS}})
                    report.samples += 1
            writer.close()
            summary = _summary(dataset, format, chosen, report, min_score, top_fraction, max_count, max_size)
            writer.finish_out(out, summary)
            _write_records(out, records)
            write_bytes_whole(join_url(out, MANIFEST_JSON), json.dumps(summary, indent=2, sort_keys=True).encode())
    except BaseException:
        if out_fs.exists(out_root):
            out_fs.rm(out_root, recursive=True)
        raise
    return report


def _exported_samples(shard: str, url: str, rows: list[dict[str, Any]]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    try:
        yield from matched_samples(shard, url, rows)
    except SourceMediaError as exc:
        raise ExportError(f"{exc}. Nothing was exported") from None


def _summary(
    dataset: str,
    format: str,
    chosen: list[dict[str, Any]],
    report: ExportReport,
    min_score: float | None,
    top_fraction: float | None,
    max_count: int,
    max_size: int,
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "format": format,
        "modality": chosen[0]["modality"] if chosen else None,
        "samples": report.samples,
        "filtered": report.filtered,
        "quarantined_not_exported": report.quarantined,
        "filters": {"min_score": min_score, "top_fraction": top_fraction},
        "limits": {"max_count": max_count, "max_size": max_size},
        "config_sha256": sorted({r["config_sha256"] for r in chosen if r["config_sha256"]}),
        "run_id": sorted({r["run_id"] for r in chosen if r["run_id"]}),
        "files": report.files,
        "samples_manifest": MANIFEST_PARQUET,
    }


def _write_records(out: str, records: list[dict[str, Any]]) -> None:
    schema = pa.schema(
        [
            ("export_key", pa.string()),
            ("source_shard", pa.string()),
            ("source_url", pa.string()),
            ("key", pa.string()),
            ("media_sha256", pa.string()),
            ("score", pa.float32()),
            ("config_sha256", pa.string()),
            ("run_id", pa.string()),
        ]
    )
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema=schema), buffer, compression="zstd")
    write_bytes_whole(join_url(out, MANIFEST_PARQUET), buffer.getvalue())
