"""A finished dataset as the report reads it: its manifests, its data parts, the light columns of
every row (for the plots) and the full rows of the items the gallery shows.

The gallery never holds every item of a large dataset: rows are ordered (``SORTS``) and, past
``sample`` of them, evenly spaced rows of that order are shown, so a gallery sorted by score runs
from the best item to the worst.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mils_pipeline.errors import OutputError
from mils_pipeline.html_report import SORTS
from mils_pipeline.io.manifest import read_manifests
from mils_pipeline.io.parquet import parquet_file, read_columns, read_parquet
from mils_pipeline.io.sink import join_url

OVERVIEW_COLUMNS = (
    "key",
    "source_shard",
    "modality",
    "caption",
    "score",
    "rounds",
    "stop_reason",
    "trajectory",
    "cost",
)
# What a rescored dataset (`mils rescore`) adds to the overview: the new scorer's view of each item.
RESCORE_COLUMNS = ("rescore", "rescore_caption", "rescore_best", "rescore_rank_correlation")
READ_BATCH = 256  # rows read at once when picking the gallery's rows out of a part
NOT_A_DATASET = (
    "{url} is not a mils dataset: it has no data/part-*.parquet and no _manifests/. Pass the output "
    "location of `mils caption` (the folder or s3:// prefix that holds data/, quarantine/, _manifests/ "
    "and README.md)"
)


class ReportError(OutputError):
    """The report cannot be made from this location."""


@dataclass
class Dataset:
    url: str
    manifests: dict[str, dict[str, Any]]
    parts: list[str]  # data part URLs, sorted
    overview: pa.Table  # OVERVIEW_COLUMNS of every row, plus part and row (where the row is)
    media_column: str | None = None  # the media column, when the rows carry their media
    fs: Any = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.overview.num_rows

    @property
    def rescored(self) -> bool:
        """The rows carry a second scorer's scores (`mils rescore`)."""
        return "rescore" in self.overview.column_names

    @property
    def modality(self) -> str:
        if self.rows:
            return str(self.overview.column("modality")[0].as_py())
        return "image"


def _url(fs: Any, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def open_dataset(url: str) -> Dataset:
    """Read ``url``'s manifests and the light columns of every row; a ReportError when ``url`` holds no dataset."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
        paths = sorted(fs.glob(join_url(root, "data", "part-*.parquet")))
    except (ValueError, ImportError, OSError) as exc:
        raise ReportError(f"cannot read {url}: {exc}") from exc
    manifests = read_manifests(url)
    if not paths and not manifests:
        raise ReportError(NOT_A_DATASET.format(url=url))
    tables, media_column, rescored = [], None, bool(paths)
    for index, path in enumerate(paths):
        with fs.open(path, "rb") as fh:
            part = parquet_file(fh)
            names = set(part.schema_arrow.names)
            if not set(OVERVIEW_COLUMNS) <= names:
                missing = sorted(set(OVERVIEW_COLUMNS) - names)
                raise ReportError(f"{_url(fs, path)} lacks the columns {missing}: {NOT_A_DATASET.format(url=url)}")
            media_column = media_column or next((m for m in ("image", "video", "audio") if m in names), None)
            rescored = rescored and set(RESCORE_COLUMNS) <= names
            table = read_columns(part, [*OVERVIEW_COLUMNS, *(RESCORE_COLUMNS if set(RESCORE_COLUMNS) <= names else ())])
        tables.append(
            table.append_column("part", pa.array(np.full(table.num_rows, index, dtype=np.int32))).append_column(
                "row", pa.array(np.arange(table.num_rows, dtype=np.int64))
            )
        )
    if not rescored:  # every part must carry them, or none is shown
        tables = [t.drop_columns([c for c in RESCORE_COLUMNS if c in t.column_names]) for t in tables]
    overview = pa.concat_tables(tables) if tables else _empty_overview()
    return Dataset(url, manifests, [_url(fs, p) for p in paths], overview, media_column, fs)


def _empty_overview() -> pa.Table:
    from mils_pipeline.io.sink import DATA_SCHEMA

    schema = pa.schema([DATA_SCHEMA.field(c) for c in OVERVIEW_COLUMNS])
    return (
        schema.empty_table()
        .append_column("part", pa.array([], pa.int32()))
        .append_column("row", pa.array([], pa.int64()))
    )


def best_by_round(overview: pa.Table) -> list[list[float]]:
    """Each item's best score after each round (its trajectory's ``best_score``)."""
    return [[r["best_score"] for r in t] for t in overview.column("trajectory").to_pylist()]


def gains(overview: pa.Table) -> np.ndarray:
    """What the rounds added to each item's score: final score less the best seed's (round 0)."""
    first = pc.list_element(overview.column("trajectory"), 0) if overview.num_rows else None
    scores = overview.column("score").to_numpy(zero_copy_only=False).astype(float)
    if first is None:
        return scores
    seed = pc.struct_field(first, "best_score").to_numpy(zero_copy_only=False).astype(float)
    return scores - np.nan_to_num(seed, nan=0.0)


def order(overview: pa.Table, sort: str) -> np.ndarray:
    """Row indices in gallery order: best first for score, gain and rounds; by key otherwise."""
    if sort not in SORTS:
        raise ReportError(f"unknown sort {sort!r}; choose one of {', '.join(SORTS)}")
    if not overview.num_rows:
        return np.zeros(0, dtype=np.int64)
    keys = np.asarray(overview.column("key").to_pylist(), dtype=object)
    if sort == "key":
        return np.argsort(keys, kind="stable")
    scores = overview.column("score").to_numpy(zero_copy_only=False).astype(float)
    primary = {"score": scores, "gain": gains(overview), "rounds": overview.column("rounds").to_numpy().astype(float)}
    return np.lexsort((keys, -scores, -primary[sort]))


def choose(overview: pa.Table, sort: str, sample: int) -> np.ndarray:
    """The rows the gallery shows, in its order: every row, or ``sample`` rows evenly spaced over the order."""
    ordered = order(overview, sort)
    if sample <= 0 or ordered.size <= sample:
        return ordered
    return ordered[np.unique(np.linspace(0, ordered.size - 1, sample).round().astype(np.int64))]


def read_rows(dataset: Dataset, chosen: np.ndarray) -> list[dict[str, Any]]:
    """Full rows (candidates, scorers, media when stored) of the chosen overview rows, in the chosen
    order. Parts are read in batches, so a part's media column is never held whole."""
    parts = dataset.overview.column("part").to_numpy()
    rows = dataset.overview.column("row").to_numpy()
    wanted: dict[int, dict[int, int]] = {}  # part -> row in the part -> position in the gallery
    for position, index in enumerate(chosen):
        wanted.setdefault(int(parts[index]), {})[int(rows[index])] = position
    out: list[dict[str, Any]] = [{} for _ in chosen]
    columns = [*OVERVIEW_COLUMNS, "candidates", "scorers", "media_sha256"]
    if dataset.rescored:
        columns += [*RESCORE_COLUMNS, "rescore_scorer"]
    if dataset.media_column:
        columns.append(dataset.media_column)
    for part, positions in wanted.items():
        with dataset.fs.open(dataset.parts[part], "rb") as fh:
            start = 0
            for batch in parquet_file(fh).iter_batches(batch_size=READ_BATCH, columns=columns, use_threads=False):
                inside = [r for r in range(start, start + batch.num_rows) if r in positions]
                if inside:
                    picked = batch.take(pa.array([r - start for r in inside])).to_pylist()
                    for r, row in zip(inside, picked, strict=True):
                        out[positions[r]] = row
                start += batch.num_rows

    return out


def read_quarantine(url: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Up to ``limit`` quarantined samples (shard, key, member, reason) and how many there are."""
    fs, root = fsspec.core.url_to_fs(url)
    rows: list[dict[str, Any]] = []
    total = 0
    columns = ["key", "source_shard", "member", "error_type", "message"]
    for path in sorted(fs.glob(join_url(root, "quarantine", "part-*.parquet"))):
        with fs.open(path, "rb") as fh:
            table = read_parquet(fh, columns)
        total += table.num_rows
        if len(rows) < limit:
            rows += table.slice(0, limit - len(rows)).to_pylist()
    return rows, total


def read_bytes(url: str, name: str) -> bytes | None:
    fs, root = fsspec.core.url_to_fs(url)
    try:
        with fs.open(join_url(root, name), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
