"""Image bytes -> RGB PIL image, with a guard against decompression bombs."""

from __future__ import annotations

import io
import warnings

from mils_pipeline.errors import MediaDecodeError

# Larger than any real photo corpus needs (a 16k x 16k image); a header claiming more is refused
# before any pixel is decoded.
MAX_PIXELS = 16384 * 16384


def decode_image(data: bytes):  # -> PIL.Image.Image (PIL is imported lazily)
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MediaDecodeError("empty", "the image member has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise MediaDecodeError(
                    "too_large", f"image header claims {width}x{height} pixels, above the {MAX_PIXELS} limit"
                )
            image.load()
            return image.convert("RGB")
    except MediaDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise MediaDecodeError("not_an_image", f"not a readable image: {exc}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaDecodeError("too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaDecodeError("corrupt", f"image data is corrupt or truncated: {exc}") from exc
