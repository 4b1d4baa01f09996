"""`mils ...`: a thin skin over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mils_pipeline.config import RunConfig, describe_fields, load_config
from mils_pipeline.errors import ConfigError, MilsError, ShardsFailedError
from mils_pipeline.logs import redact, setup_logging


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML run configuration")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set optimize.top_k=20 (repeatable)",
    )


def _config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def _with_progress(quiet: bool, work):
    """Run ``work(bars)`` with progress bars (none when ``quiet``), then print the report's summary;
    when shards failed, the summary of what was done and what failed comes before the error."""
    from mils_pipeline.progress import ProgressBars

    bars = ProgressBars(enabled=not quiet)
    try:
        report = work(bars)
    except ShardsFailedError as exc:
        bars.close()
        print("\n".join(exc.summary.summary_lines()))
        raise
    finally:
        bars.close()
    print("\n".join(report.summary_lines()))
    return report


def cmd_caption(args: argparse.Namespace) -> int:
    from mils_pipeline.run import caption_dataset

    config = _config(args)
    report = _with_progress(
        args.quiet, lambda bars: caption_dataset(args.source, args.output, config, progress=bars, select=args.select)
    )
    if args.profile:
        print("\n".join(report.profile_lines()))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    import json

    from mils_pipeline.estimate import enforce_gpu_budget, estimate_corpus
    from mils_pipeline.progress import ProgressBars

    bars = ProgressBars(enabled=not args.quiet)
    try:
        estimate = estimate_corpus(
            args.source,
            _config(args),
            pilot=args.pilot,
            gpu=args.gpu,
            usd_per_hour=args.usd_per_hour,
            count_shards=args.count_shards,
            confidence=args.confidence,
            seed=args.seed,
            select=args.select,
            work_dir=args.work_dir,
            progress=bars,
        )
    finally:
        bars.close()
    print("\n".join(estimate.summary_lines()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(estimate.to_dict(), fh, indent=2)
    if args.max_gpu_hours is not None:
        enforce_gpu_budget(estimate, args.max_gpu_hours)
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from mils_pipeline.progress import ProgressBars
    from mils_pipeline.seeding import THEMES, build_seed_pool

    theme = THEMES.get(args.theme)
    # A pool follows its theme's modality (caption length) unless the settings say otherwise.
    config = load_config(args.config, [f"modality={theme.modality}", *args.overrides] if theme else args.overrides)
    bars = ProgressBars(enabled=not args.quiet)
    try:
        pool = build_seed_pool(
            config,
            args.theme,
            size=args.size,
            directory=args.out,
            seed=args.seed,
            temperature=args.temperature,
            top_p=args.top_p,
            progress=lambda n: bars(f"seed pool {args.theme}", n, args.size),
        )
    finally:
        bars.close()
    print(f"seed pool {pool.id}: {len(pool.texts)} texts in {pool.path}")
    print(f"use it with: --set seed_pool.pool={pool.id} --set seed_pool.dir={pool.path.parent}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mils_pipeline.demo import run_demo

    return run_demo(output=args.out, items=args.items, quiet=args.quiet, overrides=args.overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    from mils_pipeline.evaluate import evaluate, load_captions, load_references, write_report

    report = evaluate(load_captions(args.captions), load_references(args.references))
    print(report.to_markdown(), end="")
    if args.out:
        json_path, md_path = write_report(report, args.out)
        print(f"written: {json_path}, {md_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mils_pipeline.html_report import write_report
    from mils_pipeline.io.storage import configure_storage

    configure_storage(_config(args).storage)
    report = write_report(args.dataset, out=args.out, sample=args.sample, sort=args.sort)
    print(f"report of {report.rows} items ({report.shown} in the gallery, {report.quarantined} quarantined)")
    print(f"report: {report.index}")
    return 0


def _size(text: str) -> int:
    """Bytes from ``500000``, ``500MB``, ``1GB`` (powers of 1000)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    stripped = text.strip().upper()
    for unit, factor in units.items():
        if stripped.endswith(unit):
            return int(float(stripped.removesuffix(unit)) * factor)
    return int(float(stripped))


def _number_within(low: float, high: float, what: str) -> Callable[[str], float]:
    """An argparse type: a number in (low, high], refused while the arguments are parsed (before
    any dataset is read or any pilot runs) with ``what`` it must be."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low < value <= high or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
        return value

    return parse


_fraction = _number_within(0, 1, "a share in (0, 1], e.g. 0.5 for the best half")
_gpu_hours = _number_within(0, float("inf"), "a number of GPU-hours above 0, e.g. 200")


def cmd_export(args: argparse.Namespace) -> int:
    from mils_pipeline.export import export_dataset
    from mils_pipeline.io.storage import configure_storage

    if args.push_to and args.format != "hf":
        raise ConfigError("--push-to needs --format hf")
    configure_storage(_config(args).storage)
    report = export_dataset(
        args.dataset,
        args.out,
        args.format,
        min_score=args.min_score,
        top_fraction=args.top_fraction,
        max_count=args.max_count,
        max_size=args.max_size,
        overwrite=args.overwrite,
    )
    print(report.summary_line())
    if args.push_to:
        from mils_pipeline.io.publish import push_to_hub

        print(f"pushed: {push_to_hub(args.out, args.push_to)}")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from mils_pipeline.rescore import rescore_config, rescore_dataset

    config = rescore_config(args.dataset, args.scorer, args.config, args.overrides)
    _with_progress(args.quiet, lambda bars: rescore_dataset(args.dataset, args.out, config, progress=bars))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, description in describe_fields():
            print(f"| `{key}` | `{default}` | {description} |")
        return 0
    config = _config(args)
    print(config.to_yaml(), end="")
    print(f"# config_sha256: {config.config_sha256()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mils", description="Caption media corpora with MILS.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    caption = sub.add_parser("caption", help="caption every shard under SOURCE into OUTPUT")
    caption.add_argument("source", help="directory, prefix, glob or single .tar of WebDataset shards")
    caption.add_argument("output", help="output location (local path or fsspec URL)")
    _add_config_args(caption)
    caption.add_argument(
        "--select",
        action="append",
        metavar="PATTERN",
        help="only shards whose name matches this glob, e.g. 'shard-01*' (repeatable)",
    )
    caption.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    caption.add_argument("--profile", action="store_true", help="print where the time and tokens went")
    caption.set_defaults(func=cmd_caption)

    from mils_pipeline.costs import gpu_names
    from mils_pipeline.estimate import DEFAULT_CONFIDENCE, DEFAULT_COUNT_SHARDS, DEFAULT_PILOT

    estimate = sub.add_parser(
        "estimate", help="caption a random pilot, then estimate tokens, encodes, wall time, GPU-hours and cost"
    )
    estimate.add_argument("source", help="the shards `mils caption` would read (directory, prefix, glob, tar)")
    _add_config_args(estimate)
    estimate.add_argument(
        "--pilot", type=int, default=DEFAULT_PILOT, help=f"items to caption (default {DEFAULT_PILOT})"
    )
    estimate.add_argument("--gpu", help=f"price on this GPU: {', '.join(gpu_names())} (default {gpu_names()[0]})")
    estimate.add_argument("--usd-per-hour", type=float, help="your price of one GPU-hour (default: the cost model's)")
    estimate.add_argument(
        "--count-shards",
        type=int,
        default=DEFAULT_COUNT_SHARDS,
        help=f"count at most this many shards' tar headers, the rest by bytes (default {DEFAULT_COUNT_SHARDS})",
    )
    estimate.add_argument(
        "--confidence", type=float, default=DEFAULT_CONFIDENCE, help="of the intervals (default 0.95)"
    )
    estimate.add_argument("--seed", type=int, default=0, help="of the random pilot and shard sample")
    estimate.add_argument("--select", action="append", metavar="PATTERN", help="only shards matching (repeatable)")
    estimate.add_argument(
        "--max-gpu-hours", type=_gpu_hours, help="exit with an error when the upper estimate is above"
    )
    estimate.add_argument("--json", metavar="PATH", help="also write the estimate as JSON")
    estimate.add_argument("--work-dir", help="a new local directory for the pilot, kept (default: a temporary one)")
    estimate.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    estimate.set_defaults(func=cmd_estimate)

    seed = sub.add_parser("seed", help="write a seed pool for a theme with the generator")
    seed.add_argument("--theme", default="everyday-photos", help="everyday-photos, sounds or video-scenes")
    seed.add_argument("--size", type=int, default=2000, help="target number of distinct texts")
    seed.add_argument("--out", help="pool directory (default: seed_pool.dir or $MILS_HOME/seed_pools)")
    seed.add_argument("--seed", type=int, default=0)
    seed.add_argument("--temperature", type=float, default=1.0, help="high, so the pool spreads out")
    seed.add_argument("--top-p", type=float, default=0.95)
    _add_config_args(seed)
    seed.add_argument("--quiet", "-q", action="store_true")
    seed.set_defaults(func=cmd_seed)

    demo = sub.add_parser(
        "demo", help="MILS on held-out toy-world scenes (SmolLM2, bundled toy scorer), judged against references"
    )
    demo.add_argument("--out", default="mils-demo", help="directory for the demo corpus and output")
    demo.add_argument("--items", type=int, default=12, help="number of toy scenes")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--quiet", "-q", action="store_true")
    demo.set_defaults(func=cmd_demo)

    evaluation = sub.add_parser(
        "eval", help="BLEU-4, METEOR, ROUGE-L, CIDEr of a caption run against references (pycocoevalcap)"
    )
    evaluation.add_argument("captions", help="output of `mils caption` (its root, data/ or one Parquet file)")
    evaluation.add_argument(
        "references", help="COCO-format captions JSON, or Parquet with key + references (list) or caption"
    )
    evaluation.add_argument("--out", help="write the report to OUT.json and OUT.md")
    evaluation.set_defaults(func=cmd_eval)

    from mils_pipeline.html_report import DEFAULT_SAMPLE, SORTS

    report = sub.add_parser(
        "report", help="write a static HTML report of a dataset: gallery, candidates, plots, quarantine, card"
    )
    report.add_argument("dataset", help="output of `mils caption` (local path or s3:// URL)")
    report.add_argument("--out", help="report folder (local or s3://); default: report/ beside the dataset's data")
    report.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        help=f"items in the gallery, evenly spaced in the sort order (default {DEFAULT_SAMPLE}; 0: every item)",
    )
    report.add_argument("--sort", choices=SORTS, default="score", help="gallery order (default: score, best first)")
    _add_config_args(report)
    report.set_defaults(func=cmd_report)

    from mils_pipeline.export import DEFAULT_MAX_COUNT, DEFAULT_MAX_SIZE, FORMATS

    export = sub.add_parser(
        "export", help="write a dataset's media, captions and provenance as training shards (WebDataset or HF)"
    )
    export.add_argument("dataset", help="output of `mils caption` (local path or s3:// URL)")
    export.add_argument("out", help="export location (local path or s3:// URL); must be new or empty")
    export.add_argument("--format", choices=list(FORMATS), default="webdataset", help="default: webdataset")
    export.add_argument("--min-score", type=float, help="only items whose caption scored at least this")
    export.add_argument("--top-fraction", type=_fraction, help="only the best-scored fraction of items, e.g. 0.5")
    export.add_argument(
        "--max-count", type=int, default=DEFAULT_MAX_COUNT, help=f"samples per shard (default {DEFAULT_MAX_COUNT})"
    )
    export.add_argument(
        "--max-size", type=_size, default=DEFAULT_MAX_SIZE, help="bytes per shard, e.g. 500MB (default 1GB)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    export.add_argument("--push-to", metavar="REPO", help="with --format hf: push OUT to this hub dataset repo")
    _add_config_args(export)
    export.set_defaults(func=cmd_export)

    rescore = sub.add_parser(
        "rescore", help="score every kept candidate of a dataset with another scorer, as a new dataset version"
    )
    rescore.add_argument("dataset", help="output of `mils caption` (local path or s3:// URL)")
    rescore.add_argument("out", help="location of the rescored dataset (local path or s3:// URL), apart from DATASET")
    rescore.add_argument(
        "--scorer",
        metavar="NAME|FILE",
        help="the new scorer: a bundled judge (toy-scorer, toy-audit) or a YAML file of scorer settings; "
        "--set scorer.KEY=VALUE overrides it (default: the scorer section of --config)",
    )
    _add_config_args(rescore)
    rescore.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    rescore.set_defaults(func=cmd_rescore)

    config = sub.add_parser("config", help="print the resolved configuration and its hash")
    _add_config_args(config)
    config.add_argument("--reference", action="store_true", help="print every setting as a Markdown table")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except MilsError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
