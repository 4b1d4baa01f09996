"""Throughput benchmark: a fixed captioning workload through the real pipeline, and optionally the
reference code's structure on the same items (`--naive`), with the ratio of the two.

    PYTHONPATH=. .venv/bin/python benchmarks/throughput.py                 # optimized path only
    PYTHONPATH=. .venv/bin/python benchmarks/throughput.py --naive         # + reference structure, ratio
    PYTHONPATH=. .venv/bin/python benchmarks/throughput.py --items 640 --rounds 1   # memory at 10x

The workload: JPEG variants of the photos that ship with scikit-image, in WebDataset shards of
`--items-per-shard`; a seed pool of `--pool-size` texts (the bundled everyday-photos pool plus
deterministic variants of its lines); K, N and T from the flags; convergence off (every item runs
T rounds, as in the paper). The generator is any configured backend (`--generator`, default
llamacpp with SmolLM2-135M-Instruct; `--set generator.model=...` for another file). The scorer
is a small open_clip model with RANDOM weights (`--scorer tiny`, or `--scorer vit-b-32` for
ViT-B/32's real shapes): weights do not change the compute, so the cost figures hold, but the
captions mean nothing.

Printed: items/hour, tokens/s, text and media encodes per item, the share of wall time spent
outside generation, peak resident memory, and with `--naive` the naive/optimized ratios of wall
time per item and encodes per item. Every figure is measured; `uptime` load averages are
recorded at start and end, because the machine may be shared.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pyarrow.parquet as pq
from naive import REFERENCE_MAX_TOKENS, NaiveReferenceLoop

from mils_pipeline.config import RunConfig, config_from_dict

SCORERS: dict[str, dict[str, Any]] = {
    # the demo's tiny random model: scoring is cheap next to generation
    "tiny": {
        "model": "mils-bench-tiny",
        "pretrained": None,
        "architecture": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        },
    },
    # ViT-B/32's architecture with random weights (its tokenizer ships with open_clip)
    "vit-b-32": {"model": "ViT-B-32", "pretrained": None},
}

WORKLOAD_FLAGS = ("items", "items_per_shard", "pool_size", "top_k", "new", "rounds", "active", "generator", "scorer")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "moon", "page", "text")
POOL_PREFIXES = ("", "A photo of ", "A close-up of ", "An old picture of ", "A blurry shot of ", "A wide view of ")
POOL_SUFFIXES = ("", " at night", " in the rain", " in winter", " on a sunny day", " seen from above")


def load_averages() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _base_photos() -> list[Any]:
    import numpy as np
    import skimage.data
    from PIL import Image

    images = []
    for name in PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            array = np.asarray(loader())
        except Exception:  # noqa: BLE001  (a photo this wheel would download: skip it)
            continue
        if array.dtype != np.uint8:
            values = array.astype(np.float64)
            array = (255 * (values - values.min()) / max(float(np.ptp(values)), 1e-9)).astype(np.uint8)
        images.append(Image.fromarray(array).convert("RGB"))
    if not images:
        raise SystemExit("no scikit-image photos could be loaded: install scikit-image")
    return images


def make_corpus(directory: Path, items: int, per_shard: int) -> None:
    """``items`` distinct JPEGs (crops, turns and flips of the bundled photos) in shards."""
    import random

    from PIL import Image

    from mils_pipeline.io.shards import write_shard

    bases = _base_photos()
    samples: list[tuple[str, dict[str, bytes]]] = []
    for i in range(items):
        rng = random.Random(i)
        image = bases[i % len(bases)]
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        variant = image.crop((x, y, x + cw, y + ch)).rotate(rng.uniform(-15, 15), expand=False)
        if rng.random() < 0.5:
            variant = variant.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        variant.thumbnail((384, 384))
        buffer = io.BytesIO()
        variant.save(buffer, format="JPEG", quality=90)
        samples.append((f"img{i:06d}", {"jpg": buffer.getvalue()}))
    for shard, start in enumerate(range(0, items, per_shard)):
        write_shard(str(directory / f"shard-{shard:04d}.tar"), samples[start : start + per_shard])


def make_pool(directory: Path, size: int) -> str:
    """A pool of ``size`` texts: the bundled everyday-photos lines, then variants of them."""
    from mils_pipeline.seeding import load_seed_pool, write_seed_pool

    base = load_seed_pool("everyday-photos").texts
    texts: list[str] = []
    seen: set[str] = set()
    for prefix in POOL_PREFIXES:
        for suffix in POOL_SUFFIXES:
            for line in base:
                body = line[0].lower() + line[1:] if prefix else line
                text = f"{prefix}{body}{suffix}"
                if text.casefold() not in seen:
                    seen.add(text.casefold())
                    texts.append(text)
                if len(texts) >= size:
                    return write_seed_pool(texts, directory, {"theme": "benchmark"}).id
    raise SystemExit(f"cannot make a pool of {size} texts from the bundled pool (at most {len(texts)})")


def bench_config(args: argparse.Namespace, pool_id: str, pool_dir: Path) -> RunConfig:
    settings: dict[str, Any] = {
        "generator": {"backend": args.generator},
        "scorer": {"backend": "open_clip", "init_seed": 0, **SCORERS[args.scorer]},
        "seed_pool": {"pool": pool_id, "dir": str(pool_dir)},
        "optimize": {
            "top_k": args.top_k,
            "new_per_round": args.new,
            "max_rounds": args.rounds,
            "max_active_items": args.active,
            # the paper's loop structure (LLM rewrites every round, no early stop), as --naive runs it
            "operators": ["rewrite"],
            "convergence_epsilon": 0.0,
        },
    }
    if args.threads:
        settings["generator"]["threads"] = args.threads
    return config_from_dict(settings, args.overrides)


def run_optimized(config: RunConfig, source: Path, output: Path) -> tuple[dict[str, Any], Any]:
    from mils_pipeline.run import build_runtime, caption_dataset

    runtime = build_runtime(config)
    cpu_started = time.process_time()
    summary = caption_dataset(str(source), str(output), config, runtime=runtime)
    cpu = time.process_time() - cpu_started
    items = max(summary.rows, 1)
    wall = summary.seconds
    cost = summary.cost
    generate = cost.loop.seconds_generate
    completion = cost.loop.completion_tokens
    prompt = cost.loop.prompt_tokens
    encoded = cost.text_encoder.encoded
    media = cost.loop.media_encoded
    pool_size = len(runtime.seed_pool.texts)
    print("\n".join(summary.profile_lines()))
    scores = pq.read_table(output / "data", columns=["score"]).column("score").to_numpy()
    figures = {
        "items": summary.rows,
        "setup_seconds": round(runtime.seconds_setup, 2),
        "wall_seconds": round(wall, 2),
        "wall_seconds_per_item": round(wall / items, 3),
        "cpu_seconds_per_item": round(cpu / items, 3),
        "items_per_hour": round(3600 * summary.rows / wall, 1),
        "items_per_hour_with_setup": round(3600 * summary.rows / (wall + runtime.seconds_setup), 1),
        "generation_seconds": round(generate, 2),
        "share_outside_generation": round(1 - generate / wall, 4),
        "share_outside_generation_with_setup": round(1 - generate / (wall + runtime.seconds_setup), 4),
        "time_split_seconds": {k: round(v, 2) for k, v in summary.time_split().items()},
        "completion_tokens_per_second": round(completion / generate, 1) if generate else None,
        "tokens_per_second_prompt_and_completion": round((prompt + completion) / generate, 1) if generate else None,
        "prompt_tokens_per_item": round(prompt / items, 1),
        "prompt_tokens_from_prefix_cache": round(cost.loop.cached_prompt_tokens / prompt, 3) if prompt else None,
        "completion_tokens_per_item": round(completion / items, 1),
        "useful_token_share": round(cost.loop.useful_completion_tokens / completion, 3) if completion else None,
        "new_candidates": sum(cost.loop.proposals.values()),
        "final_mean_score": round(float(scores.mean()), 4) if len(scores) else None,
        "text_encodes_per_item": round(encoded / items, 2),
        "texts_scored_per_item": round(cost.text_encoder.requested / items, 2),
        "media_encodes_per_item": round(media / items, 2),
        "encodes_per_item": round((encoded + media) / items, 2),
        "seed_pool_encodes_once": pool_size,
        "encodes_per_item_with_pool_once": round((encoded + media + pool_size) / items, 2),
        "cache_memory_hits": cost.text_encoder.memory_hits,
        "cache_pinned_hits": cost.text_encoder.pinned_hits,
        "generate_calls": cost.loop.generate_calls,
        "cache_entries_at_end": len(runtime.encoder.cache),
        "cache_bytes_at_end": runtime.encoder.cache.bytes,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    return figures, runtime


def _decoded(source: Path, config: RunConfig) -> Any:
    """The same items, read and decoded one after another with the library's reader and decoder."""
    from mils_pipeline.errors import MediaDecodeError
    from mils_pipeline.io.shards import iter_samples, list_shards
    from mils_pipeline.media import decode, pick_media
    from mils_pipeline.optimize import ItemInput

    for shard in list_shards(str(source)):
        for raw in iter_samples(shard.url):
            try:
                _, data = pick_media(raw.members, config.modality)
                yield ItemInput(key=raw.key, media=decode(config.modality, data))
            except MediaDecodeError:
                continue


def run_naive(
    config: RunConfig,
    runtime: Any,
    source: Path,
    items: int,
    max_tokens: int,
    generator: Any = None,
    items_per_call: int = 1,
) -> dict[str, Any]:
    """The reference structure on ``items`` items: on this project's generator (``--naive``), or on
    the reference engine (``--reference-engine``: ``generator``, items batched ``items_per_call``)."""
    loop = NaiveReferenceLoop(
        generator or runtime.generator, runtime.scorer, runtime.seed_pool.texts, config, max_tokens
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    results = list(loop.run(islice(_decoded(source, config), items), items_per_call))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    done = max(len(results), 1)
    s = loop.stats
    return {
        "items": len(results),
        "max_tokens": max_tokens,
        "wall_seconds": round(wall, 2),
        "wall_seconds_per_item": round(wall / done, 3),
        "cpu_seconds_per_item": round(cpu / done, 3),
        "items_per_hour": round(3600 * len(results) / wall, 1) if wall else None,
        "generation_seconds": round(s.seconds_generate, 2),
        "share_outside_generation": round(1 - s.seconds_generate / wall, 4) if wall else None,
        "scoring_seconds": round(s.seconds_score + s.seconds_media, 2),
        "completion_tokens_per_second": round(s.completion_tokens / s.seconds_generate, 1)
        if s.seconds_generate
        else None,
        "prompt_tokens_per_item": round(s.prompt_tokens / done, 1),
        "completion_tokens_per_item": round(s.completion_tokens / done, 1),
        "useful_token_share": round(s.useful_completion_tokens / s.completion_tokens, 3)
        if s.completion_tokens
        else None,
        "final_mean_score": round(float(np.mean([r.score for r in results])), 4) if results else None,
        "text_encodes_per_item": round(s.texts_encoded / done, 2),
        "media_encodes_per_item": round(s.media_encoded / done, 2),
        "encodes_per_item": round((s.texts_encoded + s.media_encoded) / done, 2),
        "generate_calls": s.generate_calls,
    }


RATIO_METRICS = ("wall_seconds_per_item", "cpu_seconds_per_item", "encodes_per_item", "completion_tokens_per_item")


def ratios_over(figures: dict[str, Any], optimized: dict[str, Any]) -> dict[str, float]:
    """Per-item cost of another path over the optimized path's, metric by metric."""
    return {m: round(figures[m] / max(optimized[m], 1e-9), 2) for m in RATIO_METRICS}


def print_figures(title: str, figures: dict[str, Any]) -> None:
    print(f"\n== {title}")
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"  {key}:")
            for k, v in value.items():
                print(f"    {k:<45} {v}")
        else:
            print(f"  {key:<45} {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64, help="media items in the workload")
    parser.add_argument("--items-per-shard", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=5000, help="seed pool texts")
    parser.add_argument("--top-k", type=int, default=20, help="K kept")
    parser.add_argument("--new", type=int, default=20, help="N new per round")
    parser.add_argument("--rounds", type=int, default=5, help="T rounds")
    parser.add_argument("--active", type=int, default=16, help="optimize.max_active_items")
    parser.add_argument("--generator", default="llamacpp", help="generator.backend: any registered backend")
    parser.add_argument("--threads", type=int, default=None, help="generator.threads (llama.cpp)")
    parser.add_argument("--scorer", choices=sorted(SCORERS), default="tiny", help="open_clip shapes, random weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--naive", action="store_true", help="also run the reference structure and print ratios")
    parser.add_argument(
        "--naive-items", type=int, default=4, help="items through the naive loop (its cost is per item)"
    )
    parser.add_argument("--naive-max-tokens", type=int, default=REFERENCE_MAX_TOKENS)
    parser.add_argument(
        "--reference-engine",
        action="store_true",
        help="also run the paper's engine (transformers pipeline, fp32, batched) in the reference structure",
    )
    parser.add_argument("--reference-items", type=int, default=16, help="items through the reference engine")
    parser.add_argument("--reference-caps", default="300,3000", help="its max_new_tokens caps, one run each")
    parser.add_argument("--reference-batch", type=int, default=8, help="items per pipeline call (lockstep)")
    parser.add_argument("--workdir", help="where shards, pool and output go (default: a temporary directory)")
    parser.add_argument("--json", dest="json_path", help="write every figure to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {
        "workload": {k: getattr(args, k) for k in WORKLOAD_FLAGS},
        "overrides": args.overrides,
        "cpus": os.cpu_count(),
        "load_average_start": load_averages(),
    }
    with tempfile.TemporaryDirectory(prefix="mils-bench-") as tmp:
        root = Path(args.workdir or tmp)
        started = time.perf_counter()
        make_corpus(root / "shards", args.items, args.items_per_shard)
        pool_id = make_pool(root / "pools", args.pool_size)
        report["corpus_seconds"] = round(time.perf_counter() - started, 2)
        config = bench_config(args, pool_id, root / "pools")
        report["optimize_settings"] = config.optimize.model_dump()
        print(f"workload: {report['workload']}  load average at start: {report['load_average_start']}")

        optimized, runtime = run_optimized(config, root / "shards", root / f"out-{time.time_ns()}")
        report["optimized"] = optimized
        report["load_average_after_optimized"] = load_averages()
        print_figures("optimized (this project)", optimized)
        try:
            if args.naive:
                naive = run_naive(config, runtime, root / "shards", args.naive_items, args.naive_max_tokens)
                report["naive"] = naive
                report["ratio_naive_over_optimized"] = ratios_over(naive, optimized)
                print_figures(f"naive (reference structure, {naive['items']} items)", naive)
                print_figures("naive / optimized", report["ratio_naive_over_optimized"])
            if args.reference_engine:
                from reference_engine import PipelineGenerator, smollm2_safetensors_dir

                model_dir = smollm2_safetensors_dir()
                for cap in (int(c) for c in args.reference_caps.split(",")):
                    engine = PipelineGenerator(model_dir, cap, args.reference_batch, args.threads)
                    figures = run_naive(
                        config, runtime, root / "shards", args.reference_items, cap, engine, args.reference_batch
                    )
                    name = f"reference_engine_cap_{cap}"
                    report[name] = figures
                    report[f"ratio_{name}_over_optimized"] = ratios = ratios_over(figures, optimized)
                    title = f"reference engine (transformers pipeline, fp32, cap {cap}, {figures['items']} items)"
                    print_figures(title, figures)
                    print_figures(f"reference engine cap {cap} / optimized", ratios)
        finally:
            runtime.close()
    report["load_average_end"] = load_averages()
    print(f"\nload average at end: {report['load_average_end']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
