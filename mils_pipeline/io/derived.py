"""What commands that derive a new output from a finished dataset share (`mils export`,
`mils rescore`): the media of its rows read back from the source shards its manifests name, and
an output location kept apart from the dataset.

A dataset holds captions and provenance, not media (unless it was asked to). A row names its
source shard, key and media hash; the shard's manifest names the URL it was read from. The media
are matched by key and hash, in the shard's own order, so a shard changed since the run is found
out rather than silently paired with other media.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec

from mils_pipeline.errors import MediaDecodeError, OutputError
from mils_pipeline.io.shards import iter_samples
from mils_pipeline.media import pick_media


class SourceMediaError(OutputError):
    """A source shard a dataset's rows were captioned from is missing, or no longer holds their media."""


def locations_overlap(dataset: str, out: str) -> bool:
    """Whether ``out`` is ``dataset``, lies inside it or holds it (same filesystem, path prefix)."""
    fs, root = fsspec.core.url_to_fs(dataset)
    out_fs, out_root = fsspec.core.url_to_fs(out)
    if fs.protocol != out_fs.protocol:
        return False
    inside, outside = root.rstrip("/") + "/", out_root.rstrip("/") + "/"
    return inside.startswith(outside) or outside.startswith(inside)


def source_urls(shards: Iterable[str], manifests: dict[str, dict[str, Any]], dataset: str) -> dict[str, str]:
    """Each named source shard's URL from its manifest, checked to exist (before anything is written)."""
    urls: dict[str, str] = {}
    for shard in sorted(set(shards)):
        url = (manifests.get(shard, {}).get("input") or {}).get("url")
        if not url:
            raise SourceMediaError(f"no manifest under {dataset}/_manifests names the source of shard {shard!r}")
        urls[shard] = url
    missing = []
    for shard, url in urls.items():
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            missing.append(f"{shard} ({url})")
    if missing:
        raise SourceMediaError(
            f"{len(missing)} source shard(s) of {dataset} are missing: {', '.join(missing)}. The media are read "
            "from them; restore them at the URLs the manifests name"
        )
    return urls


def matched_samples(shard: str, url: str, rows: list[dict[str, Any]]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(extension, media, row) for each row (each has ``key``, ``media_sha256``, ``modality``), read
    from the source shard in its own order; a SourceMediaError when a row's sample (key and media
    hash) is not in the shard."""
    if not rows:
        return
    wanted: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for row in rows:
        wanted.setdefault((row["key"], row["media_sha256"]), []).append(row)
    keys = {key for key, _ in wanted}
    modality = rows[0]["modality"]
    for sample in iter_samples(url):
        if sample.key not in keys:
            continue
        try:
            ext, media = pick_media(sample.members, modality)
        except MediaDecodeError:
            continue
        for row in wanted.pop((sample.key, hashlib.sha256(media).hexdigest()), []):
            yield ext, media, row
        if not wanted:
            return
    missing = ", ".join(sorted(key for key, _ in wanted)[:10])
    raise SourceMediaError(
        f"{sum(map(len, wanted.values()))} sample(s) of source shard {shard} ({url}) are not in it with the media "
        f"they were captioned from (changed since the run?): {missing}"
    )
