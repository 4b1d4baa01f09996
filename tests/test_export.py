"""`mils export` of a real small run (tiny open_clip scorer, word operators): WebDataset shards read
back with `webdataset.WebDataset`, Hugging Face Parquet read back with `datasets`, locally and on
S3 (moto), every sample checked against the source shards; filters; the errors a user can cause."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mils_pipeline.config import RunConfig
from mils_pipeline.export import ExportError, export_dataset
from mils_pipeline.io.shards import iter_samples
from mils_pipeline.media import pick_media
from mils_pipeline.run import caption_dataset
from mils_pipeline.seeding import write_seed_pool
from tests.conftest import BUCKET, run_settings
from tests.test_cli import mils
from tests.test_pipeline import write_corpus
from tests.test_s3 import env_for


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos, small_pool_texts) -> Path:
    """Photos captioned by the tiny open_clip scorer and the word operators; bad samples quarantined."""
    root = tmp_path_factory.mktemp("export")
    write_corpus(root / "in", photos)
    pool = write_seed_pool(small_pool_texts, root / "pools", {"theme": "test"})
    settings = run_settings((root / "pools", pool.id), max_rounds=1, top_k=3, operators=["crossover"])
    caption_dataset(str(root / "in"), str(root / "out"), RunConfig.model_validate(settings))
    return root / "out"


def rows_of(dataset: Path) -> list[dict]:
    return pq.read_table(dataset / "data").to_pylist()


def source_media(dataset: Path) -> dict[tuple[str, str, str], tuple[str, bytes]]:
    """(source shard, key, media sha256) -> (extension, bytes), read from the source shards directly."""
    media = {}
    for manifest in (dataset / "_manifests").glob("*.json"):
        body = json.loads(manifest.read_text())
        for sample in iter_samples(body["input"]["url"]):
            try:
                ext, data = pick_media(sample.members, "image")
            except Exception:  # noqa: BLE001  (samples without an image are in quarantine)
                continue
            media[(body["shard"], sample.key, hashlib.sha256(data).hexdigest())] = (ext, data)
    return media


def read_webdataset(shards: list[Path]) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))


def check_against_source(samples: list[dict], dataset: Path, rows: list[dict]) -> None:
    """Every exported sample is a row of the dataset with its own media, caption and provenance."""
    media = source_media(dataset)
    by_identity = {(r["source_shard"], r["key"], r["media_sha256"]): r for r in rows}
    seen = set()
    for sample in samples:
        prov = json.loads(sample["json"])
        identity = (prov["source_shard"], prov["key"], prov["media_sha256"])
        row = by_identity[identity]
        ext, data = media[identity]
        assert sample[ext] == data
        assert sample["txt"].decode() == row["caption"]
        assert prov["score"] == pytest.approx(row["score"])
        assert prov["config_sha256"] == row["config_sha256"] and prov["run_id"] == row["run_id"]
        seen.add(identity)
    assert len(seen) == len(samples)


def test_webdataset_export_holds_every_captioned_sample_with_its_source_media_caption_and_provenance(
    dataset, tmp_path, photos
):
    out = tmp_path / "wds"
    result = mils("export", str(dataset), str(out), "--max-count", "2")
    assert result.returncode == 0, result.stderr
    rows = rows_of(dataset)
    quarantined = pq.read_table(dataset / "quarantine").to_pylist()
    assert f"exported {len(rows)} samples" in result.stdout
    assert f"{len(quarantined)} quarantined samples not exported" in result.stdout

    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) == math.ceil(len(rows) / 2)  # count-limited shards
    samples = read_webdataset(shards)
    assert len(samples) == len(rows)
    check_against_source(samples, dataset, rows)
    exported = {(json.loads(s["json"])["source_shard"], json.loads(s["json"])["key"]) for s in samples}
    unreadable = {(q["source_shard"], q["key"]) for q in quarantined if q["error_type"] != "duplicate_key"}
    assert unreadable and not exported & unreadable
    # the second "rocket" of shard-001 (the coins photo) is quarantined as a duplicate key: never exported
    assert "duplicate_key" in {q["error_type"] for q in quarantined}
    assert photos["coins"] not in [s["jpg"] for s in samples]

    summary = json.loads((out / "export_manifest.json").read_text())
    assert summary["samples"] == len(rows)
    assert summary["config_sha256"] == sorted({r["config_sha256"] for r in rows})
    assert summary["run_id"] == sorted({r["run_id"] for r in rows})
    assert summary["files"] == [s.name for s in shards]
    records = pq.read_table(out / "export_manifest.parquet").to_pylist()
    by_key = {s["__key__"]: json.loads(s["json"]) for s in samples}
    assert sorted(r["export_key"] for r in records) == sorted(by_key)
    for record in records:
        prov = by_key[record["export_key"]]
        assert (record["source_shard"], record["key"], record["source_url"]) == (
            prov["source_shard"],
            prov["key"],
            prov["source_url"],
        )


def test_max_size_limits_the_bytes_of_each_shard(dataset, tmp_path):
    rows = rows_of(dataset)
    report = export_dataset(str(dataset), str(tmp_path / "wds"), max_size=1)
    assert report.samples == len(rows)
    assert len(report.files) == len(rows)  # every sample is over the size limit: one per shard
    assert [len(read_webdataset([tmp_path / "wds" / name])) for name in report.files] == [1] * len(rows)


def test_hf_export_loads_with_datasets_as_an_image_feature(dataset, tmp_path):
    import datasets

    out = tmp_path / "hf"
    result = mils("export", str(dataset), str(out), "--format", "hf", "--max-count", "3")
    assert result.returncode == 0, result.stderr
    rows = rows_of(dataset)
    files = sorted(out.glob("data/train-*.parquet"))
    assert len(files) == math.ceil(len(rows) / 3)
    assert "path: data/train-*.parquet" in (out / "README.md").read_text()

    loaded = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded[0]["image"].size[0] > 0  # decodes to a PIL image
    raw = loaded.cast_column("image", datasets.Image(decode=False))
    samples = [
        {"jpg": r["image"]["bytes"], "txt": r["caption"].encode(), "json": r["provenance"].encode()} for r in raw
    ]
    assert len(samples) == len(rows)
    check_against_source(samples, dataset, rows)


def test_export_from_and_to_s3(dataset, tmp_path, s3, s3_endpoint):
    s3.put(str(dataset), f"{BUCKET}/captions", recursive=True)
    rows = rows_of(dataset)
    for fmt, pattern in (("webdataset", "shard-*.tar"), ("hf", "data/train-*.parquet")):
        out = f"s3://{BUCKET}/export-{fmt}"
        result = subprocess.run(
            [sys.executable, "-m", "mils_pipeline.cli", "export", f"s3://{BUCKET}/captions", out, "--format", fmt],
            capture_output=True,
            text=True,
            env=env_for(s3_endpoint),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        local = tmp_path / fmt
        s3.get(out.removeprefix("s3://"), str(local), recursive=True)
        assert json.loads((local / "export_manifest.json").read_text())["samples"] == len(rows)
        files = sorted(local.glob(pattern))
        assert files
        if fmt == "webdataset":
            check_against_source(read_webdataset(files), dataset, rows)
        else:
            table = pq.read_table(files[0])
            assert b'"_type": "Image"' in table.schema.metadata[b"huggingface"]
            assert sum(pq.read_metadata(f).num_rows for f in files) == len(rows)


def test_min_score_and_top_fraction_keep_the_best_items(dataset, tmp_path):
    rows = rows_of(dataset)
    scores = sorted((r["score"] for r in rows), reverse=True)
    threshold = scores[len(scores) // 2]
    report = export_dataset(str(dataset), str(tmp_path / "min"), min_score=threshold)
    exported = [json.loads(s["json"]) for s in read_webdataset(sorted((tmp_path / "min").glob("*.tar")))]
    assert len(exported) == report.samples == sum(s >= threshold for s in scores)
    assert min(p["score"] for p in exported) >= threshold
    assert report.filtered == len(rows) - report.samples

    report = export_dataset(str(dataset), str(tmp_path / "top"), top_fraction=0.5)
    exported = [json.loads(s["json"]) for s in read_webdataset(sorted((tmp_path / "top").glob("*.tar")))]
    assert len(exported) == report.samples == math.ceil(len(rows) / 2)
    assert sorted((p["score"] for p in exported), reverse=True) == pytest.approx(scores[: report.samples])

    with pytest.raises(ExportError, match="top-fraction"):
        export_dataset(str(dataset), str(tmp_path / "bad"), top_fraction=1.5)


def test_a_path_that_is_not_a_dataset_is_refused(tmp_path):
    (tmp_path / "nothing").mkdir()
    result = mils("export", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "is not a mils dataset" in result.stderr
    assert not (tmp_path / "out").exists()


def copy_with_source(dataset: Path, tmp_path: Path, shard: str, url: str) -> Path:
    """A copy of the dataset whose manifest says ``shard`` was read from ``url``."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    manifest = copy / "_manifests" / f"{shard}.json"
    body = json.loads(manifest.read_text())
    body["input"]["url"] = url
    manifest.write_text(json.dumps(body))
    return copy


def test_a_missing_source_shard_is_named_and_nothing_is_exported(dataset, tmp_path):
    copy = copy_with_source(dataset, tmp_path, "shard-001", str(tmp_path / "gone" / "shard-001.tar"))
    result = mils("export", str(copy), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "1 source shard(s)" in result.stderr and "shard-001" in result.stderr and "gone" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_source_shard_changed_since_the_run_fails_and_removes_what_was_written(dataset, tmp_path):
    other = json.loads((dataset / "_manifests" / "shard-000.json").read_text())["input"]["url"]
    copy = copy_with_source(dataset, tmp_path, "shard-001", other)
    with pytest.raises(ExportError, match=r"shard-001.*not in it"):
        export_dataset(str(copy), str(tmp_path / "out"), max_count=1)  # shard-000's samples are written first
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_refused_unless_overwrite(dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("someone's file")
    result = mils("export", str(dataset), str(out))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").exists()

    result = mils("export", str(dataset), str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists()
    assert len(read_webdataset(sorted(out.glob("*.tar")))) == len(rows_of(dataset))


def test_readme_export_commands_as_written(dataset, tmp_path):
    from tests.doc_commands import run_script, shell_blocks
    from tests.test_doc_commands import _env

    (block,) = [b for b in shell_blocks() if b.document == "README.md" and "mils export" in b.text]
    shutil.copytree(dataset, tmp_path / "mils-demo" / "captions")
    script = "\n".join(c.text for c in block.commands)
    result = run_script(script, tmp_path, _env(tmp_path))
    assert result.returncode == 0, f"{script}\n{result.stderr}"
    rows = rows_of(dataset)
    assert len(read_webdataset(sorted((tmp_path / "export" / "wds").glob("*.tar")))) == len(rows)
    hf_rows = sum(pq.read_metadata(f).num_rows for f in (tmp_path / "export" / "hf" / "data").glob("*.parquet"))
    assert hf_rows == math.ceil(len(rows) / 2)


def test_out_inside_the_dataset_is_refused(dataset, tmp_path):
    with pytest.raises(ExportError, match="inside the dataset"):
        export_dataset(str(dataset), str(dataset / "export"), overwrite=True)
    with pytest.raises(ExportError, match="inside the dataset"):
        export_dataset(str(dataset), str(dataset.parent), overwrite=True)
    assert (dataset / "data").is_dir() and not (dataset / "export").exists()


def test_overwrite_keeps_out_when_a_source_shard_is_missing(dataset, tmp_path):
    copy = copy_with_source(dataset, tmp_path, "shard-000", str(tmp_path / "gone.tar"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.tar").write_bytes(b"an earlier export")
    with pytest.raises(ExportError, match="missing"):
        export_dataset(str(copy), str(out), overwrite=True)
    assert (out / "earlier.tar").read_bytes() == b"an earlier export"


@pytest.fixture(scope="module")
def audio_dataset(tmp_path_factory) -> Path:
    """Sounds (WAV, FLAC) scored by a tiny CLAP, one undecodable clip quarantined."""
    from mils_pipeline.io.shards import write_shard
    from mils_pipeline.seeding import THEMES
    from tests.av_media import audio_file, noise, tone
    from tests.av_models import tiny_clap_settings

    root = tmp_path_factory.mktemp("audio")
    write_shard(
        str(root / "in" / "sounds-000.tar"),
        [
            ("beep", {"wav": audio_file(tone(1.0), 16000)}),
            ("hiss", {"flac": audio_file(noise(1.0, rate=22050), 22050, "FLAC")}),
            ("words", {"mp3": b"not an mp3, only words"}),
        ],
    )
    pool = write_seed_pool(list(THEMES["sounds"].examples), root / "pools", {})
    settings = {
        "modality": "audio",
        "scorer": tiny_clap_settings(),
        "seed_pool": {"pool": pool.id, "dir": str(root / "pools")},
        "optimize": {"top_k": 3, "new_per_round": 3, "max_rounds": 1, "operators": ["crossover"]},
    }
    caption_dataset(str(root / "in"), str(root / "out"), RunConfig.model_validate(settings))
    return root / "out"


def test_audio_is_exported_with_its_original_extension(audio_dataset, tmp_path):
    import datasets

    rows = rows_of(audio_dataset)
    assert sorted(r["key"] for r in rows) == ["beep", "hiss"]
    export_dataset(str(audio_dataset), str(tmp_path / "wds"))
    samples = {s["__key__"]: s for s in read_webdataset(sorted((tmp_path / "wds").glob("*.tar")))}
    by_source_key = {json.loads(s["json"])["key"]: s for s in samples.values()}
    source = {s.key: s.members for s in iter_samples(str(next((audio_dataset.parent / "in").glob("*.tar"))))}
    assert by_source_key["beep"]["wav"] == source["beep"]["wav"]
    assert by_source_key["hiss"]["flac"] == source["hiss"]["flac"]

    export_dataset(str(audio_dataset), str(tmp_path / "hf"), format="hf")
    loaded = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "hf" / "data" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert isinstance(loaded.features["audio"], datasets.Audio)
    raw = {r["source_key"]: r["audio"] for r in loaded.cast_column("audio", datasets.Audio(decode=False))}
    assert raw["beep"] == {"bytes": source["beep"]["wav"], "path": "beep.wav"}
    assert raw["hiss"]["path"] == "hiss.flac"


def test_push_to_needs_the_hf_format_and_a_token(dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_HUB_OFFLINE": "1"}

    def export(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mils_pipeline.cli", "export", str(dataset), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    result = export(str(tmp_path / "wds"), "--push-to", "someone/captions")
    assert result.returncode == 2 and "--push-to needs --format hf" in result.stderr
    assert not (tmp_path / "wds").exists()
    result = export(str(tmp_path / "hf"), "--format", "hf", "--push-to", "someone/captions")
    assert result.returncode == 2 and "no token is set" in result.stderr
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "README.md",
        "data",
        "export_manifest.json",
        "export_manifest.parquet",
    ]
