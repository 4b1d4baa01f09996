"""Media decoding: a registry from modality to file extensions and a decoder.

Every failure to decode is a MediaDecodeError with a short ``error_type``; the caller quarantines
the sample and goes on. Decoders take keyword options from the scorers (frames per clip, sample
rate and window length); PyAV and soundfile are imported only when a video or audio decoder runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mils_pipeline.errors import MediaDecodeError
from mils_pipeline.media.image import decode_image
from mils_pipeline.registry import load_factory

EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"),
    "video": ("mp4", "webm", "mkv", "avi", "mov", "m4v"),
    "audio": ("wav", "flac", "mp3", "ogg", "m4a", "opus"),
}
DECODERS: dict[str, Callable[..., Any] | str] = {
    "image": decode_image,
    "video": "mils_pipeline.media.video:decode_video",
    "audio": "mils_pipeline.media.audio:decode_audio",
}


def pick_media(members: Mapping[str, bytes], modality: str) -> tuple[str, bytes]:
    """The sample's media member for this modality: (extension, bytes)."""
    for ext in EXTENSIONS[modality]:
        if ext in members:
            return ext, members[ext]
    found = ", ".join(sorted(members)) or "nothing"
    raise MediaDecodeError(
        "no_media", f"no {modality} member (expected one of {', '.join(EXTENSIONS[modality])}; found {found})"
    )


def decoder(modality: str) -> Callable[..., Any]:
    entry = DECODERS[modality]
    return load_factory(entry) if isinstance(entry, str) else entry


def decode(modality: str, data: bytes, **options: Any) -> Any:
    """Decode one media member; ``options`` are the scorers' decode options (``frames``, ``audio``)."""
    return decoder(modality)(data, **options)


__all__ = ["DECODERS", "EXTENSIONS", "decode", "decoder", "pick_media"]
