"""The one shard reader: list WebDataset tars under a URL and stream their samples through fsspec.

A sample is the run of consecutive tar members that share a key (the member path up to the first
dot of its file name), as WebDataset defines it. Nothing is decoded here except tar framing, and
nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import re
import subprocess
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec

from mils_pipeline.errors import ShardReadError
from mils_pipeline.policy import check_pipe_allowed


class ShardDamagedError(ShardReadError):
    """The tar framing is broken partway (truncated, corrupt header): rereading will not help.

    ``key`` names the sample that was being read when the damage showed, if any: it may be
    incomplete and is not captioned.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class _EndCheckedTarInfo(tarfile.TarInfo):
    """Remembers why the member headers stopped.

    tarfile ends a stream quietly when a header after the first is cut short, missing or garbage,
    exactly as it ends at the archive's end-of-archive marker; only the marker is a proper end.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        start = tarfile_.fileobj.tell()
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the end-of-archive marker
        except tarfile.EmptyHeaderError:
            tarfile_.mils_damage = f"the data stops at byte {start} without the tar end-of-archive marker"  # type: ignore[attr-defined]
            raise
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            tarfile_.mils_damage = f"the member header at byte {start} is unreadable ({exc})"  # type: ignore[attr-defined]
            raise


SHARD_SUFFIXES = (".tar",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
PIPE_PREFIX = "pipe:"
_PIPE_EXIT_GRACE_S = 5.0
PIPE_REFUSED = (
    "{url!r} is a WebDataset pipe: URL, which runs a shell command on this machine; it is refused "
    "by default. Read the shards through fsspec (file://, s3://, gs://, https://...) instead, or, "
    "if you trust where this URL comes from, set storage.allow_pipe_urls: true (the worker's policy must "
    "allow them too: MILS_ALLOW_PIPE_URLS)"
)


def check_pipe_url(url: str, allow_pipe: bool) -> None:
    """A ``pipe:`` URL runs only when the run allows it and so does this machine's worker policy."""
    if not url.startswith(PIPE_PREFIX):
        return
    if not allow_pipe:
        raise ShardReadError(PIPE_REFUSED.format(url=url))
    check_pipe_allowed(url)


@contextlib.contextmanager
def _open_stream(url: str, allow_pipe: bool) -> Iterator[IO[bytes]]:
    """A binary stream of the shard: through fsspec, or from a pipe: command's stdout when allowed."""
    check_pipe_url(url, allow_pipe)
    if not url.startswith(PIPE_PREFIX):
        with fsspec.open(url, "rb") as fh:
            yield fh
        return
    command = url.removeprefix(PIPE_PREFIX)
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty command cannot block
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=errors)
        assert process.stdout is not None
        try:
            yield process.stdout
        except Exception as exc:
            # a command that failed explains an unreadable stream better than the tar error does.
            # Its stdout may be at EOF a moment before it is reaped: give it a short while to exit
            # (a command still writing would block on the full pipe, so it is killed after that).
            try:
                status: int | None = process.wait(timeout=_PIPE_EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                status = None
                process.kill()
            if status:
                errors.seek(0)
                detail = errors.read().decode(errors="replace").strip()[-500:]
                raise ShardReadError(
                    f"pipe command {command!r} exited with status {process.returncode}: {detail}"
                ) from exc
            raise
        except BaseException:
            process.kill()
            raise
        else:
            if process.wait() != 0:
                errors.seek(0)
                detail = errors.read().decode(errors="replace").strip()[-500:]
                raise ShardReadError(f"pipe command {command!r} exited with status {process.returncode}: {detail}")
        finally:
            process.stdout.close()
            process.wait()


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
    seconds_read: float = 0.0  # time the reader spent on this sample (set by the run's sample stage)


def shard_name(relative_path: str) -> str:
    """Output-safe shard name: the path below the source root without its suffix."""
    stem = relative_path
    for suffix in SHARD_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return _UNSAFE.sub("_", stem.strip("/").replace("/", "__")) or "shard"


def _info(
    fs: fsspec.AbstractFileSystem, path: str, url: str, root: str, listed: dict[str, Any] | None = None
) -> ShardInfo:
    info = listed if listed and listed.get("type") == "file" else fs.info(path)
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


def list_shards(source: str, allow_pipe: bool = False) -> list[ShardInfo]:
    """Shards under ``source``: a directory or prefix (searched recursively), one tar, a glob, or
    (only when allowed) one ``pipe:`` command whose output is a tar."""
    if source.startswith(PIPE_PREFIX):
        check_pipe_url(source, allow_pipe)
        name = "pipe-" + hashlib.sha256(source.encode()).hexdigest()[:12]
        return [ShardInfo(url=source, name=name, size=0, etag=None, mtime=None)]
    try:
        fs, root = fsspec.core.url_to_fs(source)
    except (ValueError, ImportError) as exc:
        raise ShardReadError(f"cannot open source {source!r}: {exc}") from exc
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def to_url(path: str) -> str:
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    # a prefix is one paginated listing whose entries carry each shard's size and ETag: no request per shard
    listed: dict[str, dict[str, Any]] = {}
    try:
        if any(ch in root for ch in "*?["):
            listed = fs.glob(root, detail=True)
            base = root.split("*", 1)[0].rsplit("/", 1)[0]
        elif fs.isdir(root):
            listed = fs.find(root, detail=True)
            base = root
        elif fs.isfile(root):
            listed, base = {root: {}}, ""
        else:
            raise ShardReadError(f"source {source!r} does not exist")
        paths = sorted(p for p in listed if p.endswith(SHARD_SUFFIXES) or (not base and p == root))
        shards = [_info(fs, p, to_url(p), base, listed.get(p)) for p in paths]
    except ShardReadError:
        raise
    except (OSError, PermissionError) as exc:
        raise ShardReadError(f"cannot list source {source!r}: {exc}") from exc
    if not shards:
        raise ShardReadError(f"no {'/'.join(SHARD_SUFFIXES)} shards found under {source!r}")
    duplicates = {name for name, count in Counter(s.name for s in shards).items() if count > 1}
    if duplicates:
        raise ShardReadError(f"shard names collide after sanitising: {sorted(duplicates)}; rename those shards")
    return shards


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, WebDataset style: the key ends at the first dot of the
    file name; the extension is the rest, lower-cased."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower() if dot else ""


def iter_samples(url: str, allow_pipe: bool = False) -> Iterator[RawSample]:
    """Stream a tar shard's samples in order.

    A tar damaged partway (including one cut off between members, which tarfile alone would take
    for a clean end) raises ShardDamagedError after every sample before the damage was yielded;
    an I/O failure raises ShardReadError (worth a retry).
    """
    current: RawSample | None = None
    last_member = ""
    try:
        with (
            _open_stream(url, allow_pipe) as fh,
            tarfile.open(fileobj=fh, mode="r|*", tarinfo=_EndCheckedTarInfo) as tar,
        ):
            for info in tar:
                tar.members.clear()  # a stream needs no member index: memory stays flat in the shard's length
                if not info.isfile():
                    continue
                last_member = info.name
                key, ext = split_member(info.name)
                if current is not None and current.key != key:
                    yield current  # complete: the next key's header has arrived
                    current = None
                if current is None:
                    current = RawSample(key=key)  # before reading: damage inside the data names this sample
                extracted = tar.extractfile(info)
                data = extracted.read() if extracted is not None else b""
                current.member_names.append(info.name)
                if ext in current.members:
                    ext = f"{ext}#{len(current.member_names)}"  # a repeated member: keep both, visibly
                current.members[ext] = data
            damage = getattr(tar, "mils_damage", None)
            if damage:
                raise tarfile.ReadError(damage)
    except FileNotFoundError as exc:
        raise ShardReadError(f"shard {url} does not exist") from exc
    except (tarfile.TarError, EOFError) as exc:
        partial = f"; sample {current.key!r} may be incomplete and was not captioned" if current else ""
        where = f"after member {last_member!r}" if last_member else "at its start"
        raise ShardDamagedError(
            f"shard {url} is damaged {where}: {exc}{partial}", key=current.key if current else ""
        ) from exc
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
