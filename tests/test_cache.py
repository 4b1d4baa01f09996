import numpy as np

from mils_pipeline.score.cache import CachedTextEncoder, EmbeddingStore, TextEmbeddingCache


class CountingScorer:
    """The real tiny scorer, with every text that reaches its text tower recorded."""

    def __init__(self, scorer):
        self._scorer = scorer
        self.identity = scorer.identity
        self.modality = scorer.modality
        self.random_weights = scorer.random_weights
        self.text_context = scorer.text_context
        self.truncated = scorer.truncated
        self.text_calls: list[list[str]] = []

    def embed_texts(self, texts):
        self.text_calls.append(list(texts))
        return self._scorer.embed_texts(texts)

    def embed_media(self, media):
        return self._scorer.embed_media(media)

    @property
    def texts_seen(self) -> list[str]:
        return [t for call in self.text_calls for t in call]


def test_cache_is_bounded_in_bytes_and_evicts_least_recently_used():
    vector = np.zeros(100, dtype=np.float32)  # 400 bytes + overhead each
    cache = TextEmbeddingCache(max_bytes=3 * (400 + 170))
    for key in ("a", "b", "c"):
        cache.put(key, vector)
    assert cache.get("a") is not None  # "a" is now most recent
    cache.put("d", vector)
    assert cache.get("b") is None and cache.get("a") is not None
    assert cache.bytes <= cache.max_bytes and cache.evictions == 1


def test_demoted_entries_are_evicted_first():
    vector = np.zeros(100, dtype=np.float32)
    cache = TextEmbeddingCache(max_bytes=3 * (400 + 170))
    for key in ("a", "b", "c"):
        cache.put(key, vector)
    cache.demote(["c"])
    cache.put("d", vector)
    assert cache.get("c") is None and cache.get("a") is not None


def test_encoder_never_encodes_a_text_twice(tiny_scorer):
    counting = CountingScorer(tiny_scorer)
    encoder = CachedTextEncoder(counting, max_bytes=1 << 20, batch_size=8)
    first = encoder.encode(["A dog on a beach", "a cat", "A dog on a beach."])
    second = encoder.encode(["a dog on a beach", "A CAT", "a horse"])
    seen = counting.texts_seen
    assert len(seen) == len(set(seen)) == 3
    np.testing.assert_allclose(first[0], second[0])
    np.testing.assert_allclose(first[0], first[2])
    assert encoder.stats.encoded == 3 and encoder.stats.requested == 6


def test_pinned_seed_texts_are_never_encoded(tiny_scorer):
    counting = CountingScorer(tiny_scorer)
    encoder = CachedTextEncoder(counting, max_bytes=1 << 20, batch_size=8)
    pool = tiny_scorer.embed_texts(["a dog", "a cat"]).astype(np.float16)
    encoder.pin(["a dog", "a cat"], pool)
    encoder.encode(["A dog", "a bird"])
    assert counting.texts_seen == ["a bird"]
    assert encoder.stats.pinned_hits == 1


def test_on_disk_store_serves_a_second_run(tmp_path, tiny_scorer):
    first = CountingScorer(tiny_scorer)
    store = EmbeddingStore(tmp_path / "cache")
    CachedTextEncoder(first, 1 << 20, 8, store).encode(["a red car", "a blue car"])
    store.close()
    second = CountingScorer(tiny_scorer)
    reopened = EmbeddingStore(tmp_path / "cache")
    encoder = CachedTextEncoder(second, 1 << 20, 8, reopened)
    vectors = encoder.encode(["a red car", "a green car"])
    assert second.texts_seen == ["a green car"]
    assert encoder.stats.store_hits == 1
    np.testing.assert_allclose(vectors[0], tiny_scorer.embed_texts(["a red car"])[0], atol=1e-6)


def test_origin_mask_marks_only_the_first_fresh_encode_of_each_text(tiny_scorer):
    encoder = CachedTextEncoder(CountingScorer(tiny_scorer), max_bytes=1 << 20, batch_size=8)
    encoder.pin(["a dog"], tiny_scorer.embed_texts(["a dog"]).astype(np.float16))
    encoder.encode(["a horse"])
    _, fresh = encoder.encode_with_origin(["A cat", "a cat", "a dog", "a horse", "a bird"])
    assert fresh.tolist() == [True, False, False, False, True]
    assert int(fresh.sum()) == encoder.stats.encoded - 1  # "a horse" was encoded by the first call
