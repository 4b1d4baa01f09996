"""`mils report` as a person uses it: the report of real small runs (image, video, audio), opened
in headless Chromium (Debian's `chromium` package, driven by Playwright's Python client; no browser
download), a 10,000-row dataset, a dataset on S3 (moto), and the dataset card beside the data."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.config import RunConfig
from mils_pipeline.html_report import DEFAULT_SAMPLE, write_report
from mils_pipeline.io.shards import write_shard
from mils_pipeline.io.sink import DATA_SCHEMA, IMAGE_STRUCT
from mils_pipeline.run import caption_dataset
from mils_pipeline.seeding import THEMES, write_seed_pool
from tests.av_media import audio_file, noise, tone, video_file
from tests.av_models import tiny_clap_settings, tiny_video_settings
from tests.conftest import BUCKET, run_settings
from tests.test_cli import mils
from tests.test_pipeline import write_corpus
from tests.test_s3 import env_for, upload_shards

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_CHROMIUM = (
    "the report tests open the report in headless Chromium, and no `chromium` is on PATH: install "
    "Debian's package with `apt-get update && apt-get install -y chromium` (.ci/run does this in CI)"
)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the Debian package (Playwright launches it with a fresh profile)."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(INSTALL_CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


class Page:
    """One opened report page and every problem the browser reported on it."""

    def __init__(self, browser, index: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.errors.append(f"{r.url}: {r.failure}"))
        started = time.perf_counter()
        self.page.goto(Path(index).as_uri())
        self.page.wait_for_function("document.querySelectorAll('#cards .card').length > 0")
        self.page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        self.seconds = time.perf_counter() - started

    def eval(self, script: str):
        return self.page.evaluate(script)

    def unloaded_images(self) -> list[str]:
        return self.eval("Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.src)")

    def close(self) -> None:
        self.page.close()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, photos, small_pool_texts) -> Path:
    """Photos through real SmolLM2 (rewrite) and the tiny open_clip scorer; two bad samples quarantined."""
    root = tmp_path_factory.mktemp("image")
    write_corpus(root / "in", photos)
    pool = write_seed_pool(small_pool_texts, root / "pools", {"theme": "test"})
    config = RunConfig.model_validate(run_settings((root / "pools", pool.id), max_rounds=1, top_k=3))
    caption_dataset(str(root / "in"), str(root / "out"), config)
    return root / "out"


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("pools")
    ids = {name: write_seed_pool(list(THEMES[name].examples), directory, {}).id for name in ("sounds", "video-scenes")}
    return directory, ids


def av_settings(modality: str, scorer: dict, pools: tuple[Path, dict[str, str]], pool: str, **extra) -> RunConfig:
    directory, ids = pools
    settings = {
        "modality": modality,
        "scorer": scorer,
        "seed_pool": {"pool": ids[pool], "dir": str(directory)},
        "optimize": {"top_k": 3, "new_per_round": 3, "max_rounds": 2, "max_active_items": 4},
        **extra,
    }
    return RunConfig.model_validate(settings)


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, pools) -> Path:
    """Clips with sound scored by two scorers (frames and sound track), one broken clip."""
    root = tmp_path_factory.mktemp("video")
    write_shard(
        str(root / "in" / "clips-000.tar"),
        [
            ("loud", {"mp4": video_file("mp4", sound=tone(2.0))}),
            ("hissing", {"webm": video_file("webm", sound=noise(2.0), color=(30, 30, 220))}),
            ("silent", {"mp4": video_file("mp4", color=(200, 200, 40))}),
            ("garbage", {"mp4": b"this is not a video file at all" * 10}),
        ],
    )
    extra = {"extra_scorers": [{**tiny_clap_settings(), "media": "audio", "weight": 0.5}]}
    config = av_settings("video", tiny_video_settings(), pools, "video-scenes", **extra)
    caption_dataset(str(root / "in"), str(root / "out"), config)
    return root / "out"


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory, pools) -> Path:
    root = tmp_path_factory.mktemp("audio")
    write_shard(
        str(root / "in" / "sounds-000.tar"),
        [
            ("beep", {"wav": audio_file(tone(1.5), 16000)}),
            ("hiss", {"flac": audio_file(noise(3.0, rate=22050), 22050, "FLAC")}),
            ("high", {"ogg": audio_file(tone(1.0, rate=32000, frequency=660), 32000, "OGG")}),
            ("words", {"mp3": b"not an mp3, only words"}),
        ],
    )
    caption_dataset(str(root / "in"), str(root / "out"), av_settings("audio", tiny_clap_settings(), pools, "sounds"))
    return root / "out"


@pytest.mark.parametrize("run", ["image_run", "video_run", "audio_run"])
def test_report_of_a_real_run_shows_every_item_and_opens_its_candidates_in_chromium(request, run, browser, tmp_path):
    out: Path = request.getfixturevalue(run)
    table = pq.read_table(out / "data").to_pylist()
    quarantined = pq.read_table(out / "quarantine").num_rows
    result = mils("report", str(out), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    index = tmp_path / "report" / "index.html"
    assert f"report: {index}" in result.stdout

    page = Page(browser, str(index))
    page.page.screenshot(path=str(tmp_path / "gallery.png"))
    assert page.eval("document.getElementById('item-count').textContent") == str(len(table))
    shown = page.eval("Array.from(document.querySelectorAll('#cards .card .caption')).map(c => c.textContent)")
    assert sorted(shown) == sorted(r["caption"] for r in table)
    thumbnails = page.eval("document.querySelectorAll('#cards img.thumb').length")
    per_item = 2 if run == "video_run" else 1  # a clip shows its start and middle frames
    assert thumbnails == per_item * len(table)
    assert page.unloaded_images() == []  # thumbnails, plots and the card's histogram
    if run == "audio_run":
        assert page.eval("document.querySelectorAll('#cards audio').length") == len(table)
    assert f"Quarantine ({quarantined} samples)" in page.eval("document.getElementById('quarantine').textContent")
    assert page.eval("document.querySelectorAll('#shards a[href^=\"manifests/\"]').length") >= 1 + quarantined

    best = max(table, key=lambda r: r["score"])
    page.page.click(f"#cards .card[data-key='{best['key']}']")
    page.page.wait_for_selector("#detail[open] table.candidates")
    page.page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    page.page.screenshot(path=str(tmp_path / "detail.png"))
    candidates = page.eval(
        "Array.from(document.querySelectorAll('#detail tbody tr td:nth-child(2)')).map(c => c.textContent)"
    )
    assert candidates == [c["text"] for c in best["candidates"]]
    headers = page.eval("Array.from(document.querySelectorAll('#detail thead th')).map(c => c.textContent)")
    if run == "video_run":  # the combined objective: each scorer's component score has its column
        assert headers[-2:] == ["video", "audio"]
    assert page.eval("document.querySelector('#detail img.trajectory').naturalWidth") > 0
    assert page.unloaded_images() == []
    assert page.errors == []
    assert (tmp_path / "gallery.png").stat().st_size > 0 and (tmp_path / "detail.png").stat().st_size > 0
    page.close()


def mils_s3(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    """`mils ...` with the moto server as the S3 endpoint (AWS_ENDPOINT_URL)."""
    return subprocess.run(
        [sys.executable, "-m", "mils_pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=env_for(endpoint),
        timeout=600,
    )


def tiny_png(index: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_dataset(root: Path, rows: int, shards: int) -> None:
    """A dataset as `mils caption` lays it out, with synthetic rows whose media are in the rows."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    schema = DATA_SCHEMA.append(pa.field("image", IMAGE_STRUCT))
    per_shard = rows // shards
    for shard in range(shards):
        name = f"shard-{shard:03d}"
        records = []
        for n in range(per_shard):
            rounds = int(rng.integers(1, 6))
            best = np.sort(rng.uniform(0.1, 0.3, rounds + 1)).tolist()
            records.append(
                {
                    "key": f"{name}-{n:05d}",
                    "source_shard": name,
                    "modality": "image",
                    "caption": f"synthetic caption {shard * per_shard + n}",
                    "score": best[-1],
                    "candidates": [
                        {"text": f"candidate {k}", "score": best[-1] - k / 100, "round": k} for k in range(3)
                    ],
                    "trajectory": [
                        {"round": r, "best_score": b, "mean_top_k": b - 0.05, "new_candidates": 3, "gpu_seconds": 0.01}
                        for r, b in enumerate(best)
                    ],
                    "rounds": rounds,
                    "stop_reason": "max_rounds" if rounds == 5 else "converged",
                    "cost": {
                        "prompt_tokens": 100 * rounds,
                        "completion_tokens": 20 * rounds,
                        "texts_encoded": 3 * rounds,
                    },
                    "image": {"bytes": tiny_png(n), "path": None},
                }
            )
        (root / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records, schema=schema), root / "data" / f"part-{name}.parquet")
        manifest = {"shard": name, "status": "done", "rows": per_shard, "quarantined": 0, "input": {"url": "gone"}}
        (root / "_manifests").mkdir(exist_ok=True)
        (root / "_manifests" / f"{name}.json").write_text(json.dumps(manifest))


def test_report_of_10000_rows_opens_with_a_sample_in_pages(browser, tmp_path):
    synthetic_dataset(tmp_path / "big", rows=10_000, shards=4)
    report = write_report(str(tmp_path / "big"), out=str(tmp_path / "report"))
    assert (report.rows, report.shown) == (10_000, DEFAULT_SAMPLE)
    page = Page(browser, report.index)
    print(f"\n10,000-row report: gallery shown with its thumbnails {page.seconds:.2f} s after navigation")
    assert page.eval("document.getElementById('item-count').textContent") == "10000"
    pages = -(-DEFAULT_SAMPLE // 48)
    assert (
        page.eval("document.getElementById('page-label').textContent") == f"page 1 of {pages} ({DEFAULT_SAMPLE} items)"
    )
    assert page.eval("document.querySelectorAll('#cards .card').length") == 48
    assert page.unloaded_images() == []
    page.page.click("#next")
    page.page.wait_for_function("document.getElementById('page-label').textContent.startsWith('page 2')")
    page.page.click("#cards .card >> nth=0")
    page.page.wait_for_selector("#detail[open] table.candidates")
    assert page.eval("document.querySelectorAll('#detail tbody tr').length") == 3
    assert page.errors == []
    page.close()


def test_report_command_reads_a_dataset_on_s3_and_writes_beside_it(
    s3, s3_endpoint, photos, pool_dir, tmp_path, browser
):
    upload_shards(s3, "in", photos, tmp_path, ["shard-000"])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_settings(pool_dir, max_rounds=1, operators=["crossover"])))
    caption = mils_s3(s3_endpoint, "caption", f"s3://{BUCKET}/in", f"s3://{BUCKET}/out", "-c", str(config), "-q")
    assert caption.returncode == 0, caption.stderr

    beside = mils_s3(s3_endpoint, "report", f"s3://{BUCKET}/out")
    assert beside.returncode == 0, beside.stderr
    assert f"report: s3://{BUCKET}/out/report/index.html" in beside.stdout
    s3.invalidate_cache()
    written = {p.removeprefix(f"{BUCKET}/out/report/") for p in s3.find(f"{BUCKET}/out/report")}
    assert {"index.html", "data/gallery.js", "thumbs/0.jpg", "thumbs/1.jpg", "manifests/shard-000.json"} <= written

    local = mils_s3(s3_endpoint, "report", f"s3://{BUCKET}/out", "--out", str(tmp_path / "report"), "--sort", "key")
    assert local.returncode == 0, local.stderr
    page = Page(browser, str(tmp_path / "report" / "index.html"))
    assert page.eval("document.querySelectorAll('#cards img.thumb').length") == 2  # media read from the S3 shard
    assert page.unloaded_images() == []
    assert page.eval("document.getElementById('sort').value") == "key"
    assert page.errors == []
    page.close()


def test_report_of_a_folder_that_is_no_dataset_says_what_to_pass(tmp_path):
    (tmp_path / "photos").mkdir()
    result = mils("report", str(tmp_path / "photos"))
    assert result.returncode == 2
    assert "is not a mils dataset" in result.stderr and "output location of `mils caption`" in result.stderr
    assert "Traceback" not in result.stderr


def test_dataset_card_follows_hugging_face_conventions_with_its_histogram(image_run, audio_run):
    text = (image_run / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["task_categories"] == ["image-to-text"]
    assert header["annotations_creators"] == ["machine-generated"]
    assert header["size_categories"] == ["n<1K"]
    assert header["source_datasets"][0].startswith("extended|") and header["license"] == "other"
    assert header["model_licenses"]["generator"] == "apache-2.0"  # SmolLM2-135M-Instruct
    assert header["configs"][0]["data_files"][0]["path"] == "data/part-*.parquet"
    for section in ("## Uses", "## Dataset structure", "## Dataset creation", "## Limitations"):
        assert section in text
    assert "randomly initialised weights" in text and "counting" in text
    assert "![Score of the final caption per item](score_histogram.png)" in text
    assert (image_run / "score_histogram.png").read_bytes()[:4] == b"\x89PNG"
    audio_header = yaml.safe_load((audio_run / "README.md").read_text().split("---")[1])
    assert audio_header["task_categories"] == ["audio-text-to-text"]


def test_items_whose_source_shard_is_gone_show_why_instead_of_a_picture(image_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(image_run, out, ignore=shutil.ignore_patterns("report"))
    for path in (out / "_manifests").glob("*.json"):
        manifest = json.loads(path.read_text())
        manifest["input"]["url"] = str(tmp_path / "moved" / Path(manifest["input"]["url"]).name)
        path.write_text(json.dumps(manifest))
    report = write_report(str(out))
    gallery = json.loads((out / "report" / "data" / "gallery.js").read_text().removeprefix("MILS.gallery(")[:-3])
    assert report.shown == len(gallery["items"]) == pq.read_table(out / "data").num_rows
    for item in gallery["items"]:
        assert item["pictures"] == [] and "unreadable" in item["missing"] and str(tmp_path / "moved") in item["missing"]
