"""A shard's samples as a stream of stages, WebDataset style: ``samples -> unique_keys -> decoded``.

Each stage is a generator over the one before it and yields either the next thing (a raw sample,
a decoded item) or a ``Rejection``: a sample that cannot be captioned, with its reason. Rejections
travel down the stream in order, through the optimizer, to the quarantine writer; no stage keeps
state that another thread reads. Each element carries the seconds its stage spent on it, so the
consumer sums read and decode time without sharing counters with the prefetch thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from mils_pipeline.errors import MediaDecodeError
from mils_pipeline.hashing import bytes_sha256
from mils_pipeline.io.shards import RawSample, ShardDamagedError, ShardInfo, iter_samples
from mils_pipeline.media import decode, pick_media
from mils_pipeline.optimize import ItemInput, Rejection


def _member(raw: RawSample) -> str:
    return raw.member_names[0] if raw.member_names else raw.key


def samples(shard: ShardInfo, allow_pipe: bool = False) -> Iterator[RawSample | Rejection]:
    """The shard's raw samples in order; damage partway ends the stream with one rejection (every
    complete sample before it was yielded)."""
    stream = iter_samples(shard.url, allow_pipe=allow_pipe)
    while True:
        started = time.perf_counter()
        try:
            raw = next(stream)
        except StopIteration:
            return
        except ShardDamagedError as exc:
            yield Rejection(exc.key, "", "damaged_shard", str(exc), seconds_read=time.perf_counter() - started)
            return
        raw.seconds_read = time.perf_counter() - started
        yield raw


def unique_keys(stream: Iterator[RawSample | Rejection]) -> Iterator[RawSample | Rejection]:
    """A key seen earlier in the shard is a rejection: two rows must never share a key."""
    seen: set[str] = set()
    for element in stream:
        if isinstance(element, RawSample):
            if element.key in seen:
                yield Rejection(
                    element.key,
                    _member(element),
                    "duplicate_key",
                    "a sample with this key came earlier in the shard",
                    seconds_read=element.seconds_read,
                )
                continue
            seen.add(element.key)
        yield element


def decoded(
    stream: Iterator[RawSample | Rejection],
    modality: str,
    options: dict[str, Any] | None = None,
    include_media: bool = False,
) -> Iterator[ItemInput | Rejection]:
    """Decoded items in order (``meta`` carries what the output row needs); media that cannot be
    decoded is a rejection with the decoder's reason."""
    order = 0
    for element in stream:
        if isinstance(element, Rejection):
            yield element
            continue
        started = time.perf_counter()
        try:
            ext, data = pick_media(element.members, modality)
            media = decode(modality, data, **(options or {}))
        except MediaDecodeError as exc:
            yield Rejection(
                element.key,
                _member(element),
                exc.error_type,
                str(exc),
                seconds_read=element.seconds_read,
                seconds_decode=time.perf_counter() - started,
            )
            continue
        meta: dict[str, Any] = {
            "order": order,
            "media_sha256": bytes_sha256(data),
            "member": f"{element.key}.{ext}",
            "seconds_read": element.seconds_read,
            "seconds_decode": time.perf_counter() - started,
        }
        if include_media:
            meta["media"] = {"bytes": data, "path": f"{element.key}.{ext}"}
        order += 1
        yield ItemInput(key=element.key, media=media, meta=meta)


def shard_items(
    shard: ShardInfo, modality: str, options: dict[str, Any], include_media: bool, allow_pipe: bool
) -> Iterator[ItemInput | Rejection]:
    """The whole chain for one shard: ``samples -> unique_keys -> decoded``."""
    return decoded(unique_keys(samples(shard, allow_pipe)), modality, options, include_media)
