"""`mils eval`: pycocoevalcap metrics on hand-made reference sets whose scores are worked out
here, independently of the library (BLEU and ROUGE-L by their formulas, CIDEr-D re-implemented)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mils_pipeline.errors import EvaluationError
from mils_pipeline.evaluate import evaluate, load_captions, load_references, score_captions


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _cider_d(candidates: dict[str, str], references: dict[str, list[str]]) -> float:
    """CIDEr-D as Vedantam et al. define it and the COCO code runs it: tf-idf n-gram vectors
    (n = 1..4, idf over the reference sets), clipped candidate counts, a Gaussian length penalty
    (sigma 6), averaged over references and n, times 10."""
    refs = {k: [r.split() for r in v] for k, v in references.items()}
    df: Counter = Counter()
    for sentences in refs.values():
        df.update({g for s in sentences for n in range(1, 5) for g in _ngrams(s, n)})
    log_n = math.log(len(refs))

    def vector(words: list[str], n: int) -> tuple[dict, float]:
        counts = _ngrams(words, n)
        vec = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in counts.items()}
        return vec, math.sqrt(sum(v * v for v in vec.values()))

    total = 0.0
    for key, text in candidates.items():
        cand = text.split()
        per_n = []
        for n in range(1, 5):
            vc, nc = vector(cand, n)
            score = 0.0
            for ref in refs[key]:
                vr, nr = vector(ref, n)
                dot = sum(min(vc[g], vr[g]) * vr[g] for g in vc if g in vr)
                if nc and nr:
                    score += dot / (nc * nr) * math.exp(-((len(cand) - len(ref)) ** 2) / (2 * 6.0**2))
            per_n.append(score / len(refs[key]))
        total += 10 * sum(per_n) / 4
    return total / len(candidates)


REFERENCES = {
    "a": ["a red circle on the left", "a small red circle at the left"],
    "b": ["a blue square at the top", "a large blue square near the top"],
    "c": ["two green triangles on a white background"],
}


def test_captions_equal_to_a_reference_score_one_on_bleu_and_rouge():
    captions = {k: v[0] for k, v in REFERENCES.items()}
    scores = score_captions(captions, REFERENCES)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr"] == pytest.approx(_cider_d(captions, REFERENCES), abs=1e-6)


def test_one_changed_word_gives_the_hand_computed_bleu_and_rouge():
    # "a red circle on the right" vs "a red circle on the left": matching n-grams 5/6, 4/5, 3/4, 2/3,
    # equal length (no brevity penalty); longest common subsequence 5 of 6 words.
    scores = score_captions({"x": "a red circle on the right"}, {"x": ["a red circle on the left"]})
    assert scores["BLEU-4"] == pytest.approx((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(5 / 6, abs=1e-6)


def test_cider_matches_an_independent_cider_d_on_partial_matches():
    captions = {"a": "a red circle at the left", "b": "a blue square", "c": "green triangles on white"}
    scores = score_captions(captions, REFERENCES)
    expected = _cider_d(captions, REFERENCES)
    assert expected > 0.5  # the case is not degenerate
    assert scores["CIDEr"] == pytest.approx(expected, rel=1e-6)


def test_meteor_ranks_exact_over_one_word_off_over_unrelated():
    refs = {"x": ["a large red circle in the middle of a black background"]}
    exact = score_captions({"x": refs["x"][0]}, refs)["METEOR"]
    close = score_captions({"x": "a large red circle in the middle of a white background"}, refs)["METEOR"]
    unrelated = score_captions({"x": "two dogs playing football"}, refs)["METEOR"]
    assert exact > close > unrelated
    assert unrelated == pytest.approx(0.0, abs=1e-6)


def _write_run(path, rows):
    (path / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "data" / "part-000.parquet")


def test_eval_reads_a_run_and_coco_references_and_reports_per_modality(tmp_path):
    run = tmp_path / "run"
    _write_run(
        run,
        [
            {"key": "a", "caption": "a red circle on the left", "modality": "image"},
            {"key": "b", "caption": "a blue square at the top", "modality": "image"},
            {"key": "zzz", "caption": "no references for this one", "modality": "image"},
        ],
    )
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "annotations": [
            {"image_id": i, "caption": c} for i, key in ((1, "a"), (2, "b"), (3, "c")) for c in REFERENCES[key]
        ],
    }
    (tmp_path / "refs.json").write_text(json.dumps(coco))
    report = evaluate(load_captions(str(run)), load_references(str(tmp_path / "refs.json")))
    assert report.counts["captions"] == 3
    assert report.counts["without_references"] == 1
    assert report.counts["references_without_caption"] == 1
    assert report.counts["all"] == 2
    assert report.scores["all"]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert "| all | 2 |" in report.to_markdown()


def test_parquet_references_one_caption_per_row_equal_a_list_column(tmp_path):
    rows = [{"key": k, "caption": c} for k, v in REFERENCES.items() for c in v]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "long.parquet")
    listed = [{"key": k, "references": v} for k, v in REFERENCES.items()]
    pq.write_table(pa.Table.from_pylist(listed), tmp_path / "listed.parquet")
    assert load_references(str(tmp_path / "long.parquet")) == load_references(str(tmp_path / "listed.parquet"))


def test_no_matching_keys_is_an_evaluation_error():
    with pytest.raises(EvaluationError, match="has references"):
        evaluate([{"key": "q", "caption": "x y", "modality": "image"}], REFERENCES)


def test_mils_eval_writes_json_and_markdown(tmp_path):
    run = tmp_path / "run"
    _write_run(run, [{"key": k, "caption": v[0], "modality": "image"} for k, v in REFERENCES.items()])
    pq.write_table(
        pa.Table.from_pylist([{"key": k, "references": v} for k, v in REFERENCES.items()]), tmp_path / "refs.parquet"
    )
    out = tmp_path / "report"
    references = str(tmp_path / "refs.parquet")
    result = subprocess.run(
        [sys.executable, "-m", "mils_pipeline.cli", "eval", str(run), references, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["scores"]["all"]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert set(data["scores"]["all"]) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert "SPICE omitted" in (tmp_path / "report.md").read_text()
