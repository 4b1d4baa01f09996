"""Proposal operators, the per-item bandit over them, and their cost in one unit."""

from __future__ import annotations

import pytest

from mils_pipeline.costs import cost_model
from mils_pipeline.operators import Allocator, ItemContexts, RunPrior, WordContexts, crossovers, mutations, words
from tests.test_optimize import build, make_items

POOL = [
    "a red circle on the left",
    "a blue square on the right",
    "a small red circle at the top",
    "a large blue triangle on the left",
]


def test_mutations_replace_one_word_where_every_new_three_word_run_was_seen():
    variants = mutations("a red circle on the left", WordContexts(POOL), max_words=10)
    assert "a red circle on the right" in variants  # "on the right" and "the right </s>" were seen
    assert "a red circle on the top" not in variants  # "right"/"top" both end a caption, "on the top" never seen
    assert "a red circle at the left" not in variants  # "at" fits between "circle" and "the", "at the left" never seen
    assert "a blue circle on the left" not in variants  # "blue" was never seen between "a" and "circle"
    assert "a red circle on the left" not in variants
    assert all(len(v.split()) == 6 for v in variants)  # replacements only: no word inserted or deleted


def test_mutations_never_invent_a_word_the_pool_and_candidates_lack():
    contexts = ItemContexts(WordContexts(POOL))
    vocabulary = {w for t in POOL for w in words(t)}
    assert all(set(words(v)) <= vocabulary for v in mutations("a red circle on the left", contexts, 10))
    contexts.add(["a red hexagon on the left"])  # an item's own candidate brings its words
    assert "a red hexagon on the left" in mutations("a red circle on the left", contexts, 10)


KINDS_POOL = [
    "a red circle on the left",
    "a blue circle on the left",
    "a red square on the right",
    "a blue square at the top",
    "a green circle at the top",
    "a red circle on a black background",
    "a green square on a black background",
    "a blue square on a black square",  # one line where "background"'s context holds a shape
]


def test_interchangeable_words_share_their_neighbour_pairs_across_the_pool():
    contexts = WordContexts(KINDS_POOL)
    assert contexts.similarity("red", "blue") == contexts.similarity("blue", "red")
    assert contexts.similarity("red", "blue") > 0.3  # colours share "a _ circle", "a _ square"
    assert contexts.similarity("circle", "square") > 0.3
    assert contexts.similarity("square", "background") < 0.3  # they share one pair of neighbours only
    assert contexts.similarity("red", "zorblat") == 0.0


def test_mutations_with_a_similarity_bar_swap_a_word_for_one_of_its_kind_only():
    text = "a green circle on a black background"
    loose = mutations(text, WordContexts(KINDS_POOL), max_words=10)
    assert "a green circle on a black square" in loose  # every three-word run was seen
    strict = mutations(text, WordContexts(KINDS_POOL), max_words=10, similarity=0.3)
    assert "a green circle on a black square" not in strict  # a background traded for an extra object
    assert "a red circle on a black background" in strict and "a green square on a black background" in strict
    assert set(strict) <= set(loose)
    contexts = ItemContexts(WordContexts(KINDS_POOL))  # the LLM's texts count as the pool's
    contexts.add(["a red triangle on the left", "a blue triangle on the left", "a green triangle at the top"])
    assert contexts.similarity("triangle", "circle") > 0.3
    assert "a green triangle on a black background" not in mutations(text, contexts, 10, similarity=0.3)
    contexts.add(["a green triangle on a white background"])  # now "green triangle on a" was seen too
    assert "a green triangle on a black background" in mutations(text, contexts, 10, similarity=0.3)


def test_crossovers_splice_at_a_shared_word_and_never_grow_past_the_longer_parent():
    children = crossovers("a red circle on the left", "a large blue triangle at the top", max_words=30)
    assert "a red circle on the top" in children  # spliced at "the"
    assert "a red circle at the top" not in children  # "on" / "at": no shared word there
    children = crossovers("a red circle on the left", "a blue square on the right", max_words=30)
    assert "a red circle on the right" in children and "a blue square on the left" in children
    assert all(len(c.split()) <= 6 for c in children)


def test_two_point_crossover_puts_a_phrase_of_one_caption_into_the_other():
    children = crossovers("a red circle on the left", "a red circle and a blue square on the right", max_words=30)
    assert "a red circle and a blue square on the left" in children  # "circle ... on" from the second
    assert all(len(c.split()) <= 10 for c in children)


def test_the_llm_runs_while_untried_then_only_while_it_pays_as_much_per_gpu_second():
    allocator = Allocator(["rewrite", "mutate", "crossover"], word_budget=20)
    first = allocator.plan(llm_rounds=0)
    assert first.llm == "rewrite" and sum(first.words.values()) == 20
    allocator.record("rewrite", cost=0.05, gain=0.0)
    allocator.record("mutate", cost=0.001, gain=0.01)
    allocator.record("crossover", cost=0.001, gain=0.0)
    allocator.end_round()
    second = allocator.plan(llm_rounds=1)
    assert second.llm is None  # the LLM bought nothing; the words did
    assert second.words["mutate"] > second.words["crossover"] >= 2  # the floor keeps crossover in sight
    assert sum(second.words.values()) == 20


def test_a_later_item_starts_from_what_the_operators_bought_for_the_runs_earlier_items():
    run = RunPrior()
    first = Allocator(["rewrite", "crossover"], word_budget=20, prior=run)
    assert first.plan(llm_rounds=0).llm == "rewrite"  # nothing known yet: the LLM is tried
    first.record("rewrite", cost=0.05, gain=0.001)
    first.record("crossover", cost=0.001, gain=0.02)
    first.end_round()
    assert run.arms["rewrite"].rounds == 1 and run.arms["crossover"].gain == pytest.approx(0.02)
    later = Allocator(["rewrite", "crossover"], word_budget=20, prior=run)
    assert later.plan(llm_rounds=0).llm is None  # the LLM paid 500 times less per GPU-second on the first item
    alone = Allocator(["rewrite", "crossover"], word_budget=20)
    assert alone.plan(llm_rounds=0).llm == "rewrite"  # without the run's record every item tries it
    # where the LLM paid as much on earlier items, later ones still send it
    paid = RunPrior()
    paid.record("rewrite", cost=0.05, gain=1.0)
    paid.record("crossover", cost=0.001, gain=0.01)
    assert Allocator(["rewrite", "crossover"], word_budget=20, prior=paid).plan(llm_rounds=0).llm == "rewrite"


def test_with_llm_operators_only_they_take_turns_every_round():
    allocator = Allocator(["rewrite", "edit"], word_budget=64)
    plans = []
    for turn in range(4):
        plan = allocator.plan(llm_rounds=turn)
        plans.append(plan.llm)
        assert plan.words == {}
        allocator.record(plan.llm, cost=0.05, gain=0.0)
        allocator.end_round()
    assert plans == ["rewrite", "edit", "rewrite", "edit"]


def test_unknown_operator_is_refused():
    with pytest.raises(ValueError, match="unknown operators"):
        Allocator(["rewrite", "paraphrase"], 8)


def test_word_operators_alone_cost_only_encodes_and_every_candidate_names_its_operator(
    smollm2, tiny_scorer, pool_dir, photos
):
    optimizer, generator, _ = build(
        smollm2, tiny_scorer, pool_dir, max_rounds=3, operators=["mutate", "crossover"], word_proposals=16
    )
    results = list(optimizer.run(make_items(photos, 3)))
    assert generator.calls == []  # no LLM tokens
    prices = cost_model("image")
    for result in results:
        assert result.completion_tokens == 0
        assert {c.operator for c in result.candidates} <= {"seed", "mutate", "crossover"}
        assert result.gpu_seconds == pytest.approx(sum(r.gpu_seconds for r in result.trajectory), abs=1e-5)
        assert result.gpu_seconds == pytest.approx(
            prices.gpu_seconds(text_encodes=result.texts_encoded, media_encodes=1), rel=1e-3
        )
    assert optimizer.stats.proposals.get("mutate", 0) > 0
    assert sum(optimizer.stats.proposals.values()) == sum(r.texts_scored for r in results)


def test_an_item_stops_when_rounds_stop_paying(smollm2, tiny_scorer, pool_dir, photos):
    optimizer, _, _ = build(
        smollm2,
        tiny_scorer,
        pool_dir,
        max_rounds=20,
        operators=["mutate"],
        word_proposals=4,
        convergence_epsilon=1.0,  # no round can gain a whole unit of cosine similarity
        convergence_patience=1,
    )
    results = list(optimizer.run(make_items(photos, 2)))
    assert all(r.stop_reason == "converged" and r.rounds == 1 for r in results)


def test_word_steps_climb_from_the_improved_captions_inside_one_round(smollm2, tiny_scorer, pool_dir, photos):
    from mils_pipeline.seeding import load_seed_pool

    kwargs = {"max_rounds": 1, "operators": ["mutate"], "word_proposals": 12, "mutate_similarity": 0.0}
    one_step, _, _ = build(smollm2, tiny_scorer, pool_dir, word_steps=1, **kwargs)
    three_steps, _, counting = build(smollm2, tiny_scorer, pool_dir, word_steps=3, **kwargs)
    seeds: dict[str, list[str]] = {}

    def watch(event):
        if event.round == 0:
            seeds[event.key] = [c.text for c in event.top]

    [single] = list(one_step.run(make_items(photos, 1)))
    before = len(counting.text_calls)
    [climbed] = list(three_steps.run(make_items(photos, 1), on_round=watch))
    proposed = [t for call in counting.text_calls[before:] for t in call]
    assert single.texts_scored == 12 and climbed.texts_scored > 24  # later steps propose again
    assert climbed.score >= single.score
    assert len(climbed.trajectory) == 2  # the steps live inside one round
    assert len(counting.text_calls) - before == 3  # one encode call per step
    # later steps start from the step before: some proposals are two edits from every seed
    pool = load_seed_pool(three_steps.config.seed_pool.pool, three_steps.config.seed_pool.dir)
    one_edit = {v for seed in seeds["item000"] for v in mutations(seed, WordContexts(pool.texts), 30)}
    assert set(proposed[:12]) <= one_edit  # the first step edits the seeds
    assert any(text not in one_edit for text in proposed[12:]), proposed


def test_word_parents_wider_than_k_feed_crossover_while_the_output_keeps_k(smollm2, tiny_scorer, pool_dir, photos):
    kwargs = {"max_rounds": 1, "operators": ["crossover"], "word_proposals": 2000, "word_steps": 1, "top_k": 3}
    narrow, _, narrow_counts = build(smollm2, tiny_scorer, pool_dir, word_parents=3, **kwargs)
    wide, _, wide_counts = build(smollm2, tiny_scorer, pool_dir, word_parents=8, **kwargs)
    events = []
    runs = []
    for optimizer, counts in ((narrow, narrow_counts), (wide, wide_counts)):
        before = len(counts.text_calls)
        [result] = list(optimizer.run(make_items(photos, 1), on_round=events.append))
        runs.append((result, {t for call in counts.text_calls[before:] for t in call}))
    (a, narrow_children), (b, wide_children) = runs
    assert len(a.candidates) == len(b.candidates) == 3  # the output keeps K
    assert all(len(e.top) == 3 for e in events)  # so does what a watcher sees
    assert [r.mean_top_k for r in a.trajectory[:1]] == [r.mean_top_k for r in b.trajectory[:1]]  # K seeds
    # the 3 best seeds' pairs are among the 8 best seeds' pairs: the wide population proposes every
    # child the narrow one does (the budget does not bind here), and children of lower-ranked parents
    assert b.texts_scored < 2000
    assert narrow_children < wide_children
    assert b.score >= a.score
