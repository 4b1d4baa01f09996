"""Batched llama.cpp decoding (mils_pipeline/generate/llamacpp_batch.py) with the real SmolLM2."""

from __future__ import annotations

import pytest

from mils_pipeline.config import LlamaCppGeneratorConfig
from mils_pipeline.errors import GenerationError
from mils_pipeline.generate import build_generator
from mils_pipeline.generate.base import CandidateList, SamplingParams
from mils_pipeline.generate.parsing import parse_candidates
from mils_pipeline.text import normalise_text
from tests.conftest import LLAMA_THREADS

CAPTIONS = "Short captions of pictures of coloured shapes:\n1. a red circle on the left\n2."
FRUITS = "A list of fruits:\n1. apple\n2. pear\n3."
NUMBERS = "Counting in words:\n1. one\n2. two\n3."
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, stop=("\n\n",))


@pytest.fixture(scope="module")
def batched():
    generator = build_generator(LlamaCppGeneratorConfig(threads=LLAMA_THREADS, batch_size=3))
    yield generator
    generator.close()


def test_a_request_gets_the_same_completion_whatever_else_shares_its_batch(batched):
    alone = batched.generate([CAPTIONS, FRUITS], SAMPLED, [7, 8])
    # five prompts through three slots: later ones join as earlier ones finish
    crowded = batched.generate([NUMBERS, CAPTIONS, FRUITS, NUMBERS, CAPTIONS], SAMPLED, [3, 7, 8, 4, 7])
    assert crowded[1].text == alone[0].text == crowded[4].text
    assert crowded[2].text == alone[1].text
    other_seeds = batched.generate([CAPTIONS, CAPTIONS], SAMPLED, [7, 11])
    assert other_seeds[0].text == alone[0].text and other_seeds[1].text != alone[0].text
    assert all(c.completion_tokens > 0 and c.prompt_tokens > 10 for c in crowded)


def test_batch_sizes_one_and_sixteen_write_the_same_sampled_replies():
    prompts, seeds = [CAPTIONS, FRUITS, CAPTIONS, NUMBERS], [7, 8, 9, 10]
    replies = {}
    for size in (1, 16):
        generator = build_generator(LlamaCppGeneratorConfig(threads=LLAMA_THREADS, batch_size=size))
        try:
            replies[size] = [(c.text, c.completion_tokens) for c in generator.generate(prompts, SAMPLED, seeds)]
        finally:
            generator.close()
    assert replies[1] == replies[16]
    assert replies[1][0] != replies[1][2]  # the same prompt, another seed


def test_greedy_batched_decoding_writes_what_llama_cpp_python_writes(batched, smollm2):
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=20)
    together = batched.generate([CAPTIONS, FRUITS, NUMBERS], greedy, [1, 2, 3])
    # create_completion, one prompt at a time
    one_by_one = [smollm2._one(p, greedy, s) for p, s in ((CAPTIONS, 1), (FRUITS, 2), (NUMBERS, 3))]
    assert [c.text for c in together] == [c.text for c in one_by_one]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in one_by_one]


def test_token_cap_and_stop_strings_end_a_sequence_as_create_completion_does(batched):
    capped = batched.generate([CAPTIONS, FRUITS], SamplingParams(0.8, 0.95, max_tokens=5), [1, 2])
    assert all(c.finish_reason == "length" and c.completion_tokens == 5 for c in capped)
    stopped = batched.generate([FRUITS, NUMBERS], SamplingParams(0.0, 1.0, max_tokens=40, stop=("\n",)), [1, 2])
    for completion in stopped:
        assert completion.finish_reason == "stop" and "\n" not in completion.text and completion.text.strip()


def test_a_prompt_longer_than_the_context_is_refused_with_the_setting_to_change():
    generator = build_generator(LlamaCppGeneratorConfig(threads=1, batch_size=2, context_length=256))
    try:
        with pytest.raises(GenerationError, match=r"generator\.context_length"):
            generator.generate([CAPTIONS * 20, FRUITS], SAMPLED, [1, 2])
    finally:
        generator.close()


# The list guard (known= with SamplingParams.candidate_list): greedy replies of the real SmolLM2.
COPYING = "Captions of one picture:\n1. a red circle\n2. a red circle\n3. a red circle\n4."
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=60)


def _guarded(n: int, patience: int = 0, refuse: bool = False) -> SamplingParams:
    shape = CandidateList(n, 12, patience=patience, refuse_known=refuse)
    return SamplingParams(temperature=0.0, top_p=1.0, max_tokens=60, candidate_list=shape)


def _lines(text: str) -> list[str]:
    return [normalise_text(c) for c in parse_candidates(text, 12).candidates]


def test_the_list_guard_stops_a_reply_once_it_holds_n_new_captions(batched):
    plain = batched.generate([CAPTIONS], GREEDY, [1])[0]
    assert len(_lines(plain.text)) > 2 and plain.useful_tokens is None  # unguarded: runs to the cap
    guarded = batched.generate([CAPTIONS], _guarded(2), [1], known=[set()])[0]
    assert plain.text.startswith(guarded.text)  # the same reply, cut after its second new caption
    assert len(_lines(guarded.text)) == 2 and guarded.finish_reason == "stop"
    assert guarded.completion_tokens < plain.completion_tokens
    assert 0 < guarded.useful_tokens <= guarded.completion_tokens


def test_patience_ends_a_reply_that_only_writes_known_captions(batched):
    plain = batched.generate([COPYING], GREEDY, [1])[0]
    assert _lines(plain.text)[0] == "a red circle"  # the model copies the line above it
    guarded = batched.generate([COPYING], _guarded(5, patience=1), [1], known=[{"a red circle"}])[0]
    assert _lines(guarded.text) == ["a red circle"] and guarded.useful_tokens == 0
    assert guarded.completion_tokens < plain.completion_tokens


def test_refused_repeats_no_line_ends_on_a_known_caption(batched):
    known = {"a red circle", "a blue circle on the right"}
    replies = batched.generate([COPYING, CAPTIONS], _guarded(5, refuse=True), [1, 2], known=[known, known])
    for reply in replies:
        lines = {normalise_text(t) for t in parse_candidates(reply.text, 100).candidates}  # every line
        assert lines and not lines & known, reply.text
    # the copy was begun and written on: "a red circle (...)", not a line of its own
    assert replies[0].text.startswith(" a red circle") and "a red circle" not in _lines(replies[0].text)


def test_guarded_replies_do_not_depend_on_the_batch_size():
    prompts, seeds = [CAPTIONS, COPYING, CAPTIONS, FRUITS], [7, 8, 9, 10]
    params = SamplingParams(0.8, 0.95, 40, candidate_list=CandidateList(3, 12, patience=1, refuse_known=True))
    known = [{"a red circle on the left"}, {"a red circle"}, set(), {"apple", "pear"}]
    replies = {}
    for size in (1, 16):
        generator = build_generator(LlamaCppGeneratorConfig(threads=LLAMA_THREADS, batch_size=size))
        try:
            out = generator.generate(prompts, params, seeds, known=known)
            replies[size] = [(c.text, c.completion_tokens, c.useful_tokens) for c in out]
        finally:
            generator.close()
    assert replies[1] == replies[16]


def test_a_shared_prefix_is_evaluated_once_and_changes_no_reply(batched):
    prefix = "Short captions of pictures of coloured shapes:\n"
    prompts = [CAPTIONS, CAPTIONS.replace("red circle", "blue square"), FRUITS]  # FRUITS lacks the prefix
    whole = batched.generate(prompts, GREEDY, [1, 2, 3])
    shared = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=60, shared_prefix=prefix)
    for _ in range(2):  # the prefix stream is kept for the next call
        out = batched.generate(prompts, shared, [1, 2, 3])
        assert [c.text for c in out] == [c.text for c in whole]
        assert [c.cached_prompt_tokens for c in out] == [0, 0, 0]  # one prompt does not start with it
        out = batched.generate(prompts[:2], shared, [1, 2])
        assert [c.text for c in out] == [c.text for c in whole[:2]]
        prefix_tokens = len(batched._decoder.tokenize(prefix))
        assert [c.cached_prompt_tokens for c in out] == [prefix_tokens] * 2 and prefix_tokens > 5
