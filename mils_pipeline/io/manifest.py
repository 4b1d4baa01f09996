"""Per-shard manifests: written last, they mark a shard done for one config hash and input."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from mils_pipeline.errors import OutputError
from mils_pipeline.io.shards import ShardInfo
from mils_pipeline.io.sink import join_url, write_bytes_whole

MANIFEST_VERSION = 1


def manifest_url(output: str, shard: ShardInfo) -> str:
    return join_url(output, "_manifests", f"{shard.name}.json")


def read_manifest(output: str, shard: ShardInfo) -> dict[str, Any] | None:
    url = manifest_url(output, shard)
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputError(f"manifest {url} is unreadable ({exc}); delete it to recompute that shard") from exc


def shard_is_done(manifest: dict[str, Any] | None, shard: ShardInfo, config_sha256: str, output: str) -> bool:
    """True when this shard was finished with this config from this same input.

    A manifest made with another config means the output location holds another dataset version:
    that is an error, never an overwrite.
    """
    if manifest is None:
        return False
    if manifest.get("config_sha256") != config_sha256:
        raise OutputError(
            f"{output} already holds shard {shard.name!r} made with config {manifest.get('config_sha256', '?')[:12]}, "
            f"and this run's config is {config_sha256[:12]}. A new config is a new dataset version: "
            "write it to a new output location"
        )
    return manifest.get("input") == shard.identity()


def write_manifest(output: str, shard: ShardInfo, body: dict[str, Any]) -> None:
    document = {"manifest_version": MANIFEST_VERSION, "shard": shard.name, "input": shard.identity(), **body}
    write_bytes_whole(manifest_url(output, shard), json.dumps(document, indent=2, sort_keys=True).encode())
