import numpy as np
import pytest
import torch
from PIL import Image

from mils_pipeline.config import ScorerConfig
from mils_pipeline.errors import ModelUnavailableError
from mils_pipeline.score import build_scorer
from tests.conftest import tiny_scorer_settings


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
