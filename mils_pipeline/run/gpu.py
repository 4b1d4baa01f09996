"""One shard unit per GPU: a unit that will compute on CUDA claims the GPUs it sees, machine-wide.

A process worker started with ``--limit 2`` (or two workers without ``CUDA_VISIBLE_DEVICES``) would
run two units at once on the same device: two vLLM engines each sized for the whole GPU, and the
second dies out of memory after minutes of loading. The claim is an exclusive ``flock`` on a file
named for ``CUDA_VISIBLE_DEVICES`` ("all" when unset) in a directory every worker of the machine
shares, so the second unit is refused at once, before it loads anything, with the fix in the
message. The kernel drops the lock when the process ends, however it ends: nothing to clean up.
Runtimes of one process share its claim (a process is one unit).
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from pathlib import Path

from mils_pipeline.errors import WorkerSetupError


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / "mils-gpu-claims"


def visible_gpus() -> str:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES names them ("all" when unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() or "all"


class GpuClaim:
    """This process's exclusive claim on the GPUs it sees, held while any holder has not released
    it (or until the process exits)."""

    def __init__(self, gpus: str, path: Path, handle: int) -> None:
        self.gpus = gpus
        self.path = path
        self.handle = handle
        self.holders = 1

    def release(self) -> None:
        if self.holders == 0:
            return
        self.holders -= 1
        if self.holders == 0:
            os.close(self.handle)  # closing the descriptor drops the flock
            _HELD.pop(self.path, None)


_HELD: dict[Path, GpuClaim] = {}  # this process's claims, by lock file


def claim_gpus(gpus: str | None = None, lock_dir: Path | None = None) -> GpuClaim:
    """Claim ``gpus`` (default: the visible ones) for this process, or raise ``WorkerSetupError``
    naming the process that holds them."""
    gpus = gpus or visible_gpus()
    directory = lock_dir or default_lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"gpu-{re.sub(r'[^A-Za-z0-9,-]', '_', gpus)}.lock"
    held = _HELD.get(path)
    if held is not None:
        held.holders += 1
        return held
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "?"
        os.close(handle)
        raise WorkerSetupError(
            f"GPU(s) {gpus} (CUDA_VISIBLE_DEVICES) are already held by shard unit process {holder} on this "
            "machine: one unit per GPU. Start one worker per GPU, each with CUDA_VISIBLE_DEVICES=<its GPU> "
            "and --limit 1 (deploy/README.md, 'One worker per GPU')"
        ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, str(os.getpid()).encode(), 0)
    claim = _HELD[path] = GpuClaim(gpus, path, handle)
    return claim
