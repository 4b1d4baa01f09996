import numpy as np
import pytest
import torch
from PIL import Image

from mils_pipeline.config import ScorerConfig
from mils_pipeline.errors import ModelUnavailableError
from mils_pipeline.score import Scorer, build_scorer
from mils_pipeline.score.footprint import scorer_weight_bytes
from mils_pipeline.score.open_clip_image import footprint_from_open_clip_config
from tests.conftest import TINY_ARCHITECTURE, tiny_scorer_settings


def test_embeddings_are_normalised_float32_rows(tiny_scorer):
    texts = tiny_scorer.embed_texts(["a dog", "a cat on a mat", "a red car"])
    images = tiny_scorer.embed_media([Image.new("RGB", (64, 48), c) for c in ("red", "blue")])
    assert texts.shape == (3, 32) and images.shape == (2, 32)
    assert texts.dtype == np.float32 and images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, rtol=1e-5)


def test_media_batches_give_the_same_embeddings_as_one_call():
    scorer = build_scorer(ScorerConfig(**tiny_scorer_settings(media_batch_size=2)), "image")
    images = [Image.new("RGB", (40, 40), (i * 40, 0, 0)) for i in range(5)]
    batched = scorer.embed_media(images)
    single = np.concatenate([scorer.embed_media([im]) for im in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_random_init_is_deterministic_and_says_so(tiny_scorer):
    again = build_scorer(ScorerConfig(**tiny_scorer_settings()), "image")
    assert again.random_weights and again.identity.revision == "random-init:seed=0"
    np.testing.assert_allclose(again.embed_texts(["a dog"]), tiny_scorer.embed_texts(["a dog"]), atol=1e-6)


def test_local_checkpoint_loads_offline_and_is_identified_by_hash(tmp_path, tiny_scorer):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_scorer._model.state_dict(), path)
    settings = tiny_scorer_settings(init_seed=123, checkpoint=str(path))
    loaded = build_scorer(ScorerConfig(**settings), "image")
    assert not loaded.random_weights
    assert loaded.identity.revision.startswith("sha256:")
    np.testing.assert_allclose(loaded.embed_texts(["a dog"]), tiny_scorer.embed_texts(["a dog"]), atol=1e-6)


def test_hub_weights_offline_fail_with_the_checkpoint_fix():
    config = ScorerConfig(model="ViT-B-32", pretrained="openai")
    with pytest.raises(ModelUnavailableError) as err:
        build_scorer(config, "image")
    assert "scorer.checkpoint=" in str(err.value)
    assert "ViT-B-32" in str(err.value)


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    config = ScorerConfig(**tiny_scorer_settings(checkpoint=str(tmp_path / "nope.pt")))
    with pytest.raises(ModelUnavailableError, match="is not a file"):
        build_scorer(config, "image")


def test_the_image_scorer_declares_what_callers_use(tiny_scorer):
    assert isinstance(tiny_scorer, Scorer)
    assert tiny_scorer.device == "cpu" and tiny_scorer.decode_options == {}  # images need no decode options
    assert tiny_scorer.footprint().weight_bytes == scorer_weight_bytes(tiny_scorer._model)


def test_half_precision_computes_in_half_and_plans_two_bytes_per_activation(tiny_scorer):
    half = build_scorer(ScorerConfig(**tiny_scorer_settings(device="cpu", precision="fp16")), "image")
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    embedded = half.embed_media(images)
    assert embedded.dtype == np.float32
    np.testing.assert_allclose(embedded, tiny_scorer.embed_media(images), atol=2e-2)
    np.testing.assert_allclose(half.embed_texts(["a dog"]), tiny_scorer.embed_texts(["a dog"]), atol=2e-2)
    footprint = half.footprint()
    assert footprint == footprint_from_open_clip_config(TINY_ARCHITECTURE, footprint.weight_bytes, element_bytes=2)
    assert footprint.weight_bytes < tiny_scorer.footprint().weight_bytes
