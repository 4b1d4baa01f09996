"""Video and audio shards through the whole caption run: PyAV-written clips and soundfile tones in
real tars, real SmolLM2, tiny random open_clip (frames) and CLAP scorers, Parquet out."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.config import RunConfig
from mils_pipeline.io.shards import write_shard
from mils_pipeline.run import caption_dataset
from mils_pipeline.seeding import THEMES, write_seed_pool
from tests.av_media import audio_file, noise, tone, video_file
from tests.av_models import tiny_clap_settings, tiny_video_settings
from tests.test_cli import mils


def settings(modality: str, scorer: dict, pools: Path, pool_id: str, **extra) -> dict:
    return {
        "modality": modality,
        "generator": {"threads": 2},
        "scorer": scorer,
        "seed_pool": {"pool": pool_id, "dir": str(pools)},
        "optimize": {"top_k": 3, "new_per_round": 3, "max_rounds": 1, "max_active_items": 4},
        **extra,
    }


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("pools")
    ids = {name: write_seed_pool(list(THEMES[name].examples), directory, {}).id for name in ("sounds", "video-scenes")}
    return directory, ids


@pytest.fixture(scope="module")
def video_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video-in")
    clip = video_file("mkv", frames=30, sound=tone(3.0))
    write_shard(
        str(root / "clips-000.tar"),
        [
            ("square-mp4", {"mp4": video_file("mp4"), "json": b"{}"}),
            ("square-webm", {"webm": video_file("webm", color=(40, 200, 40))}),
            ("with-sound", {"mkv": clip}),
            ("sideways", {"mp4": video_file("mp4", rotation=90)}),
            ("old-avi", {"avi": video_file("avi", sound=noise(2.0))}),
            ("garbage", {"mp4": b"this is not a video file at all" * 10}),
            ("cut-short", {"mkv": clip[: len(clip) // 2]}),
            ("only-sound", {"mp4": audio_file(tone(1.0), 16000)}),
            ("nothing", {"webm": b""}),
            ("caption-only", {"txt": b"a clip"}),
        ],
    )
    return root


@pytest.fixture(scope="module")
def audio_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio-in")
    wav = audio_file(tone(2.0, rate=44100, channels=2), 44100)
    write_shard(
        str(root / "sounds-000.tar"),
        [
            ("beep", {"wav": audio_file(tone(1.5), 16000)}),
            ("hiss", {"flac": audio_file(noise(4.0, rate=22050), 22050, "FLAC")}),
            ("stereo-beep", {"wav": wav}),
            ("vorbis", {"ogg": audio_file(tone(1.0, rate=32000, frequency=660), 32000, "OGG")}),
            ("from-video", {"m4a": video_file("mp4", sound=tone(2.0))}),
            ("cut-wav", {"wav": wav[: len(wav) // 3]}),
            ("bad-flac", {"flac": b"fLaC" + bytes(range(256)) * 4}),
            ("silence-file", {"wav": b""}),
            ("words", {"mp3": b"not an mp3, only words"}),
        ],
    )
    return root


def quarantine_reasons(out: Path) -> dict[str, str]:
    return {r["key"]: r["error_type"] for r in pq.read_table(out / "quarantine").to_pylist()}


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, video_corpus, pools):
    directory, ids = pools
    out = tmp_path_factory.mktemp("video-out")
    config = RunConfig.model_validate(settings("video", tiny_video_settings(), directory, ids["video-scenes"]))
    summary = caption_dataset(str(video_corpus), str(out), config)
    return out, summary


def test_video_shard_rows_carry_modality_video_and_their_component_score(video_run):
    out, summary = video_run
    rows = pq.read_table(out / "data").to_pylist()
    assert sorted(r["key"] for r in rows) == ["old-avi", "sideways", "square-mp4", "square-webm", "with-sound"]
    for row in rows:
        assert row["modality"] == "video"
        assert [(s["name"], s["weight"], s["backend"]) for s in row["scorers"]] == [("video", 1.0, "open_clip")]
        assert '"frames": 4' in row["scorers"][0]["parameters"]
        for candidate in row["candidates"]:
            assert [c["name"] for c in candidate["components"]] == ["video"]
            assert candidate["components"][0]["score"] == pytest.approx(candidate["score"], abs=1e-5)
    assert summary.rows == 5


def test_broken_video_samples_are_quarantined_with_their_reason(video_run):
    out, summary = video_run
    assert quarantine_reasons(out) == {
        "garbage": "not_a_video",
        "cut-short": "truncated",
        "only-sound": "no_video_stream",
        "nothing": "empty",
        "caption-only": "no_media",
    }
    assert summary.quarantined == 5


def test_audio_shard_through_the_mils_command(tmp_path, audio_corpus, pools):
    directory, ids = pools
    config = tmp_path / "audio.yaml"
    config.write_text(yaml.safe_dump(settings("audio", tiny_clap_settings(), directory, ids["sounds"])))
    result = mils("caption", str(audio_corpus), str(tmp_path / "out"), "-c", str(config), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "items:         5 captioned, 4 quarantined" in result.stdout
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert sorted(r["key"] for r in rows) == ["beep", "from-video", "hiss", "stereo-beep", "vorbis"]
    for row in rows:
        assert row["modality"] == "audio" and row["scorer"]["backend"] == "clap"
        assert [c["name"] for c in row["candidates"][0]["components"]] == ["audio"]
        assert row["candidates"][0]["components"][0]["score"] == pytest.approx(row["score"], abs=1e-5)
    assert quarantine_reasons(tmp_path / "out") == {
        "cut-wav": "truncated",
        "bad-flac": "corrupt",
        "silence-file": "empty",
        "words": "not_audio",
    }


def test_video_with_sound_runs_the_combined_objective_and_records_both_components(tmp_path, pools):
    directory, ids = pools
    source = tmp_path / "in"
    write_shard(
        str(source / "talkies.tar"),
        [
            ("loud", {"mp4": video_file("mp4", sound=tone(2.0))}),
            ("hissing", {"webm": video_file("webm", sound=noise(2.0), color=(30, 30, 220))}),
            ("silent", {"mp4": video_file("mp4", color=(200, 200, 40))}),
        ],
    )
    extra = {"extra_scorers": [{**tiny_clap_settings(), "media": "audio", "weight": 0.5}]}
    config = RunConfig.model_validate(settings("video", tiny_video_settings(), directory, ids["video-scenes"], **extra))
    summary = caption_dataset(str(source), str(tmp_path / "out"), config)
    assert summary.rows == 3 and summary.quarantined == 0
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    for row in rows.values():
        assert [(s["name"], s["weight"], s["backend"]) for s in row["scorers"]] == [
            ("video", 1.0, "open_clip"),
            ("audio", 0.5, "clap"),
        ]
    for key in ("loud", "hissing"):
        for candidate in rows[key]["candidates"]:
            video, audio = (c["score"] for c in candidate["components"])
            assert candidate["score"] == pytest.approx((1.0 * video + 0.5 * audio) / 1.5, abs=1e-5)
    for candidate in rows["silent"]["candidates"]:  # no sound track: the video scorer alone
        video, audio = (c["score"] for c in candidate["components"])
        assert audio is None and candidate["score"] == pytest.approx(video, abs=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "scorers, combined by weight" in card and "audio: `clap`" in card and "weight 0.5" in card
