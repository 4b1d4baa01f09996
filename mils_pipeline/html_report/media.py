"""Pictures and sound of the gallery's items: a thumbnail per image, a frame near the start and
the middle frame of a video, a spectrogram picture and a short WAV of a sound.

The media come from the rows when the dataset stores them, otherwise from the source shards the
manifests name (read with the one shard reader, each shard only up to its last wanted sample, the
shards in parallel). An item whose media cannot be had shows why instead of a picture.
"""

from __future__ import annotations

import hashlib
import io
import threading
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mils_pipeline import plots
from mils_pipeline.errors import MediaDecodeError, MilsError
from mils_pipeline.io.shards import iter_samples
from mils_pipeline.media import decode, pick_media

THUMBNAIL_PIXELS = 240
AUDIO_RATE = 16000
AUDIO_SECONDS = 30.0  # the player gets the start of a long clip
READERS = 4  # shards read at once
_PYPLOT = threading.Lock()  # pyplot is not thread-safe; shards are read (and rendered) in threads


@dataclass
class Media:
    """What the gallery shows of one item: files by name (relative to the report) and their bytes."""

    pictures: list[tuple[str, bytes]] = field(default_factory=list)
    sound: tuple[str, bytes] | None = None
    missing: str | None = None  # why there is nothing to show


def gallery_media(
    rows: list[dict[str, Any]], manifests: dict[str, dict[str, Any]], media_column: str | None
) -> list[Media]:
    """What the gallery shows of each row. Each sample is rendered as soon as it is read, so only
    the small pictures are held, never the media of every item."""
    shown = [Media(missing="not read")] * len(rows)
    by_shard: dict[str, dict[str, list[int]]] = {}
    for position, row in enumerate(rows):
        stored = (row.pop(media_column, None) or {}).get("bytes") if media_column else None  # rendered, dropped
        if stored:
            shown[position] = render_media(position, row["modality"], stored)
        else:
            by_shard.setdefault(row["source_shard"], {}).setdefault(row["key"], []).append(position)

    def read_shard(shard: str) -> None:
        wanted = by_shard[shard]
        todo = {p for positions in wanted.values() for p in positions}
        url = (manifests.get(shard, {}).get("input") or {}).get("url")
        if not url:
            for p in todo:
                shown[p] = Media(missing=f"no manifest names the source of shard {shard}")
            return
        try:
            for sample in iter_samples(url):
                for p in wanted.get(sample.key, []):
                    if p not in todo:
                        continue
                    try:
                        _, data = pick_media(sample.members, rows[p]["modality"])
                    except MediaDecodeError:
                        continue
                    # a key can repeat in a shard: the row's media hash says which sample it is
                    if hashlib.sha256(data).hexdigest() == rows[p].get("media_sha256"):
                        shown[p] = render_media(p, rows[p]["modality"], data)
                        todo.discard(p)
                if not todo:
                    break
        except (MilsError, OSError) as exc:
            reason = f"source shard {url} unreadable: {exc}"
        else:
            reason = f"not found in source shard {url} (changed since the run?)"
        for p in todo:
            shown[p] = Media(missing=reason)

    with ThreadPoolExecutor(max_workers=READERS) as pool:
        list(pool.map(read_shard, sorted(by_shard)))
    return shown


def _jpeg(image: Any) -> bytes:
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def _wav(samples: np.ndarray, rate: int) -> bytes:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def render_media(index: int, modality: str, data: bytes) -> Media:
    """The files that show item ``index`` (named ``thumbs/<index>...``, ``sounds/<index>.wav``)."""
    try:
        if modality == "image":
            return Media(pictures=[(f"thumbs/{index}.jpg", _jpeg(decode("image", data)))])
        if modality == "video":
            # 9 frames at the middles of 9 equal spans: the first is near the start, the fifth the middle
            frames = decode("video", data, frames=9).frames
            picked = [("start", frames[0]), ("middle", frames[len(frames) // 2])] if len(frames) > 1 else []
            picked = picked or [("start", frames[0])]
            return Media(pictures=[(f"thumbs/{index}-{name}.jpg", _jpeg(frame)) for name, frame in picked])
        from mils_pipeline.media.audio import AudioSpec

        clip = decode("audio", data, audio=AudioSpec(AUDIO_RATE, AUDIO_SECONDS, 1))
        samples = clip.windows[0][: max(1, round(min(clip.seconds, AUDIO_SECONDS) * AUDIO_RATE))]
        with _PYPLOT:
            picture = plots.spectrogram(samples, AUDIO_RATE)
        return Media(
            pictures=[(f"thumbs/{index}.png", picture)],
            sound=(f"sounds/{index}.wav", _wav(samples, AUDIO_RATE)),
        )
    except MediaDecodeError as exc:
        return Media(missing=f"media could not be decoded: {exc}")
