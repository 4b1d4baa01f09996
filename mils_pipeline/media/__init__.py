"""Media decoding: a registry from modality to file extensions and a decoder.

Every failure to decode is a MediaDecodeError with a short ``error_type``; the caller quarantines
the sample and goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mils_pipeline.errors import MediaDecodeError
from mils_pipeline.media.image import decode_image

EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"),
}
DECODERS: dict[str, Callable[[bytes], Any]] = {
    "image": decode_image,
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


def decode(modality: str, data: bytes) -> Any:
    return DECODERS[modality](data)


__all__ = ["DECODERS", "EXTENSIONS", "decode", "pick_media"]
