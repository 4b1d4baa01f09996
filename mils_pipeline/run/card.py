"""The dataset card: README.md at the output root, with a YAML header that `datasets` reads."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import yaml

from mils_pipeline.config import RunConfig
from mils_pipeline.io.manifest import read_manifests
from mils_pipeline.io.sink import join_url, write_bytes_whole
from mils_pipeline.run.report import dataset_cost, useful_share


def _scores(output: str) -> np.ndarray:
    fs, root = fsspec.core.url_to_fs(join_url(output, "data"))
    parts = []
    for path in sorted(fs.glob(f"{root}/part-*.parquet")):
        with fs.open(path, "rb") as fh:
            parts.append(pq.read_table(fh, columns=["score"]).column("score").to_numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def _cost_lines(manifests: list[dict[str, Any]], rows: int) -> list[str]:
    cost = dataset_cost(manifests)
    loop, encoder = cost.loop, cost.text_encoder
    per_item = max(rows, 1)
    return [
        "| prompt tokens | completion tokens | completion tokens / item | useful token share | texts scored "
        "| texts encoded | encodes / item | media encoded |",
        "|---|---|---|---|---|---|---|---|",
        f"| {loop.prompt_tokens:.0f} | {loop.completion_tokens:.0f} | {loop.completion_tokens / per_item:.1f} "
        f"| {useful_share(loop):.0%} | {encoder.requested:.0f} | {encoder.encoded:.0f} "
        f"| {encoder.encoded / per_item:.2f} | {loop.media_encoded:.0f} |",
        "",
        "Useful token share: completion tokens that went into an accepted new candidate (estimated from "
        "the share of each reply's characters in its accepted lines); the rest repeated known captions, "
        "broke the format or ran past the list.",
        "",
        "Wall time of the shards, in seconds (reading and decoding run ahead in the background):",
        "",
        "| generation | scoring | writing | orchestration | reading + decoding |",
        "|---|---|---|---|---|",
        f"| {loop.seconds_generate:.1f} | {cost.seconds_scoring:.1f} | {cost.seconds_write:.1f} "
        f"| {cost.seconds_other:.1f} | {cost.seconds_reading:.1f} |",
        "",
        "Per-shard figures are in `_manifests/`; per-item figures in the `cost` column.",
    ]


def _preprocess_lines(scorer: dict[str, Any]) -> list[str]:
    """The image preprocessing an open_clip scorer used, and where it came from (its weights' tag,
    the checkpoint directory, or the config)."""
    try:
        parameters = json.loads(scorer.get("parameters") or "{}")
    except (TypeError, ValueError):
        return []
    preprocess = parameters.get("preprocess") if isinstance(parameters, dict) else None
    if not preprocess:
        return []
    keys = ("mean", "std", "interpolation", "resize_mode")
    shown = ", ".join(f"{k} {preprocess[k]}" for k in keys if k in preprocess)
    if not shown:
        return ["  - image preprocessing: open_clip's own for this model and tag"]
    return [f"  - image preprocessing: {shown} (from {preprocess.get('source')})"]


def _scorer_lines(manifest: dict[str, Any], scorer: dict[str, Any]) -> list[str]:
    scorers = manifest.get("scorers") or []
    if len(scorers) <= 1:
        lines = [f"- scorer: `{scorer.get('backend')}` `{scorer.get('model')}` ({scorer.get('revision')})"]
        return lines + _preprocess_lines(scorer)
    lines = ["- scorers, combined by weight (score = sum(weight * score) / sum(weight)):"]
    for s in scorers:
        lines.append(f"  - {s['name']}: `{s['backend']}` `{s['model']}` ({s['revision']}), weight {s['weight']}")
    return lines


def render_card(config: RunConfig, manifests: list[dict[str, Any]], scores: np.ndarray) -> str:
    header = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "data/part-*.parquet"}],
            }
        ],
        "task_categories": ["image-to-text"] if config.modality == "image" else [],
        "tags": ["mils", "synthetic-captions", config.modality],
    }
    rows = sum(m.get("rows", 0) for m in manifests)
    quarantined = sum(m.get("quarantined", 0) for m in manifests)
    reasons: Counter[str] = Counter()
    for m in manifests:
        reasons.update(m.get("stop_reasons", {}))
    first = manifests[0] if manifests else {}
    generator = first.get("generator", {})
    scorer = first.get("scorer", {})
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        "# Captions made with mils-pipeline",
        "",
        f"Captions for {rows} {config.modality} items from {len(manifests)} shards, written by MILS: "
        "a text-only LLM proposed captions, a multimodal embedding model scored them against the "
        "media, and the best-scored ones were fed back to the LLM, round after round. No model was trained.",
        "",
        "## Models and settings",
        "",
        f"- generator: `{generator.get('backend')}` `{generator.get('model')}` ({generator.get('revision')})",
        *_scorer_lines(first, scorer),
        f"- seed pool: `{first.get('seed_pool_id')}`",
        f"- K kept {config.optimize.top_k}, N new per round {config.optimize.new_per_round}, "
        f"at most {config.optimize.max_rounds} rounds, captions of at most {config.optimize.max_caption_words} words",
        f"- config sha256: `{config.config_sha256()}`",
        "",
        "## Counts",
        "",
        "| shards | rows | quarantined |",
        "|---|---|---|",
        f"| {len(manifests)} | {rows} | {quarantined} |",
        "",
        "Stop reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none"),
        "",
        "## Score distribution (best caption per item)",
        "",
    ]
    if scores.size:
        q = np.quantile(scores, [0.0, 0.1, 0.5, 0.9, 1.0])
        lines += [
            "| min | p10 | median | p90 | max | mean |",
            "|---|---|---|---|---|---|",
            "| " + " | ".join(f"{v:.4f}" for v in [*q, float(scores.mean())]) + " |",
        ]
    else:
        lines.append("No rows.")
    if "random-init" in str(scorer.get("revision")):
        lines += [
            "",
            "**Warning:** the scorer had randomly initialised weights. These captions are not "
            "descriptions of the media; this dataset only shows the pipeline working.",
        ]
    lines += ["", "## Cost", "", *_cost_lines(manifests, rows)]
    lines += ["", "Every row carries its provenance: see `candidates`, `trajectory`, `generator`, `scorer`.", ""]
    return "\n".join(lines)


def write_card(output: str, config: RunConfig) -> None:
    manifests = [m for _, m in sorted(read_manifests(output).items())]
    text = render_card(config, manifests, _scores(output))
    write_bytes_whole(join_url(output, "README.md"), text.encode())
