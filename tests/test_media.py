import io
import struct
import zlib

import pytest
from PIL import Image

from mils_pipeline.errors import MediaDecodeError
from mils_pipeline.media import decode, pick_media


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims the given size, with one tiny data chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def error_type(data: bytes) -> str:
    with pytest.raises(MediaDecodeError) as err:
        decode("image", data)
    return err.value.error_type


def test_real_photo_decodes_to_rgb(photos):
    image = decode("image", photos["camera"])  # a grey photo comes out RGB
    assert image.mode == "RGB" and image.size[0] > 0


def test_png_and_palette_images_decode():
    buffer = io.BytesIO()
    Image.new("P", (10, 10)).save(buffer, format="PNG")
    assert decode("image", buffer.getvalue()).mode == "RGB"


def test_undecodable_inputs_each_get_a_reason(photos):
    assert error_type(b"") == "empty"
    assert error_type(b"this is not an image at all") == "not_an_image"
    assert error_type(photos["chelsea"][:300]) == "corrupt"


def test_decompression_bomb_header_is_refused_before_decoding():
    assert error_type(png_claiming(100_000, 100_000)) == "too_large"


def test_sample_without_a_media_member_says_what_it_found():
    with pytest.raises(MediaDecodeError, match="found json, txt") as err:
        pick_media({"txt": b"x", "json": b"{}"}, "image")
    assert err.value.error_type == "no_media"


def test_media_member_is_picked_by_extension():
    assert pick_media({"json": b"{}", "png": b"P"}, "image") == ("png", b"P")
