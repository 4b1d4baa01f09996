"""Content hashes used for identities: files, bytes, short ids."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

_CHUNK = 1 << 20


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) so model files are hashed once."""
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
