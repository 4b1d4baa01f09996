"""Batched llama.cpp decoding (mils_pipeline/generate/llamacpp_batch.py) with the real SmolLM2."""

from __future__ import annotations

import pytest

from mils_pipeline.config import LlamaCppGeneratorConfig
from mils_pipeline.errors import GenerationError
from mils_pipeline.generate import build_generator
from mils_pipeline.generate.base import SamplingParams
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
