"""Parquet read from open (fsspec) file objects without Arrow's thread pools.

``pq.read_table(fh)`` and ``pq.ParquetFile(fh).read()`` hand the Python file to Arrow's IO and CPU
thread pools, and a pool task may still hold it when the read returns. When the process ends right
after (a refusal that follows the read: ``mils rescore`` read the dataset's modality, then refused
the scorer), that task drops the file during interpreter shutdown, cannot take the GIL, and the
process aborts with "terminate called without an active exception" (SIGABRT instead of exit code
2). Without pre-buffering and threads Arrow reads through the file in the calling thread and
starts no thread, so nothing of the read outlives it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def parquet_file(fh: Any) -> pq.ParquetFile:
    """The Parquet file behind ``fh``, read only in the calling thread by ``read_parquet``."""
    return pq.ParquetFile(fh, pre_buffer=False)


def read_parquet(fh: Any, columns: list[str] | None = None) -> pa.Table:
    """The table (or ``columns`` of it) in the Parquet file ``fh``, read in the calling thread alone."""
    return read_columns(parquet_file(fh), columns)


def read_columns(part: pq.ParquetFile, columns: list[str] | None = None) -> pa.Table:
    """``columns`` (all when None) of a file opened by ``parquet_file``, read in the calling thread."""
    return part.read(columns=columns, use_threads=False)
