"""The one shard reader: list WebDataset tars under a URL and stream their samples through fsspec.

A sample is the run of consecutive tar members that share a key (the member path up to the first
dot of its file name), as WebDataset defines it. Nothing is decoded here except tar framing, and
nothing is ever unpickled.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from mils_pipeline.errors import ShardReadError


class ShardDamagedError(ShardReadError):
    """The tar framing is broken partway (truncated, corrupt header): rereading will not help."""


SHARD_SUFFIXES = (".tar",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ShardInfo:
    """One input shard and the identity a rerun compares against."""

    url: str
    name: str  # safe for output file names: part-<name>.parquet
    size: int
    etag: str | None
    mtime: float | None

    def identity(self) -> dict[str, object]:
        return {"url": self.url, "size": self.size, "etag": self.etag, "mtime": self.mtime}

    def to_dict(self) -> dict[str, object]:
        """Plain data, to cross process boundaries (flow parameters); ``ShardInfo(**d)`` restores it."""
        return {"name": self.name, **self.identity()}


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    member_names: list[str] = field(default_factory=list)


def shard_name(relative_path: str) -> str:
    """Output-safe shard name: the path below the source root without its suffix."""
    stem = relative_path
    for suffix in SHARD_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return _UNSAFE.sub("_", stem.strip("/").replace("/", "__")) or "shard"


def _info(fs: fsspec.AbstractFileSystem, path: str, url: str, root: str) -> ShardInfo:
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") or info.get("LastModified")
    if mtime is not None and not isinstance(mtime, (int, float)):
        mtime = mtime.timestamp()
    rel = posixpath.relpath(path, root) if root and path != root else posixpath.basename(path)
    return ShardInfo(
        url=url,
        name=shard_name(rel),
        size=int(info.get("size") or 0),
        etag=str(etag).strip('"') if etag else None,
        mtime=float(mtime) if mtime is not None else None,
    )


def list_shards(source: str) -> list[ShardInfo]:
    """Shards under ``source``: a directory or prefix (searched recursively), one tar, or a glob."""
    try:
        fs, root = fsspec.core.url_to_fs(source)
    except (ValueError, ImportError) as exc:
        raise ShardReadError(f"cannot open source {source!r}: {exc}") from exc
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def to_url(path: str) -> str:
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    try:
        if any(ch in root for ch in "*?["):
            paths = sorted(p for p in fs.glob(root) if p.endswith(SHARD_SUFFIXES))
            base = root.split("*", 1)[0].rsplit("/", 1)[0]
        elif fs.isdir(root):
            paths = sorted(p for p in fs.find(root) if p.endswith(SHARD_SUFFIXES))
            base = root
        elif fs.isfile(root):
            paths, base = [root], ""
        else:
            raise ShardReadError(f"source {source!r} does not exist")
        shards = [_info(fs, p, to_url(p), base) for p in paths]
    except ShardReadError:
        raise
    except (OSError, PermissionError) as exc:
        raise ShardReadError(f"cannot list source {source!r}: {exc}") from exc
    if not shards:
        raise ShardReadError(f"no {'/'.join(SHARD_SUFFIXES)} shards found under {source!r}")
    names = [s.name for s in shards]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ShardReadError(f"shard names collide after sanitising: {sorted(duplicates)}; rename those shards")
    return shards


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, WebDataset style: the key ends at the first dot of the
    file name; the extension is the rest, lower-cased."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower() if dot else ""


def iter_samples(url: str) -> Iterator[RawSample]:
    """Stream a tar shard's samples in order.

    A tar damaged partway raises ShardDamagedError after every sample before the damage was
    yielded; an I/O failure raises ShardReadError (worth a retry).
    """
    current: RawSample | None = None
    last_member = ""
    try:
        with fsspec.open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                last_member = info.name
                key, ext = split_member(info.name)
                if current is not None and current.key != key:
                    yield current  # complete: the next key's header has arrived
                    current = None
                extracted = tar.extractfile(info)
                data = extracted.read() if extracted is not None else b""
                if current is None:
                    current = RawSample(key=key)
                current.member_names.append(info.name)
                if ext in current.members:
                    ext = f"{ext}#{len(current.member_names)}"  # a repeated member: keep both, visibly
                current.members[ext] = data
    except FileNotFoundError as exc:
        raise ShardReadError(f"shard {url} does not exist") from exc
    except (tarfile.TarError, EOFError) as exc:
        partial = f"; sample {current.key!r} may be incomplete and was not captioned" if current else ""
        where = f"after member {last_member!r}" if last_member else "at its start"
        raise ShardDamagedError(f"shard {url} is damaged {where}: {exc}{partial}") from exc
    except OSError as exc:
        raise ShardReadError(f"could not read shard {url}: {exc}") from exc
    if current is not None:
        yield current


def write_shard(url: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write a WebDataset tar: each sample is (key, {extension: bytes}). For demos and tests."""
    import io as _io

    from mils_pipeline.io.sink import write_bytes_whole

    buffer = _io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, _io.BytesIO(data))
    write_bytes_whole(url, buffer.getvalue())
