import pytest

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import SeedPoolError
from mils_pipeline.seeding import (
    THEMES,
    build_seed_pool,
    bundled_pools,
    generate_seed_texts,
    load_seed_pool,
    pool_embeddings,
    write_seed_pool,
)
from mils_pipeline.text import normalise_text, word_count
from tests.test_cache import CountingScorer


def test_generator_writes_distinct_short_theme_captions(smollm2):
    texts = generate_seed_texts(smollm2, THEMES["everyday-photos"], target_size=15, max_words=10, seed=1)
    assert len(texts) == 15
    assert len({normalise_text(t) for t in texts}) == 15
    assert all(1 <= word_count(t) <= 10 for t in texts)
    examples = {normalise_text(e) for e in THEMES["everyday-photos"].examples}
    assert not examples & {normalise_text(t) for t in texts}


def test_pool_file_is_named_by_its_content_and_deduplicated(tmp_path):
    pool = write_seed_pool(["A cat", "a dog", "A cat.", "  a dog "], tmp_path, {"theme": "t"})
    assert pool.texts == ["A cat", "a dog"]
    assert pool.path == tmp_path / f"{pool.id}.txt"
    again = write_seed_pool(["a dog", "A cat"], tmp_path / "other", {})
    assert again.id == pool.id


def test_pool_is_found_by_path_by_id_and_by_bundled_name(tmp_path):
    pool = write_seed_pool(["a red bus", "a blue boat"], tmp_path, {})
    assert load_seed_pool(str(pool.path)).id == pool.id
    assert load_seed_pool(pool.id, str(tmp_path)).texts == pool.texts
    assert "everyday-photos" in bundled_pools()
    assert load_seed_pool("everyday-photos").bundled


def test_unknown_pool_says_how_to_make_one(tmp_path):
    with pytest.raises(SeedPoolError, match="mils seed"):
        load_seed_pool("no-such-pool", str(tmp_path))


def test_pool_embeddings_are_computed_once_per_scorer_and_stored_beside_it(tmp_path, tiny_scorer):
    pool = write_seed_pool([f"a photo of thing number {i}" for i in range(50)], tmp_path, {})
    scorer = CountingScorer(tiny_scorer)
    first = pool_embeddings(pool, scorer, batch_size=16)
    assert len(scorer.texts_seen) == 50 and len(scorer.text_calls) == 4
    stored = list(tmp_path.glob(f"{pool.id}.*.npy"))
    assert len(stored) == 1
    second = pool_embeddings(pool, scorer, batch_size=16)
    assert len(scorer.texts_seen) == 50
    assert (first == second).all() and first.dtype.name == "float16"


def test_bundled_pool_embeddings_go_to_the_pool_directory(tmp_path, tiny_scorer):
    pool = load_seed_pool("everyday-photos")
    pool_embeddings(pool, tiny_scorer, batch_size=256, directory=str(tmp_path))
    assert list(tmp_path.glob(f"{pool.id}.*.npy"))


def test_themes_are_packaged_data_named_by_their_file():
    assert {"everyday-photos", "toy-scenes", "sounds", "video-scenes"} <= set(THEMES)
    for name, theme in THEMES.items():
        assert theme.name == name and theme.description
        assert theme.modality in {"image", "video", "audio"}
        assert len(theme.examples) >= 6 and all(isinstance(e, str) and e for e in theme.examples)


def test_sound_and_video_themes_follow_their_modality():
    assert THEMES["sounds"].modality == "audio" and THEMES["video-scenes"].modality == "video"
    with pytest.raises(SeedPoolError, match="modality=audio"):
        build_seed_pool(RunConfig(), "sounds", size=10)


def test_a_theme_name_finds_the_one_pool_written_for_that_theme(tmp_path):
    with pytest.raises(SeedPoolError, match="mils seed --theme sounds"):
        load_seed_pool("sounds", str(tmp_path))
    pool = write_seed_pool(["a bell rings", "rain on a roof"], tmp_path, {"theme": "sounds"})
    write_seed_pool(["a red bus"], tmp_path, {"theme": "everyday-photos"})
    assert load_seed_pool("sounds", str(tmp_path)).id == pool.id
    write_seed_pool(["a dog barks"], tmp_path, {"theme": "sounds"})
    with pytest.raises(SeedPoolError, match="several seed pools"):
        load_seed_pool("sounds", str(tmp_path))
