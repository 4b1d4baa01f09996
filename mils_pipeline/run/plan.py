"""What a run over a source has to do: the shards it covers, and those not yet done."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import SeedPoolError, ShardReadError
from mils_pipeline.io.manifest import check_not_done_under_another_name, read_manifests, shard_is_done
from mils_pipeline.io.shards import ShardInfo, list_shards
from mils_pipeline.io.sink import check_writable
from mils_pipeline.io.storage import configure_storage
from mils_pipeline.seeding import load_seed_pool


@dataclass
class ShardPlan:
    """Every shard a run covers, and those without a finished manifest for its config."""

    shards: list[ShardInfo]
    todo: list[ShardInfo]

    @property
    def done(self) -> list[ShardInfo]:
        return [s for s in self.shards if s not in self.todo]


def selected_shards(source: str, config: RunConfig, select: Sequence[str] | None = None) -> list[ShardInfo]:
    """The shards under ``source`` (with the run's storage settings), only those whose names match
    one of the ``select`` patterns when given; a selection that matches nothing is an error."""
    configure_storage(config.storage)
    shards = list_shards(source, allow_pipe=config.storage.allow_pipe_urls)
    if select:
        shards = [s for s in shards if any(fnmatch.fnmatchcase(s.name, pattern) for pattern in select)]
        if not shards:
            raise ShardReadError(f"no shard under {source!r} matches {list(select)}")
    return shards


def plan_shards(source: str, output: str, config: RunConfig, select: Sequence[str] | None = None) -> ShardPlan:
    """List the shards under ``source`` (only names matching one of the ``select`` patterns, when
    given), check that ``output`` can take files, and find the shards without a finished manifest
    for this config: a backfill is a plan over the same source after new shards arrived."""
    shards = selected_shards(source, config, select)
    check_writable(output)
    manifests = read_manifests(output)
    check_not_done_under_another_name(manifests, shards, output)
    config_sha = config.config_sha256()
    pool_id = _seed_pool_id(config)
    todo = [s for s in shards if not shard_is_done(manifests.get(s.name), s, config_sha, output, pool_id)]
    return ShardPlan(shards=shards, todo=todo)


def _seed_pool_id(config: RunConfig) -> str | None:
    """The seed pool's content id when the pool is reachable from here (a planner on a control
    machine may not hold it; the shard units check it again where they run)."""
    try:
        return load_seed_pool(config.seed_pool.pool, config.seed_pool.dir).id
    except SeedPoolError:
        return None
