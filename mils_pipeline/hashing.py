"""Content hashes used for identities: files, bytes, short ids."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

_CHUNK = 1 << 20


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_HEX = frozenset("0123456789abcdef")


def _stored(key: str) -> Path:
    """Where the hash of one (path, size, mtime) is kept between processes: MILS_HOME/file-hashes
    (trusted as MILS_HOME's seed pools are: whoever can write there can change provenance)."""
    from mils_pipeline.paths import mils_home

    return mils_home() / "file-hashes" / hashlib.sha256(key.encode()).hexdigest()


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's hash, from this process's memo, the store a previous process left, or the bytes.
    A shard unit is often a process of its own: without the store each one re-read every weight
    file of the model (~16 GB for an 8B model) to name it in provenance."""
    stored = _stored(f"{path}\x00{size}\x00{mtime_ns}")
    try:
        known = stored.read_text().strip()
        if len(known) == 64 and set(known) <= _HEX:
            return known
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    value = digest.hexdigest()
    try:  # written whole and renamed: a reader never sees half a hash
        stored.parent.mkdir(parents=True, exist_ok=True)
        temporary = stored.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(value)
        os.replace(temporary, stored)
    except OSError:
        pass  # a read-only home: the hash is still right, only not kept
    return value


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) in the process and in MILS_HOME, so model
    files are read once per machine, not once per shard unit."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def directory_sha256(directory: Path, patterns: tuple[str, ...] = ("**/*",)) -> str:
    """One hash over the files of a model directory that match ``patterns``: their paths below the
    directory and their contents (file hashes memoised). Empty string when nothing matches."""
    files = sorted({f for pattern in patterns for f in directory.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(directory).as_posix()}\x00{file_sha256(path)}\n".encode())
    return digest.hexdigest() if files else ""
