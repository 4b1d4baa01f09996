"""`mils demo`: MILS on held-out toy-world scenes, judged against their exact references.

No pretrained CLIP weights can be had offline, so the demo works in the toy world
(mils_pipeline/toyworld): scenes of coloured shapes rendered on the fly, a small open_clip scorer
trained on such scenes by this project (bundled checkpoint), a seed pool written by SmolLM2 for
the theme, and SmolLM2-135M-Instruct through llama.cpp refining the captions. It prints, for a few
scenes, the reference next to the best seed and the final caption, then caption metrics
(pycocoevalcap), attribute accuracy and an independent audit scorer's opinion for both stages,
and writes the HTML report of the captions (``mils report``) beside them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mils_pipeline.config import config_from_dict

DEMO_SPLIT = "demo"


def demo_settings() -> dict[str, Any]:
    from mils_pipeline.toyworld.corpus import SCORER, SEED_POOL, scorer_settings

    return {
        "scorer": scorer_settings(SCORER),
        "seed_pool": {"pool": SEED_POOL},
        "generator": {"prompt_style": "completion"},
        "optimize": {
            "top_k": 8,
            "new_per_round": 8,
            "max_rounds": 3,
            "max_caption_words": 30,
            "max_active_items": 12,
        },
    }


def _best_seeds(config, scenes) -> dict[str, tuple[str, float]]:
    """Each scene's best seed-pool text under the run's scorer: what MILS starts from."""
    from mils_pipeline.score import build_scorer
    from mils_pipeline.seeding import load_seed_pool, pool_embeddings, top_k_seeds
    from mils_pipeline.toyworld.scenes import render

    pool = load_seed_pool(config.seed_pool.pool, config.seed_pool.dir)
    scorer = build_scorer(config.scorer, config.modality)
    embeddings = pool_embeddings(pool, scorer, config.scorer.text_batch_size, config.seed_pool.dir)
    index, score = top_k_seeds(embeddings, scorer.embed_media([render(s) for s in scenes]), 1)
    return {s.key: (pool.texts[i[0]], float(v[0])) for s, i, v in zip(scenes, index, score, strict=True)}


def improvement_line(
    scenes: list[Any], seeds: dict[str, str], finals: dict[str, str], per_item: dict[str, dict[str, list[float]]]
) -> str:
    """How many final captions beat their best seed, per scene: a caption is better when it gets
    more of the scene's attributes right (count, shape, colour, position), or as many and a higher
    METEOR against the references; worse the other way round."""
    from mils_pipeline.toyworld.corpus import ATTRIBUTES
    from mils_pipeline.toyworld.scenes import attribute_accuracy

    order = sorted(s.key for s in scenes)  # per_item lists follow sorted key order
    meteor = {name: dict(zip(order, per_item[name]["METEOR"], strict=True)) for name in per_item}
    seed_meteor, final_meteor = meteor["best seed"], meteor["final (MILS)"]
    better = worse = changed = 0
    for scene in scenes:
        if seeds[scene.key] == finals[scene.key]:
            continue
        changed += 1
        before = attribute_accuracy(scene, seeds[scene.key])
        after = attribute_accuracy(scene, finals[scene.key])
        gain = sum(after[a] - before[a] for a in ATTRIBUTES)
        delta = gain if abs(gain) > 1e-9 else final_meteor[scene.key] - seed_meteor[scene.key]
        better += delta > 1e-9
        worse += delta < -1e-9
    total = len(scenes)
    return (
        f"captions better than their best seed: {better} of {total} ({better / max(total, 1):.0%}); "
        f"worse: {worse}; changed: {changed} (better = more attributes right, or as many and a higher METEOR)"
    )


def run_demo(output: str, items: int, quiet: bool = False, overrides: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    from mils_pipeline.html_report import write_report
    from mils_pipeline.progress import ProgressBars
    from mils_pipeline.run import caption_dataset
    from mils_pipeline.toyworld.corpus import (
        AUDIT_SCORER,
        Judge,
        scorer_report,
        stage_reports,
        stage_table,
        write_corpus,
    )
    from mils_pipeline.toyworld.scenes import caption

    config = config_from_dict(demo_settings(), overrides)
    root = Path(output)
    shards, captions_dir = root / "shards", root / "captions"
    scenes = write_corpus(shards, DEMO_SPLIT, items, corrupt=True)
    held_out = scorer_report(config.scorer.model)["held_out"] if config.scorer.checkpoint else None
    print(f"demo corpus: {len(scenes)} held-out toy scenes (+1 corrupt sample) in {shards}")
    if held_out:
        print(
            f"scorer: {config.scorer.model}, trained on toy scenes by this project "
            f"(held-out top-1 retrieval {held_out['top1_image_to_caption']:.0%}); generator: SmolLM2-135M-Instruct"
        )
    bars = ProgressBars(enabled=not quiet)
    try:
        summary = caption_dataset(str(shards), str(captions_dir), config, progress=bars)
    finally:
        bars.close()
    print()
    print("\n".join(summary.summary_lines()))
    if summary.skipped == len(summary.shards):
        print(f"(already captioned with this config; delete {root} to start over)")
    rows = {row["key"]: row for row in pq.read_table(captions_dir / "data").to_pylist()}
    scenes = [s for s in scenes if s.key in rows]
    seeds = _best_seeds(config, scenes)
    print("\nreference vs best seed vs final caption:")
    for scene in scenes[:4]:
        row = rows[scene.key]
        seed_text, seed_score = seeds[scene.key]
        print(f"  {scene.key}  reference: {caption(scene)!r}")
        print(f"  {' ' * len(scene.key)}  best seed: [{seed_score:.3f}] {seed_text!r}")
        print(f"  {' ' * len(scene.key)}  final:     [{row['score']:.3f}] {row['caption']!r} ({row['rounds']} rounds)")
    judges = [Judge(config.scorer.model)] if held_out else []
    if held_out and (Path(config.scorer.checkpoint).parent / f"{AUDIT_SCORER}.safetensors").is_file():
        judges.append(Judge(AUDIT_SCORER))
    captions = {
        "best seed": {k: v[0] for k, v in seeds.items()},
        "final (MILS)": {s.key: rows[s.key]["caption"] for s in scenes},
    }
    per_item: dict[str, dict[str, list[float]]] = {}
    stages = stage_reports(scenes, captions, judges, per_item=per_item)
    print(f"\nquality on {len(scenes)} scenes (METEOR, CIDEr vs 5 references; attribute accuracy 0-1; mean scores):")
    print(stage_table(stages))
    print(improvement_line(scenes, captions["best seed"], captions["final (MILS)"], per_item))
    quarantine = pq.read_table(captions_dir / "quarantine").to_pylist()
    for row in quarantine:
        print(f"quarantined: {row['source_shard']}/{row['key']}: {row['error_type']}: {row['message'][:100]}")
    report = write_report(str(captions_dir))
    print(f"\noutput: {captions_dir} (data/, quarantine/, _manifests/, README.md); references: {shards}")
    print(f"report: {report.index} (open it in a browser: gallery, candidates, plots)")
    print(f"evaluate again with: mils eval {captions_dir} {shards / 'references.parquet'}")
    sys.stdout.flush()
    return 0
