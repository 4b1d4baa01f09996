"""Toy-world corpora and judges: shards of rendered scenes with their references, the bundled
scorer checkpoints as run-config settings, and the comparison of caption stages (reference, best
seed, refined) by caption metrics, attribute accuracy and an independent audit scorer."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mils_pipeline.errors import ModelUnavailableError
from mils_pipeline.toyworld.scenes import Scene, attribute_accuracy, make_scenes, references, render, render_png

CHECKPOINT_PACKAGE = "mils_pipeline.data.toyworld"
SCORER = "toy-scorer"  # the judge MILS optimizes against
AUDIT_SCORER = "toy-audit"  # other text tower, tokenizer cleaning, seed, width and negatives: shows gaming
SEED_POOL = "toy-scenes"
ATTRIBUTES = ("count", "shape", "colour", "position")


def checkpoint_dir() -> Path:
    return Path(str(resources.files(CHECKPOINT_PACKAGE)))


def scorer_report(name: str = SCORER) -> dict[str, Any]:
    """The recipe and held-out figures written next to a bundled checkpoint."""
    path = checkpoint_dir() / f"{name}.json"
    if not path.is_file():
        raise ModelUnavailableError(f"toy-world checkpoint {name} is not bundled (missing {path})")
    return json.loads(path.read_text())


def scorer_settings(name: str = SCORER) -> dict[str, Any]:
    """`scorer` run-config settings for a bundled toy-world checkpoint (works offline)."""
    return {
        "backend": "open_clip",
        "model": name,
        "pretrained": None,
        "checkpoint": str(checkpoint_dir() / f"{name}.safetensors"),
        "architecture": scorer_report(name)["architecture"],
    }


def write_corpus(directory: Path, split: str, count: int, corrupt: bool = False) -> list[Scene]:
    """``count`` scenes of ``split`` as two WebDataset shards of 64 px PNGs (plus, when asked, one
    truncated image to show quarantine) and ``references.parquet`` (key, references) beside them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mils_pipeline.io.shards import write_shard

    scenes = make_scenes(split, count)
    samples = [(s.key, {"png": render_png(s)}) for s in scenes]
    half = (len(samples) + 1) // 2
    second = samples[half:]
    if corrupt:
        second = [*second, ("broken_scene", {"png": samples[0][1]["png"][:100]})]
    directory.mkdir(parents=True, exist_ok=True)
    write_shard(str(directory / "shard-000.tar"), samples[:half])
    write_shard(str(directory / "shard-001.tar"), second)
    rows = [{"key": s.key, "references": references(s)} for s in scenes]
    pq.write_table(pa.Table.from_pylist(rows), directory / "references.parquet")
    return scenes


class Judge:
    """Scores captions of scenes with a bundled checkpoint: one image embedding per scene."""

    def __init__(self, name: str) -> None:
        from mils_pipeline.config import ScorerConfig
        from mils_pipeline.score import build_scorer

        self.name = name
        self.scorer = build_scorer(ScorerConfig(**scorer_settings(name), device="cpu"), "image")
        self._images: dict[str, np.ndarray] = {}

    def scores(self, scenes: Sequence[Scene], texts: Sequence[str]) -> np.ndarray:
        missing = [s for s in scenes if s.key not in self._images]
        if missing:
            for scene, row in zip(missing, self.scorer.embed_media([render(s) for s in missing]), strict=True):
                self._images[scene.key] = row
        images = np.stack([self._images[s.key] for s in scenes])
        return (images * self.scorer.embed_texts(list(texts))).sum(axis=1)


@dataclass
class StageReport:
    """Quality of one caption per scene at one stage (seeds, a round, a baseline)."""

    name: str
    captions: dict[str, str]
    metrics: dict[str, float]

    def row(self, columns: Sequence[str]) -> str:
        values = [f"{self.metrics[c]:.3f}" if c in self.metrics else "–" for c in columns]
        return f"| {self.name} | " + " | ".join(values) + " |"


def stage_reports(
    scenes: Sequence[Scene],
    stages: Mapping[str, Mapping[str, str]],
    judges: Sequence[Judge] = (),
    per_item: dict[str, dict[str, list[float]]] | None = None,
) -> list[StageReport]:
    """Per stage (name -> key -> caption): METEOR and CIDEr (pycocoevalcap) against the scenes'
    references, mean attribute accuracy, and each judge's mean score of the captions. With
    ``per_item`` (a dict to fill): each stage's per-caption METEOR and CIDEr, in sorted key order."""
    from mils_pipeline.evaluate import score_caption_sets

    refs = {s.key: references(s) for s in scenes}
    scored = score_caption_sets(
        {name: {s.key: c[s.key] for s in scenes} for name, c in stages.items()}, refs, per_item=per_item
    )
    reports = []
    for name, captions in stages.items():
        metrics = {"METEOR": scored[name]["METEOR"], "CIDEr": scored[name]["CIDEr"]}
        accuracy = [attribute_accuracy(s, captions[s.key]) for s in scenes]
        for attribute in ATTRIBUTES:
            metrics[attribute] = float(np.mean([a[attribute] for a in accuracy]))
        for judge in judges:
            metrics[f"score:{judge.name}"] = float(np.mean(judge.scores(scenes, [captions[s.key] for s in scenes])))
        reports.append(StageReport(name, dict(captions), metrics))
    return reports


def stage_table(stages: Sequence[StageReport]) -> str:
    columns = list(dict.fromkeys(c for s in stages for c in s.metrics))
    lines = ["| stage | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [s.row(columns) for s in stages]
    return "\n".join(lines)
