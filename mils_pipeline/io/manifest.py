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
    fs.invalidate_cache(path)  # written by other processes (a fan-out's units): ask the store, not a cached listing
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputError(f"manifest {url} is unreadable ({exc}); delete it to recompute that shard") from exc


def read_manifests(output: str) -> dict[str, dict[str, Any]]:
    """Every manifest under ``output``, by shard name, fetched in one batch (one listing, then
    concurrent reads on object stores) rather than one round trip per shard."""
    directory = join_url(output, "_manifests")
    fs, path = fsspec.core.url_to_fs(directory)
    # Other processes (a fan-out's units) write manifests here: list the store as it is now. A listing
    # s3fs cached earlier in this process (the plan's) misses theirs, and fs.cat then fails on them.
    fs.invalidate_cache(path)
    try:
        paths = [p for p in fs.find(path) if p.endswith(".json")]
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise OutputError(f"cannot read the manifests under {directory}: {exc}") from exc
    try:
        blobs = fs.cat(paths) if paths else {}
    except OSError as exc:  # a missing one too: never "no manifests at all" because one went astray
        raise OutputError(f"cannot read the manifests under {directory}: {exc}") from exc
    manifests = {}
    for blob_path, blob in sorted(blobs.items()):
        try:
            manifest = json.loads(blob)
        except json.JSONDecodeError as exc:
            raise OutputError(f"manifest {blob_path} is unreadable ({exc}); delete it to recompute that shard") from exc
        manifests[manifest.get("shard") or blob_path.rsplit("/", 1)[-1].removesuffix(".json")] = manifest
    return manifests


def _new_version(output: str, shard: ShardInfo, what: str, theirs: object, ours: object) -> OutputError:
    return OutputError(
        f"{output} already holds shard {shard.name!r} made with {what} {theirs}, and this run's is {ours}. "
        "A change of inputs is a new dataset version: write it to a new output location"
    )


def shard_is_done(
    manifest: dict[str, Any] | None,
    shard: ShardInfo,
    config_sha256: str,
    output: str,
    seed_pool_id: str | None = None,
    models: dict[str, Any] | None = None,
) -> bool:
    """True when this shard was finished with this config, seed pool and models from this same input.

    A manifest made with another config, seed pool or model (when those are given), or from
    another shard URL under the same name, means the output location holds something else: that
    is an error, never an overwrite. The same URL with a new size or ETag is a changed shard:
    it is captioned again and its part files replaced.
    """
    if manifest is None:
        return False
    if manifest.get("config_sha256") != config_sha256:
        raise _new_version(output, shard, "config", str(manifest.get("config_sha256", "?"))[:12], config_sha256[:12])
    done_url = (manifest.get("input") or {}).get("url")
    if done_url != shard.url:
        raise OutputError(
            f"{output} already holds shard {shard.name!r} read from {done_url}, and this run's shard "
            f"{shard.name!r} is {shard.url}. Shard names are the shard paths below the source you give: "
            "run with the same source as the earlier run, or write to a new output location"
        )
    if seed_pool_id is not None and manifest.get("seed_pool_id") not in (None, seed_pool_id):
        raise _new_version(output, shard, "seed pool", manifest.get("seed_pool_id"), seed_pool_id)
    for role, identity in (models or {}).items():
        if manifest.get(role) not in (None, identity):
            raise _new_version(output, shard, f"{role}", manifest.get(role), identity)
    return manifest.get("input") == shard.identity()


def check_not_done_under_another_name(
    manifests: dict[str, dict[str, Any]], shards: list[ShardInfo], output: str
) -> None:
    """A shard URL already captioned under another name (the same tar reached through another
    source root) would be captioned again under its new name: duplicate rows. Refuse that."""
    names_by_url = {(m.get("input") or {}).get("url"): name for name, m in manifests.items()}
    for shard in shards:
        earlier = names_by_url.get(shard.url)
        if earlier is not None and earlier != shard.name:
            raise OutputError(
                f"{shard.url} was already captioned into {output} as shard {earlier!r}; this run would name it "
                f"{shard.name!r} and write its rows twice. Run with the same source as the earlier run"
            )


def write_manifest(output: str, shard: ShardInfo, body: dict[str, Any]) -> None:
    document = {"manifest_version": MANIFEST_VERSION, "shard": shard.name, "input": shard.identity(), **body}
    write_bytes_whole(manifest_url(output, shard), json.dumps(document, indent=2, sort_keys=True).encode())
