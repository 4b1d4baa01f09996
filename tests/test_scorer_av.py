"""Video and audio scorers built tiny and random in the test, and the combined objective."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mils_pipeline.config import ScorerConfig
from mils_pipeline.errors import ModelUnavailableError
from mils_pipeline.media import decode
from mils_pipeline.score import Scorer, build_scorer, build_text_encoder
from mils_pipeline.score.footprint import scorer_weight_bytes
from mils_pipeline.score.objective import MEDIA_PARTS, Component, Objective
from mils_pipeline.seeding import THEMES
from mils_pipeline.text import normalise_text
from tests.av_media import audio_file, noise, tone, video_file
from tests.av_models import save_tiny_clap_checkpoint, tiny_clap_settings, tiny_video_settings, tiny_xclip_settings


@pytest.fixture(scope="module")
def clap():
    return build_scorer(ScorerConfig(**tiny_clap_settings()), "audio")


@pytest.fixture(scope="module")
def video_scorer():
    return build_scorer(ScorerConfig(**tiny_video_settings(media_batch_size=3)), "video")


@pytest.fixture(scope="module")
def xclip():
    return build_scorer(ScorerConfig(**tiny_xclip_settings(media_batch_size=2)), "video")


def sounds(scorer) -> list:
    return [
        decode("audio", audio_file(data, 16000), **scorer.decode_options)
        for data in (tone(1.0), noise(12.0), tone(25.0, frequency=880))
    ]


def test_clap_asks_for_windows_of_its_input_length_and_embeds_normalised_rows(clap):
    spec = clap.decode_options["audio"]
    assert (spec.sample_rate, spec.window_seconds, spec.windows) == (48000, 10.0, 3)
    clips = sounds(clap)
    assert [len(c.windows) for c in clips] == [1, 1, 2]
    media, texts = clap.embed_media(clips), clap.embed_texts(["a dog barks", "rain on a tin roof"])
    assert media.shape == (3, 32) and texts.shape == (2, 32)
    assert media.dtype == np.float32 and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(media, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)


def test_clap_random_init_is_deterministic_and_says_so(clap):
    again = build_scorer(ScorerConfig(**tiny_clap_settings()), "audio")
    assert again.random_weights and again.identity.revision == "random-init:seed=0"
    assert again.identity.backend == "clap" and again.identity.parameters["windows"] == 3
    np.testing.assert_allclose(again.embed_texts(["a bell"]), clap.embed_texts(["a bell"]), atol=1e-6)


def test_a_clip_is_the_mean_of_its_windows(clap):
    long_clip = sounds(clap)[2]
    whole = clap.embed_media([long_clip])[0]
    parts = [clap.embed_media([type(long_clip)([w], long_clip.sample_rate, 10.0)])[0] for w in long_clip.windows]
    mean = np.mean(parts, axis=0)
    np.testing.assert_allclose(whole, mean / np.linalg.norm(mean), atol=1e-5)


def test_clap_checkpoint_directory_loads_offline_with_its_trained_tokenizer(tmp_path, clap):
    corpus = [*THEMES["sounds"].examples, "a dog barks"] * 3
    directory = save_tiny_clap_checkpoint(tmp_path / "clap", corpus)
    loaded = build_scorer(ScorerConfig(backend="clap", model="tiny", checkpoint=str(directory)), "audio")
    assert not loaded.random_weights and loaded.identity.revision.startswith("sha256:")
    tokens = loaded._tokenizer(["a dog barks"])["input_ids"][0]
    assert len(tokens) < len("a dog barks") + 2  # trained merges, not one token per byte
    embeddings = loaded.embed_texts(["a dog barks", "a kettle whistles"])
    assert embeddings.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(loaded.embed_media(sounds(loaded)[:1]), axis=1), 1.0, rtol=1e-5)


def test_clap_from_the_hub_offline_fails_with_the_checkpoint_fix():
    with pytest.raises(ModelUnavailableError) as err:
        build_scorer(ScorerConfig(backend="clap", model="laion/clap-htsat-unfused", pretrained="main"), "audio")
    assert "scorer.checkpoint=" in str(err.value) and "laion/clap-htsat-unfused" in str(err.value)


def test_checkpoint_that_is_not_a_directory_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelUnavailableError, match="save_pretrained"):
        build_scorer(ScorerConfig(backend="clap", model="x", checkpoint=str(tmp_path / "weights.bin")), "audio")


def test_video_scorer_mean_pools_frame_embeddings_across_batches(video_scorer, tiny_scorer):
    clips = [
        decode("video", video_file("mp4", frames=12), **video_scorer.decode_options),
        decode("video", video_file("webm", frames=2, color=(0, 200, 0)), **video_scorer.decode_options),
    ]
    assert [len(c.frames) for c in clips] == [4, 2]
    pooled = video_scorer.embed_media(clips)
    for row, clip in zip(pooled, clips, strict=True):
        mean = tiny_scorer.embed_media(clip.frames).mean(axis=0)  # the same weights, frame by frame
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-5)
    assert video_scorer.identity.parameters["frames"] == 4 and video_scorer.identity.parameters["pooling"] == "mean"


def test_xclip_embeds_whole_clips_with_its_fixed_frame_count(xclip):
    scorer = xclip
    assert scorer.decode_options == {"frames": 4} and scorer.identity.backend == "xclip"
    clips = [
        decode("video", video_file(container, frames=frames), **scorer.decode_options)
        for container, frames in (("mp4", 20), ("webm", 20), ("mkv", 2))  # the last has 2 frames, repeated
    ]
    media, texts = scorer.embed_media(clips), scorer.embed_texts(["a red square moves right", "a dog"])
    assert media.shape == (3, 32) and texts.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(media, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scorer.embed_media(clips[:1]), media[:1], atol=1e-5)  # batching changes nothing


def test_combined_objective_weights_components_and_skips_a_missing_sound_track(video_scorer, clap):
    texts = [normalise_text(t) for t in THEMES["video-scenes"].examples[:6]]  # pools embed normal forms
    spec = clap.decode_options["audio"]
    components = [
        Component("video", 2.0, build_text_encoder(video_scorer, ScorerConfig()), video_scorer.embed_texts(texts)),
        Component(
            "audio", 1.0, build_text_encoder(clap, ScorerConfig()), clap.embed_texts(texts), MEDIA_PARTS["audio"]
        ),
    ]
    objective = Objective(components)
    clips = [
        decode("video", video_file("mp4", sound=tone(2.0)), frames=4, audio=spec),
        decode("video", video_file("mp4"), frames=4, audio=spec),
    ]
    loud, silent = objective.embed_media(clips)
    assert loud.embeddings[1] is not None and silent.embeddings[1] is None
    indices = np.arange(len(texts))
    for item in (loud, silent):
        combined = objective.pool_embeddings @ objective.query(item)
        parts = objective.pool_components(indices, item)
        scored, scored_parts = objective.score(objective.encode(texts), slice(0, len(texts)), item)
        if item is loud:
            expected = (2.0 * parts[:, 0] + 1.0 * parts[:, 1]) / 3.0
        else:
            assert np.isnan(parts[:, 1]).all()
            expected = parts[:, 0]
        np.testing.assert_allclose(combined, expected, atol=1e-5)
        np.testing.assert_allclose(scored, expected, atol=1e-5)
        np.testing.assert_allclose(scored_parts, parts, atol=1e-5)


def test_every_backend_declares_what_callers_use(clap, video_scorer, xclip):
    for scorer in (clap, video_scorer, xclip):
        assert isinstance(scorer, Scorer) and scorer.device == "cpu"
    assert video_scorer.decode_options == {"frames": 4} and set(clap.decode_options) == {"audio"}


def test_transformers_scorers_estimate_their_footprint_without_open_clip(monkeypatch, clap, xclip):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # an import of either would now fail
    monkeypatch.setitem(sys.modules, "timm", None)
    for scorer in (clap, xclip):
        footprint = scorer.footprint()
        assert footprint.weight_bytes == scorer_weight_bytes(scorer._model) > 0
        assert 0 < footprint.text_bytes_per_item < footprint.media_bytes_per_item


def test_transformers_scorers_flag_texts_longer_than_their_text_context(clap, xclip):
    from mils_pipeline.score.context import configured_text_context

    # the byte-level test tokenizer: one token per byte, plus a start and an end token
    assert clap.text_context == 64 == configured_text_context(ScorerConfig(**tiny_clap_settings()))
    fits, longer = "a" * 62, "a" * 63
    assert clap.truncated([fits, longer, ""]).tolist() == [False, True, False]
    context = configured_text_context(ScorerConfig(**tiny_xclip_settings()))
    assert xclip.text_context == context
    assert xclip.truncated(["a" * (context - 2), "a" * (context - 1)]).tolist() == [False, True]
