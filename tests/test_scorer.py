import numpy as np
import pytest
import torch
from PIL import Image

from mils_pipeline.config import ScorerConfig
from mils_pipeline.errors import ConfigError, ModelUnavailableError
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


def _normalize_of(scorer):
    from torchvision.transforms import Normalize, Resize

    steps = scorer._preprocess.transforms
    [normalize] = [t for t in steps if isinstance(t, Normalize)]
    resizes = [t for t in steps if isinstance(t, Resize)]
    return tuple(round(v, 4) for v in normalize.mean), tuple(round(v, 4) for v in normalize.std), resizes


def test_a_siglip_checkpoint_file_is_preprocessed_as_siglip_not_as_openai_clip(tmp_path):
    from mils_pipeline.score.open_clip_image import resolve_preprocess

    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"weights")  # never loaded here: the preprocessing is decided before the model
    # the documented configuration: model and checkpoint, the tag left at its default
    siglip, source = resolve_preprocess(ScorerConfig(model="ViT-SO400M-14-SigLIP", checkpoint=str(weights)))
    assert siglip["mean"] == siglip["std"] == [0.5, 0.5, 0.5] and siglip["resize_mode"] == "squash"
    assert source == "pretrained tag webli"
    # ViT-L-14's tags disagree (laion2b_s32b_b82k normalises with 0.5): a bare checkpoint must say which
    with pytest.raises(ConfigError, match=r"scorer\.pretrained to its tag, or scorer\.preprocess"):
        resolve_preprocess(ScorerConfig(model="ViT-L-14", checkpoint=str(weights)))
    tagged = ScorerConfig(model="ViT-L-14", checkpoint=str(weights), pretrained="laion2b_s32b_b82k")
    laion, _ = resolve_preprocess(tagged)
    assert laion["mean"] == [0.5, 0.5, 0.5]
    openai, _ = resolve_preprocess(ScorerConfig(model="ViT-L-14", checkpoint=str(weights), pretrained="openai"))
    assert openai["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    with pytest.raises(ConfigError, match="not a tag of 'ViT-L-14'"):
        resolve_preprocess(ScorerConfig(model="ViT-L-14", checkpoint=str(weights), pretrained="webli"))
    # ViT-B-32's tags all agree: no tag needed
    agreed, source = resolve_preprocess(ScorerConfig(model="ViT-B-32", checkpoint=str(weights)))
    assert agreed["resize_mode"] == "shortest" and source == "every pretrained tag of ViT-B-32"


def test_a_hub_layout_directory_loads_offline_with_its_own_preprocessing(tmp_path, tiny_scorer):
    import json

    from safetensors.torch import save_file

    directory = tmp_path / "tiny-hub-copy"
    directory.mkdir()
    state = {k: v.contiguous() for k, v in tiny_scorer._model.state_dict().items()}
    save_file(state, directory / "open_clip_model.safetensors")
    wanted = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bilinear", "resize_mode": "squash"}
    hub_config = {"model_cfg": TINY_ARCHITECTURE, "preprocess_cfg": wanted}
    (directory / "open_clip_config.json").write_text(json.dumps(hub_config))
    loaded = build_scorer(ScorerConfig(**tiny_scorer_settings(init_seed=5, checkpoint=str(directory))), "image")
    mean, std, resizes = _normalize_of(loaded)
    assert (mean, std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert [tuple(r.size) if isinstance(r.size, list | tuple) else r.size for r in resizes] == [(32, 32)]  # squash
    recorded = loaded.identity.parameters["preprocess"]
    assert recorded["source"].endswith("open_clip_config.json") and recorded["mean"] == wanted["mean"]
    from mils_pipeline.run.card import _preprocess_lines

    [line] = _preprocess_lines(loaded.identity.as_row())  # the dataset card says it too
    assert "mean [0.1, 0.2, 0.3]" in line and "resize_mode squash" in line and "open_clip_config.json" in line
    np.testing.assert_allclose(loaded.embed_texts(["a dog"]), tiny_scorer.embed_texts(["a dog"]), atol=1e-6)
    # an explicit scorer.preprocess wins over the directory's
    explicit = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "shortest"}
    settings = tiny_scorer_settings(checkpoint=str(directory), preprocess=explicit)
    assert _normalize_of(build_scorer(ScorerConfig(**settings), "image"))[:2] == ((0.5,) * 3, (0.5,) * 3)


def test_open_clip_scorer_flags_texts_longer_than_its_text_context():
    from open_clip.tokenizer import SimpleTokenizer

    from mils_pipeline.score.context import configured_text_context

    short = {**TINY_ARCHITECTURE, "text_cfg": {**TINY_ARCHITECTURE["text_cfg"], "context_length": 8}}
    config = ScorerConfig(**tiny_scorer_settings(model="mils-test-context-8", architecture=short))
    scorer = build_scorer(config, "image")
    assert scorer.text_context == 8 == configured_text_context(config)
    texts = ["a dog", "a dog on a red sofa", "a dog on a red sofa by the window", "", "one two three four five six"]
    lengths = [len(SimpleTokenizer().encode(t)) + 2 for t in texts]  # with the start and end tokens
    assert scorer.truncated(texts).tolist() == [n > 8 for n in lengths]
    assert any(n > 8 for n in lengths) and any(n <= 8 for n in lengths)
    assert lengths[-1] == 8 and not scorer.truncated(texts[-1:])[0]  # exactly the context: read whole
    # a prefix that fills the context embeds like the text it was cut from
    cut_a, cut_b = scorer.embed_texts(["one two three four five six seven", "one two three four five six eight"])
    assert np.allclose(cut_a, cut_b)
