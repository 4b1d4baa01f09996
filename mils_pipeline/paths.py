"""Where the project keeps state between runs: MILS_HOME (default ~/.cache/mils)."""

from __future__ import annotations

import os
from pathlib import Path


def mils_home() -> Path:
    return Path(os.environ.get("MILS_HOME") or Path.home() / ".cache" / "mils").expanduser()


def seed_pool_dir(configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else mils_home() / "seed_pools"
