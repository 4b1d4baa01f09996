"""Image bytes -> RGB PIL image, with a guard against decompression bombs."""

from __future__ import annotations

import io

from mils_pipeline.errors import MediaDecodeError

# Larger than any real photo corpus needs (a 16k x 16k image); a header claiming more is refused
# before any pixel is decoded.
MAX_PIXELS = 16384 * 16384
DECODE_SIDE = 1024


def decode_image(data: bytes):  # -> PIL.Image.Image (PIL is imported lazily)
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MediaDecodeError("empty", "the image member has zero bytes")
    try:
        # Pillow itself refuses headers above twice its MAX_IMAGE_PIXELS (DecompressionBombError);
        # the size check below holds even where a process raised or removed Pillow's limit.
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise MediaDecodeError(
                "too_large", f"image header claims {width}x{height} pixels, above the {MAX_PIXELS} limit"
            )
        # Scorers look at a few hundred pixels: JPEGs decode straight at a reduced scale
        # (1/2 .. 1/8, never below DECODE_SIDE), which saves most of the decoding time and memory.
        image.draft("RGB", (DECODE_SIDE, DECODE_SIDE))
        image.load()
        return image.convert("RGB")
    except MediaDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise MediaDecodeError("not_an_image", f"not a readable image: {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise MediaDecodeError("too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if any(word in str(exc).lower() for word in ("unsupported", "not available", "unknown")):
            message = f"the image uses an encoding this decoder lacks: {exc}"
            raise MediaDecodeError("unsupported_codec", message) from exc
        raise MediaDecodeError("corrupt", f"image data is corrupt or truncated: {exc}") from exc
