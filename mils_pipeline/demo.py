"""`mils demo`: a small corpus from the photos that ship with scikit-image, captioned on the
embedded defaults (SmolLM2 through llama.cpp, a bundled seed pool).

No pretrained CLIP weights can be had offline, so the demo's scorer is a tiny open_clip model with
random weights: the run shows the pipeline working end to end, and says plainly that its captions
are not descriptions of the photos.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from mils_pipeline.config import config_from_dict
from mils_pipeline.errors import MilsError

# Photos inside the scikit-image wheel, by loader name and file; others in skimage.data are
# downloaded on first use, and are avoided.
DEMO_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "camera": "camera.png",
    "coins": "coins.png",
    "horse": "horse.png",
    "moon": "moon.png",
    "page": "page.png",
    "text": "text.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "logo": "logo.png",
}

TINY_RANDOM_SCORER: dict[str, Any] = {
    "backend": "open_clip",
    "model": "mils-demo-tiny",
    "pretrained": None,
    "architecture": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "init_seed": 0,
}

DEMO_SETTINGS: dict[str, Any] = {
    "scorer": TINY_RANDOM_SCORER,
    "seed_pool": {"pool": "everyday-photos"},
    "optimize": {"top_k": 8, "new_per_round": 8, "max_rounds": 3, "max_active_items": 8},
}


def _photo_jpeg(name: str, filename: str) -> bytes | None:
    import numpy as np
    import skimage.data
    from PIL import Image

    if not (Path(skimage.data.__file__).parent / filename).is_file():
        return None  # not in this scikit-image wheel: it would be downloaded
    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype != np.uint8:
        values = array.astype(np.float64)  # some bundled images are boolean or 16-bit
        array = (255 * (values - values.min()) / max(float(np.ptp(values)), 1e-9)).astype(np.uint8)
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((512, 512))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_demo_corpus(directory: Path, items: int) -> int:
    """Two shards of bundled photos plus one corrupt sample (to show quarantine). Returns photos."""
    from mils_pipeline.io.shards import write_shard

    photos = []
    for name, filename in DEMO_PHOTOS.items():
        if len(photos) >= items:
            break
        data = _photo_jpeg(name, filename)
        if data is not None:
            photos.append((name, {"jpg": data}))
    if not photos:
        raise MilsError("no bundled scikit-image photos could be loaded; is scikit-image installed?")
    half = (len(photos) + 1) // 2
    corrupt = ("broken_photo", {"jpg": photos[0][1]["jpg"][:200]})  # truncated JPEG
    write_shard(str(directory / "shard-000.tar"), photos[:half])
    write_shard(str(directory / "shard-001.tar"), [*photos[half:], corrupt])
    return len(photos)


def run_demo(output: str, items: int, quiet: bool = False, overrides: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    from mils_pipeline.cli import print_summary
    from mils_pipeline.pipeline import caption_dataset
    from mils_pipeline.progress import ProgressBars

    config = config_from_dict(DEMO_SETTINGS, overrides)
    root = Path(output)
    shards, captions = root / "shards", root / "captions"
    photos = make_demo_corpus(shards, items)
    print(f"demo corpus: {photos} photos from scikit-image (+1 corrupt sample) in {shards}")
    print(
        "NOTE: the scorer is a tiny open_clip model with RANDOM weights (no pretrained CLIP can be "
        "had offline). It exercises the whole pipeline, but its scores, and so the captions it "
        "picks, do not describe the photos."
    )
    bars = ProgressBars(enabled=not quiet)
    try:
        summary = caption_dataset(str(shards), str(captions), config, progress=bars)
    finally:
        bars.close()
    print()
    print_summary(summary)
    if summary.skipped == len(summary.shards):
        print(f"(already captioned with this config; delete {root} to start over)")
    table = pq.read_table(captions / "data").to_pylist()
    print("\nA few rows (key: best seed -> final caption):")
    for row in table[:4]:
        seeds = [c for c in row["candidates"] if c["round"] == 0] or row["candidates"]
        best_seed = max(seeds, key=lambda c: c["score"])
        print(f"  {row['key']}: [{best_seed['score']:.3f}] {best_seed['text']!r}")
        pad = " " * len(row["key"])
        print(f"  {pad}  -> [{row['score']:.3f}] {row['caption']!r} ({row['rounds']} rounds, {row['stop_reason']})")
    quarantine = pq.read_table(captions / "quarantine").to_pylist()
    for row in quarantine:
        print(f"quarantined: {row['source_shard']}/{row['key']}: {row['error_type']}: {row['message'][:100]}")
    print(f"\noutput: {captions} (data/, quarantine/, _manifests/, README.md)")
    sys.stdout.flush()
    return 0
