"""The MILS loop with the real SmolLM2 generator and a real (tiny) open_clip scorer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from mils_pipeline.config import RunConfig
from mils_pipeline.optimize import (
    STOP_BUDGET,
    STOP_CONVERGED,
    STOP_MAX_ROUNDS,
    ItemInput,
    MilsOptimizer,
    Rejection,
)
from mils_pipeline.score.cache import CachedTextEncoder
from mils_pipeline.seeding import load_seed_pool, pool_embeddings
from tests.conftest import run_settings
from tests.test_cache import CountingScorer


class CountingGenerator:
    """The real generator, with the prompts of every generate call recorded."""

    def __init__(self, generator):
        self._generator = generator
        self.identity = generator.identity
        self.calls: list[list] = []

    def generate(self, prompts, params, seeds):
        self.calls.append(list(prompts))
        return self._generator.generate(prompts, params, seeds)

    def close(self):
        pass


def make_items(photos, count: int) -> list[ItemInput]:
    import io

    names = sorted(photos)
    items = []
    for i in range(count):
        image = Image.open(io.BytesIO(photos[names[i % len(names)]])).convert("RGB")
        items.append(ItemInput(key=f"item{i:03d}", media=image.rotate(7 * i)))
    return items


def build(smollm2, tiny_scorer, pool_dir, **optimize):
    config = RunConfig.model_validate(run_settings(pool_dir, **optimize))
    generator = CountingGenerator(smollm2)
    scorer = CountingScorer(tiny_scorer)
    pool = load_seed_pool(config.seed_pool.pool, config.seed_pool.dir)
    embeddings = pool_embeddings(pool, scorer, 64, config.seed_pool.dir)
    encoder = CachedTextEncoder(scorer, 1 << 24, 64)
    return MilsOptimizer(generator, encoder, pool, embeddings, config), generator, scorer


def test_loop_invariants_hold_for_every_item(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, _, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=3, top_k=5)
    results = list(optimizer.run(make_items(photos, 4)))
    assert sorted(r.key for r in results) == ["item000", "item001", "item002", "item003"]
    for result in results:
        assert len(result.candidates) == 5
        scores = [c.score for c in result.candidates]
        assert scores == sorted(scores, reverse=True)
        bests = [r.best_score for r in result.trajectory]
        assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bests)), bests
        assert [r.round for r in result.trajectory] == list(range(result.rounds + 1))
        assert result.stop_reason == STOP_MAX_ROUNDS and result.rounds == 3
        assert len({c.text.casefold() for c in result.candidates}) == 5
        assert result.completion_tokens > 0


def test_each_round_is_one_generate_call_with_every_active_prompt(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, generator, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=2, max_active_items=8)
    list(optimizer.run(make_items(photos, 5)))
    assert [len(call) for call in generator.calls] == [5, 5]


def test_two_llm_operators_take_turns_rewrite_then_edit_the_best_caption(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, generator, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=3, operators=["rewrite", "edit"])
    results = list(optimizer.run(make_items(photos, 3)))
    assert [len(call) for call in generator.calls] == [3, 3, 3]
    first, second, third = generator.calls
    assert all(p.endswith("New captions:\n1.") for p in first + third)
    for prompt in second:
        assert prompt.endswith("\n2.") and "Variations of the best caption" in prompt
        lines = prompt.splitlines()
        scored = lines[lines.index("Captions, best last:") + 1 :]
        block = scored[: scored.index("")]
        best_text = block[-1].split(": ", 1)[1]  # best last
        assert lines[-2] == f"1. {best_text}"  # the list the model continues starts with the best
    for result in results:
        bests = [r.best_score for r in result.trajectory]
        assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bests)), bests
        assert result.rounds == 3 and result.caption not in {"", None}


def test_a_round_with_items_at_different_rounds_makes_one_call_per_prompt_kind(smollm2, tiny_scorer, pool_dir, photos):
    # continuous batching: an item that joined late is a round behind the others
    optimizer, generator, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=3, operators=["rewrite", "edit"])
    states, failures = optimizer._start(make_items(photos, 3))
    assert not failures
    states[0].round = states[0].llm_rounds = 1  # its next LLM turn is an edit; the others start with a rewrite
    optimizer._round(states)
    assert len(generator.calls) == 2
    kinds = sorted(
        ("edit" if p.endswith("\n2.") else "rewrite", len(call)) for call in generator.calls for p in call[:1]
    )
    assert kinds == [("edit", 1), ("rewrite", 2)]
    assert [s.round for s in states] == [2, 1, 1]


def test_finished_items_leave_and_waiting_items_join(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, generator, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=2, max_active_items=2)
    results = list(optimizer.run(make_items(photos, 5)))
    assert len(results) == 5
    assert all(len(call) <= 2 for call in generator.calls)
    # 5 items x 2 rounds = 10 prompts; the batch refills as soon as items leave, so every call
    # but the last item's two is full
    assert [len(call) for call in generator.calls] == [2, 2, 2, 2, 1, 1]


def test_encoder_sees_each_text_once_and_the_seed_pool_once(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, generator, scorer = build(smollm2, tiny_scorer, pool_dir, max_rounds=2)
    pool_size = len(optimizer.pool.texts)
    pool_calls = len(scorer.text_calls)  # embedding the pool happened in build()
    assert sum(len(c) for c in scorer.text_calls) == pool_size
    list(optimizer.run(make_items(photos, 6)))
    loop_texts = [t for call in scorer.text_calls[pool_calls:] for t in call]
    print(
        f"encoder calls in the loop: {len(scorer.text_calls) - pool_calls}, texts encoded: {len(loop_texts)}, "
        f"texts requested: {optimizer.encoder.stats.requested}, pool texts: {pool_size}"
    )
    assert len(loop_texts) == len(set(loop_texts))
    assert not set(loop_texts) & set(optimizer.pool.keys)
    # one encode call per round at most (all items' new texts together)
    assert len(scorer.text_calls) - pool_calls <= len(generator.calls)
    # the pool's stored embeddings are reused: a second optimizer does not re-embed it
    before = len(scorer.text_calls)
    pool_embeddings(optimizer.pool, scorer, 64, optimizer.config.seed_pool.dir)
    assert len(scorer.text_calls) == before


def test_per_item_cost_adds_up_to_the_run_counters(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, _, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=2)
    results = list(optimizer.run(make_items(photos, 3)))
    stats, encoder = optimizer.stats, optimizer.encoder.stats
    assert sum(r.prompt_tokens for r in results) == stats.prompt_tokens
    assert sum(r.completion_tokens for r in results) == stats.completion_tokens
    assert sum(r.texts_encoded for r in results) == encoder.encoded
    assert sum(r.texts_scored for r in results) == encoder.requested
    assert sum(r.media_encoded for r in results) == stats.media_encoded == 3
    # what was not encoded came from the pinned seed pool or the cache (or repeated a text of the same call)
    assert sum(r.texts_cached for r in results) >= encoder.pinned_hits + encoder.memory_hits
    assert all(0 <= r.texts_encoded <= r.texts_scored for r in results)


def test_converged_stop_when_gain_is_below_epsilon(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, _, _ = build(
        smollm2, tiny_scorer, pool_dir, max_rounds=10, convergence_epsilon=10.0, convergence_patience=1
    )
    results = list(optimizer.run(make_items(photos, 2)))
    assert {r.stop_reason for r in results} == {STOP_CONVERGED}
    assert all(r.rounds == 1 for r in results)


def test_budget_stop_when_completion_tokens_are_spent(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, _, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=10, max_tokens_per_item=1)
    results = list(optimizer.run(make_items(photos, 2)))
    assert {r.stop_reason for r in results} == {STOP_BUDGET}
    assert all(r.rounds == 1 for r in results)


def test_zero_rounds_returns_the_seed_top_k(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, generator, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=0, top_k=3, max_active_items=2)
    results = list(optimizer.run(make_items(photos, 5)))
    assert len(results) == 5
    assert generator.calls == []
    assert all(r.rounds == 0 and r.stop_reason == STOP_MAX_ROUNDS for r in results)
    assert all({c.round for c in r.candidates} == {0} and len(r.candidates) == 3 for r in results)


def test_same_seed_same_results_regardless_of_batching(smollm2, tiny_scorer, pool_dir, photos):
    first, _, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=2, max_active_items=4)
    second, _, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=2, max_active_items=1)
    a = {r.key: r.candidates for r in first.run(make_items(photos, 3))}
    b = {r.key: r.candidates for r in second.run(make_items(photos, 3))}
    assert a.keys() == b.keys()
    for key in a:
        assert [c.text for c in a[key]] == [c.text for c in b[key]]
        # media batches of 4 and of 1 take different BLAS paths: the same scores up to float noise
        assert np.allclose([c.score for c in a[key]], [c.score for c in b[key]], atol=1e-5)


@pytest.mark.parametrize("k", [1, 7])
def test_seed_scoring_by_chunks_matches_brute_force(k):
    from mils_pipeline.seeding import top_k_seeds

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((1000, 16)).astype(np.float16)
    media = rng.standard_normal((3, 16)).astype(np.float32)
    idx, scores = top_k_seeds(pool, media, k, chunk_rows=97)
    brute = media @ pool.astype(np.float32).T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, axis=1), rtol=1e-5)


def test_non_finite_scores_never_enter_the_top_k(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, _, scorer = build(smollm2, tiny_scorer, pool_dir, max_rounds=2)
    real_embed = scorer.embed_texts

    def broken(texts):
        vectors = real_embed(texts)
        vectors[::2] = np.nan  # every other new text scores NaN
        return vectors

    scorer.embed_texts = broken
    results = list(optimizer.run(make_items(photos, 2)))
    for result in results:
        assert all(np.isfinite(c.score) for c in result.candidates)
        assert all(np.isfinite(r.best_score) for r in result.trajectory)
    assert optimizer.stats.rejected.get("non_finite_score", 0) > 0


def test_rejections_pass_through_in_order_and_on_round_sees_every_round(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, _, _ = build(smollm2, tiny_scorer, pool_dir, max_rounds=2, max_active_items=2)
    items = make_items(photos, 2)
    rejection = Rejection("broken", "broken.jpg", "corrupt", "not an image")
    events = []
    out = list(optimizer.run([rejection, *items], on_round=events.append))
    assert out[0] is rejection
    assert sorted(r.key for r in out[1:]) == [i.key for i in items]
    assert sorted((e.key, e.round) for e in events) == sorted((i.key, r) for i in items for r in range(3))
    for result in out[1:]:
        assert [e.top for e in events if e.key == result.key][-1] == result.candidates


class GuardedCountingGenerator(CountingGenerator):
    """The real llama.cpp generator with its list guard: prompts, known sets and replies recorded."""

    guards_lists = True

    def __init__(self, generator):
        super().__init__(generator)
        self.known: list[list[set[str]]] = []
        self.replies: list = []

    def generate(self, prompts, params, seeds, known=None):
        self.calls.append(list(prompts))
        self.known.append([set(k) for k in known])
        replies = self._generator.generate(prompts, params, seeds, known=known)
        self.replies.extend(replies)
        return replies


def test_the_guarded_generator_gets_each_items_known_captions_and_counts_useful_tokens(
    smollm2, tiny_scorer, pool_dir, photos
):
    from mils_pipeline.generate.parsing import parse_candidates
    from mils_pipeline.text import normalise_text

    config = RunConfig.model_validate(run_settings(pool_dir, max_rounds=2, top_k=5, new_per_round=4))
    generator = GuardedCountingGenerator(smollm2)
    pool = load_seed_pool(config.seed_pool.pool, config.seed_pool.dir)
    embeddings = pool_embeddings(pool, tiny_scorer, 64, config.seed_pool.dir)
    optimizer = MilsOptimizer(generator, CachedTextEncoder(tiny_scorer, 1 << 24, 64), pool, embeddings, config)
    results = list(optimizer.run(make_items(photos, 3)))
    assert len(results) == 3 and generator.calls
    for prompts, known in zip(generator.calls, generator.known, strict=True):
        for prompt, texts in zip(prompts, known, strict=True):
            listed = prompt.split("Captions, best last:\n", 1)[1].split("\n\n", 1)[0]
            shown = [line.split(": ", 1)[1] for line in listed.splitlines()]
            assert len(shown) == 3  # the default prompt_top_k of 3, of K = 5
            assert {normalise_text(t) for t in shown} <= texts  # what it was shown, it may not write again
    # a reply ends at N = 4 new captions or at its first line without one (reply_patience 1)
    for reply in generator.replies:
        assert len(parse_candidates(reply.text, config.optimize.max_caption_words).candidates) <= 4 + 1
    assert optimizer.stats.useful_completion_tokens == sum(r.useful_tokens for r in generator.replies)
    assert 0 <= optimizer.stats.useful_completion_tokens <= optimizer.stats.completion_tokens


def test_candidates_longer_than_the_scorers_context_are_flagged_and_counted_per_round(pool_dir, photos):
    from open_clip.tokenizer import SimpleTokenizer

    from mils_pipeline.config import ScorerConfig
    from mils_pipeline.generate import UnusedGenerator
    from mils_pipeline.score import build_scorer
    from tests.conftest import TINY_ARCHITECTURE, tiny_scorer_settings

    # a text tower that reads 8 tokens (6 words' worth) scoring captions of up to 12 words
    short = {**TINY_ARCHITECTURE, "text_cfg": {**TINY_ARCHITECTURE["text_cfg"], "context_length": 8}}
    scorer_config = ScorerConfig(**tiny_scorer_settings(model="mils-test-context-8", architecture=short))
    scorer = build_scorer(scorer_config, "image")
    settings = run_settings(pool_dir, operators=["crossover", "mutate"], word_proposals=16, max_caption_words=12)
    config = RunConfig.model_validate(settings)
    pool = load_seed_pool(config.seed_pool.pool, config.seed_pool.dir)
    generator = UnusedGenerator(config.generator, "word operators only")
    encoder = CachedTextEncoder(scorer, 1 << 24, 64)
    optimizer = MilsOptimizer(generator, encoder, pool, pool_embeddings(pool, scorer, 64), config)
    results = list(optimizer.run(make_items(photos, 3)))

    def longer(text: str) -> bool:
        return len(SimpleTokenizer().encode(text)) + 2 > 8

    kept = [c for r in results for c in r.candidates]
    assert [c.truncated for c in kept] == [longer(c.text) for c in kept]
    for result in results:
        assert all(0 <= r.truncated <= r.new_candidates for r in result.trajectory)
    stats = optimizer.stats
    assert stats.texts_truncated == sum(r.truncated for res in results for r in res.trajectory[1:]) > 0
    assert stats.captions_truncated == sum(r.candidates[0].truncated for r in results)


def test_the_card_warns_when_many_captions_were_scored_on_their_first_tokens():
    from mils_pipeline.run.card import render_card

    def card(texts_truncated: int, captions_truncated: int) -> str:
        loop = {"proposals": {"crossover": 100}, "texts_truncated": texts_truncated}
        manifest = {"rows": 20, "cost": {"loop": {**loop, "captions_truncated": captions_truncated}}}
        return render_card(RunConfig(), [manifest], np.zeros(0))

    assert "text context" not in card(texts_truncated=2, captions_truncated=0)
    warned = card(texts_truncated=2, captions_truncated=5)
    assert "**Warning:** 25% of the captions and 2% of the new candidates were longer than the scorer's" in warned
    assert "text context" in card(texts_truncated=30, captions_truncated=0)
