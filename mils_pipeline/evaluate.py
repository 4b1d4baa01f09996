"""Caption metrics against references, the COCO way: BLEU-4, METEOR, ROUGE-L and CIDEr through
``pycocoevalcap`` (PTB tokenisation, METEOR 1.5 in Java), overall and per modality.

SPICE needs Stanford CoreNLP jars, which pycocoevalcap downloads on first use; it is computed only
when those jars are already present, and otherwise left out with a note in the report.

References come as COCO-format JSON (``images`` + ``annotations`` with ``image_id``/``caption``;
an item's key matches an image's ``id`` or its ``file_name`` without extension) or as Parquet with
a ``key`` column and either a ``references`` list column or one ``caption`` per row.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mils_pipeline.errors import EvaluationError

METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


@dataclass
class EvaluationReport:
    """Scores per group ("all", then one per modality), with the counts behind them."""

    scores: dict[str, dict[str, float]]
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def to_markdown(self) -> str:
        metrics = [m for m in (*METRICS, "SPICE") if any(m in s for s in self.scores.values())]
        lines = [
            "| group | items | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]
        for group, scores in self.scores.items():
            values = " | ".join(f"{100 * scores[m]:.1f}" if m in scores else "–" for m in metrics)
            lines.append(f"| {group} | {self.counts.get(group, 0)} | {values} |")
        lines.append("")
        lines.append("Scores ×100 (COCO convention). " + " ".join(self.notes))
        prefixes = ("captions", "without", "refer")
        counts = ", ".join(f"{k}: {v}" for k, v in self.counts.items() if k.startswith(prefixes))
        if counts:
            lines.append(f"\nCounts: {counts}.")
        return "\n".join(lines) + "\n"


def _read_table(url: str):
    import pyarrow.dataset as ds

    try:
        return ds.dataset(url, format="parquet").to_table()
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) for non-Parquet
        raise EvaluationError(f"cannot read Parquet at {url}: {exc}") from exc


def load_captions(url: str) -> list[dict[str, str]]:
    """Rows (key, caption, modality) of a caption run's output: its root, its data/ directory or
    one Parquet file."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path) and fs.isdir(f"{path.rstrip('/')}/data"):
        url = f"{url.rstrip('/')}/data"
    table = _read_table(url)
    missing = {"key", "caption"} - set(table.schema.names)
    if missing:
        raise EvaluationError(f"{url} has no {sorted(missing)} column(s); is it the output of `mils caption`?")
    rows = table.select([c for c in ("key", "caption", "modality") if c in table.schema.names]).to_pylist()
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise EvaluationError(f"{url} holds the same key more than once; evaluate one dataset version at a time")
    return [{"key": r["key"], "caption": r["caption"], "modality": r.get("modality") or "unknown"} for r in rows]


def _coco_references(data: Mapping[str, Any], url: str) -> dict[str, list[str]]:
    if "annotations" not in data:
        raise EvaluationError(f"{url} is JSON but has no 'annotations' list: not COCO caption format")
    names: dict[Any, list[str]] = {}
    for image in data.get("images", []):
        aliases = [str(image["id"])]
        if image.get("file_name"):
            aliases.append(PurePosixPath(image["file_name"]).stem)
        names[image["id"]] = aliases
    by_image: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    # An image's aliases share one list, so it is still one item when counting.
    return {alias: captions for image, captions in by_image.items() for alias in names.get(image, [str(image)])}


def load_references(url: str) -> dict[str, list[str]]:
    """key -> reference captions, from COCO-format JSON or Parquet (see the module docstring)."""
    import fsspec

    if url.endswith(".json"):
        try:
            with fsspec.open(url, "r") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise EvaluationError(f"cannot read references {url}: {exc}") from exc
        return _coco_references(data, url)
    table = _read_table(url)
    names = set(table.schema.names)
    column = "references" if "references" in names else "caption" if "caption" in names else None
    if "key" not in names or column is None:
        raise EvaluationError(f"references {url} need a 'key' column and a 'references' (list) or 'caption' column")
    refs: dict[str, list[str]] = {}
    for row in table.select(["key", column]).to_pylist():
        value = row[column]
        refs.setdefault(str(row["key"]), []).extend(value if isinstance(value, list) else [value])
    return refs


def spice_available() -> bool:
    """Whether SPICE can run without a download: its CoreNLP jars are already in place."""
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap.spice")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return all((lib / jar).is_file() for jar in SPICE_JARS)


def score_captions(
    captions: Mapping[str, str], references: Mapping[str, Sequence[str]], spice: bool = False
) -> dict[str, float]:
    """BLEU-4, METEOR, ROUGE-L, CIDEr (and SPICE when asked) of one caption per key against its
    references, as pycocoevalcap computes them. Every key of ``captions`` needs references."""
    return score_caption_sets({"": captions}, references, spice)[""]


def score_caption_sets(
    sets: Mapping[str, Mapping[str, str]],
    references: Mapping[str, Sequence[str]],
    spice: bool = False,
    per_item: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, dict[str, float]]:
    """``score_captions`` for several caption sets (e.g. stages of a run) at once: one tokenizer
    call and one METEOR process for all of them, since each Java start costs seconds. With
    ``per_item`` (a dict to fill), each set's per-caption METEOR and CIDEr, in sorted key order,
    are put there too (for confidence intervals)."""
    if shutil.which("java") is None:
        raise EvaluationError("METEOR and the PTB tokenizer need Java 8+ on PATH (apt-get install default-jre)")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as exc:
        raise EvaluationError("`mils eval` needs pycocoevalcap: pip install 'mils-pipeline[eval]'") from exc
    if not sets or not all(sets.values()):
        raise EvaluationError("no captions to evaluate")
    keys = sorted({k for captions in sets.values() for k in captions})
    raw: dict[str, list[dict[str, str]]] = {f"ref\x00{k}": [{"caption": r} for r in references[k]] for k in keys}
    for name, captions in sets.items():
        raw.update({f"{name}\x00hyp\x00{k}": [{"caption": c}] for k, c in captions.items()})
    tokens = PTBTokenizer().tokenize(raw)
    meteor = Meteor()
    out: dict[str, dict[str, float]] = {}
    try:
        for name, captions in sets.items():
            ids = sorted(captions)
            gts = {i: tokens[f"ref\x00{i}"] for i in ids}
            res = {i: tokens[f"{name}\x00hyp\x00{i}"] for i in ids}
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            meteor_score, meteor_items = meteor.compute_score(gts, res)
            cider_score, cider_items = Cider().compute_score(gts, res)
            scores = {"BLEU-4": float(bleu[3]), "METEOR": float(meteor_score)}
            scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
            scores["CIDEr"] = float(cider_score)
            if per_item is not None:
                per_item[name] = {
                    "METEOR": [float(v) for v in meteor_items],
                    "CIDEr": [float(v) for v in cider_items],
                }
            if spice:
                from pycocoevalcap.spice.spice import Spice

                scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
            out[name] = scores
    finally:
        _close_meteor(meteor)
    return out


def _close_meteor(meteor: Any) -> None:
    """Stop METEOR's Java subprocess now rather than whenever the object is collected (closing
    it twice, as its own __del__ later does, is harmless)."""
    process = getattr(meteor, "meteor_p", None)
    if process is None or process.poll() is not None:
        return
    with meteor.lock:
        process.stdin.close()
        process.kill()
        process.wait()


def evaluate(captions: Sequence[Mapping[str, str]], references: Mapping[str, Sequence[str]]) -> EvaluationReport:
    """Metrics overall and per modality. Captions without references are counted and left out
    (they are reported, never silently dropped); so are references without a caption."""
    matched = [c for c in captions if references.get(c["key"])]
    keys = {c["key"] for c in captions}
    counts = {
        "captions": len(captions),
        "without_references": len(captions) - len(matched),
        "references_without_caption": len(
            {id(v) for v in references.values()} - {id(references[k]) for k in keys if k in references}
        ),
    }
    if not matched:
        sample = ", ".join(sorted(keys)[:3])
        raise EvaluationError(
            f"none of the {len(captions)} caption keys (e.g. {sample}) has references; check that the "
            "references use the same keys (COCO: image id or file name without extension)"
        )
    notes = []
    spice = spice_available()
    if not spice:
        notes.append(
            "SPICE omitted: it needs Stanford CoreNLP 3.6.0 jars in pycocoevalcap/spice/lib, which are "
            "downloaded on first use; run SPICE once with network to fetch them."
        )
    groups: dict[str, list[Mapping[str, str]]] = {"all": matched}
    for row in matched:
        groups.setdefault(row["modality"], []).append(row)
    if len(groups) == 2:  # one modality: its group repeats "all"
        groups = {"all": matched}
    scores = {}
    for name, rows in groups.items():
        scores[name] = score_captions({r["key"]: r["caption"] for r in rows}, references, spice=spice)
        counts[name] = len(rows)
    return EvaluationReport(scores=scores, counts=counts, notes=notes)


def write_report(report: EvaluationReport, out: str) -> tuple[str, str]:
    """``<out>.json`` and ``<out>.md``, each written whole."""
    from mils_pipeline.io.sink import write_bytes_whole

    base = out.removesuffix(".json").removesuffix(".md")
    write_bytes_whole(f"{base}.json", report.to_json().encode())
    write_bytes_whole(f"{base}.md", report.to_markdown().encode())
    return f"{base}.json", f"{base}.md"
