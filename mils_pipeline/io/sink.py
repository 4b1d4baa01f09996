"""The one Parquet writer, and whole-file writes to any fsspec location.

Every output file appears whole or not at all: locally it is written to a temporary name in the
same directory, synced, then renamed over the target; on object stores it is one PUT.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import secrets
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mils_pipeline.errors import OutputError

MODEL_STRUCT = pa.struct(
    [
        ("backend", pa.string()),
        ("model", pa.string()),
        ("revision", pa.string()),
        ("parameters", pa.string()),  # JSON: parameters differ per backend
    ]
)
# One scorer's score of a candidate; null when the sample lacks that scorer's media (a silent clip).
COMPONENT_STRUCT = pa.struct([("name", pa.string()), ("score", pa.float32())])
CANDIDATE_STRUCT = pa.struct(
    [
        ("text", pa.string()),
        ("score", pa.float32()),
        ("round", pa.int32()),
        ("components", pa.list_(COMPONENT_STRUCT)),
        ("operator", pa.string()),  # what proposed it: seed, rewrite, edit, mutate, crossover
        ("truncated", pa.bool_()),  # longer than a scorer's text context: scored on its first tokens
    ]
)
# A scorer of the objective with its weight: MODEL_STRUCT's fields plus name and weight.
SCORER_STRUCT = pa.struct([("name", pa.string()), ("weight", pa.float32()), *MODEL_STRUCT])
ROUND_STRUCT = pa.struct(
    [
        ("round", pa.int32()),
        ("best_score", pa.float32()),
        ("mean_top_k", pa.float32()),
        ("new_candidates", pa.int32()),
        ("gpu_seconds", pa.float32()),  # what the round cost, priced with mils_pipeline/costs.py
        ("truncated", pa.int32()),  # of new_candidates, those scored on their first tokens only
    ]
)
COST_STRUCT = pa.struct(
    [
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("texts_scored", pa.int64()),
        ("texts_encoded", pa.int64()),
        ("texts_cached", pa.int64()),
        ("media_encoded", pa.int32()),
        ("empty_replies", pa.int32()),
    ]
)
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face Image layout

DATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_shard", pa.string()),
        ("modality", pa.string()),
        ("media_sha256", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float32()),
        ("candidates", pa.list_(CANDIDATE_STRUCT)),
        ("trajectory", pa.list_(ROUND_STRUCT)),
        ("rounds", pa.int32()),
        ("stop_reason", pa.string()),
        ("generator", MODEL_STRUCT),
        ("scorer", MODEL_STRUCT),
        ("scorers", pa.list_(SCORER_STRUCT)),
        ("prompt_sha256", pa.string()),
        ("config_sha256", pa.string()),
        ("seed_pool_id", pa.string()),
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("cost", COST_STRUCT),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_shard", pa.string()),
        ("member", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def data_schema(include_media: bool, modality: str) -> pa.Schema:
    if include_media:
        return DATA_SCHEMA.append(pa.field(modality, IMAGE_STRUCT))
    return DATA_SCHEMA


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def _new_temporary(directory: str, name: str) -> tuple[int, str]:
    """A new empty file beside ``name``, named as leftovers are looked for. Created with mode 0666,
    so the kernel applies the process's umask as it is at this write (mkstemp makes owner-only
    files, and a umask read once at import goes stale)."""
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


def write_bytes_whole(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see the old file, or the new one whole."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        if "file" in fs.protocol or "local" in fs.protocol:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = _new_temporary(directory, os.path.basename(path))
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            fs.pipe_file(path, data)
    except OSError as exc:
        raise OutputError(f"cannot write {url}: {exc}. Check the output location's permissions and free space") from exc


def remove_leftover_temporaries(url: str) -> int:
    """Delete temporary files a killed writer of ``url`` left behind (local outputs only; object
    stores get single PUTs and never hold partial files). Readers never see them (their names
    start with a dot and end in .tmp); this only reclaims the space. Returns how many went."""
    fs, path = fsspec.core.url_to_fs(url)
    if not ("file" in fs.protocol or "local" in fs.protocol):
        return 0
    directory, name = os.path.split(path)
    removed = 0
    for leftover in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
            removed += 1
    return removed


def table_to_parquet_bytes(table: pa.Table, compression: str) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=None if compression == "none" else compression)
    return buffer.getvalue()


def write_parquet(url: str, rows: list[dict[str, Any]], schema: pa.Schema, compression: str = "zstd") -> int:
    """Write rows as one whole Parquet file; returns the number of rows."""
    table = pa.Table.from_pylist(rows, schema=schema)
    write_bytes_whole(url, table_to_parquet_bytes(table, compression))
    return table.num_rows


def check_writable(url: str) -> None:
    """Fail before any work when the output location cannot take files."""
    probe = join_url(url, "_manifests", ".write-probe")
    write_bytes_whole(probe, b"")
    fs, path = fsspec.core.url_to_fs(probe)
    try:
        fs.rm_file(path)
    except OSError as exc:
        raise OutputError(f"cannot delete files under {url}: {exc}") from exc
