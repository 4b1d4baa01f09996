"""Where the project keeps state between runs: MILS_HOME (default ~/.cache/mils)."""

from __future__ import annotations

from pathlib import Path

from mils_pipeline.settings import settings


def mils_home() -> Path:
    return settings().mils_home.expanduser()


def seed_pool_dir(configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else mils_home() / "seed_pools"
