"""`mils rescore` of a real small run (tiny open_clip scorer, word operators): every kept candidate
scored again by a real scorer (the run's own, or the bundled toy-world judge toy-audit), with both
scores, the lineage and the two scorers' agreement checked against an independent computation;
locally, on S3 (moto) and as a Prefect flow on a real server; reruns, refusals and failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from scipy.stats import ConstantInputWarning, spearmanr

from mils_pipeline.config import RunConfig, ScorerConfig
from mils_pipeline.errors import ConfigError
from mils_pipeline.media import decode
from mils_pipeline.rescore import RescoreError, rescore_config, rescore_dataset
from mils_pipeline.run import caption_dataset
from mils_pipeline.score import build_scorer
from mils_pipeline.seeding import write_seed_pool
from mils_pipeline.text import normalise_text
from mils_pipeline.toyworld.corpus import scorer_settings
from tests.conftest import BUCKET, run_settings, tiny_scorer_settings
from tests.test_cli import mils
from tests.test_export import source_media
from tests.test_pipeline import write_corpus
from tests.test_s3 import env_for


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos, small_pool_texts) -> Path:
    """Photos captioned by the tiny open_clip scorer and the word operators; bad samples quarantined."""
    root = tmp_path_factory.mktemp("rescore")
    write_corpus(root / "in", photos)
    pool = write_seed_pool(small_pool_texts, root / "pools", {"theme": "test"})
    settings = run_settings((root / "pools", pool.id), max_rounds=1, top_k=3, operators=["crossover"])
    caption_dataset(str(root / "in"), str(root / "out"), RunConfig.model_validate(settings))
    return root / "out"


@pytest.fixture(scope="module")
def audited(dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The dataset rescored by the bundled toy-world audit judge through the CLI."""
    out = tmp_path_factory.mktemp("audited") / "out"
    result = mils("rescore", str(dataset), str(out), "--scorer", "toy-audit", "--set", "scorer.device=cpu")
    assert result.returncode == 0, result.stderr
    return out, result


def rows_of(dataset: Path) -> list[dict]:
    return pq.read_table(dataset / "data").to_pylist()


def manifests_of(dataset: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((dataset / "_manifests").glob("*.json"))}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_scores(dataset: Path, rows: list[dict], settings: dict) -> list[np.ndarray]:
    """Each row's kept candidates scored by the scorer of ``settings``, computed here: media from
    the source shards, one embedding each, dot products with the candidates' text embeddings."""
    scorer = build_scorer(ScorerConfig(**settings, device="cpu"), "image")
    media = source_media(dataset)
    out = []
    for row in rows:
        _, data = media[(row["source_shard"], row["key"], row["media_sha256"])]
        image = scorer.embed_media([decode("image", data, **scorer.decode_options)])[0]
        out.append(scorer.embed_texts([normalise_text(c["text"]) for c in row["candidates"]]) @ image)
    return out


def test_rescore_by_the_runs_own_scorer_reproduces_every_candidate_score(dataset, tmp_path):
    scorer_file = tmp_path / "scorer.yaml"
    scorer_file.write_text(yaml.safe_dump({"scorer": tiny_scorer_settings()}))
    result = mils("rescore", str(dataset), str(tmp_path / "again"), "--scorer", str(scorer_file), "--quiet")
    assert result.returncode == 0, result.stderr
    parent, rows = rows_of(dataset), rows_of(tmp_path / "again")
    assert [r["key"] for r in rows] == [r["key"] for r in parent]
    # the same texts and media through the same weights; only float rounding differs (texts are
    # encoded in other batches than in the run: 5e-5 seen), far below the gaps between candidates
    for row in rows:
        old = [c["score"] for c in row["candidates"]]
        assert [c["rescore"] for c in row["candidates"]] == pytest.approx(old, abs=5e-4)
        assert row["rescore"] == pytest.approx(row["score"], abs=5e-4)
        assert row["rescore_best"] == pytest.approx(max(old), abs=5e-4)
    summary = json.loads((tmp_path / "again" / "rescore.json").read_text())
    assert summary["agreement"]["item_rank_correlation"] == pytest.approx(1.0)


@pytest.mark.filterwarnings(f"ignore::{ConstantInputWarning.__module__}.{ConstantInputWarning.__name__}")
def test_a_bundled_judge_rescores_every_kept_candidate_beside_the_runs_scores(dataset, audited):
    out, result = audited
    parent, rows = rows_of(dataset), rows_of(out)
    assert [r["key"] for r in rows] == [r["key"] for r in parent]
    expected = expected_scores(dataset, rows, scorer_settings("toy-audit"))
    for old, row, scores in zip(parent, rows, expected, strict=True):
        # the parent's columns are carried as they were: caption, score, candidates, provenance
        for column in ("caption", "score", "config_sha256", "run_id", "prompt_sha256", "media_sha256"):
            assert row[column] == old[column]
        assert [(c["text"], c["score"]) for c in row["candidates"]] == [
            (c["text"], c["score"]) for c in old["candidates"]
        ]
        new = [c["rescore"] for c in row["candidates"]]
        assert new == pytest.approx(list(scores), abs=1e-5)
        best = int(np.argmax(new))
        assert row["rescore_caption"] == row["candidates"][best]["text"]
        assert row["rescore_best"] == pytest.approx(new[best])
        assert row["rescore"] == pytest.approx(new[[c["text"] for c in row["candidates"]].index(row["caption"])])
        old_scores = [c["score"] for c in row["candidates"]]
        correlation = float(spearmanr(old_scores, new).statistic)  # NaN: a side is constant, undefined
        if np.isnan(correlation):
            assert row["rescore_rank_correlation"] is None
        else:
            assert row["rescore_rank_correlation"] == pytest.approx(correlation, abs=1e-5)
        assert row["rescore_scorer"]["model"] == "toy-audit"
        assert row["rescore_scorer"]["revision"].startswith("sha256:")
    assert len({(r["rescore_id"], r["rescore_run_id"]) for r in rows}) == 1

    # lineage: each shard's manifest names the parent dataset, its config hash and run id
    parents = manifests_of(dataset)
    for shard, manifest in manifests_of(out).items():
        lineage = manifest["rescore"]["parent"]
        assert lineage["dataset"] == str(dataset)
        assert lineage["config_sha256"] == parents[shard]["config_sha256"]
        assert lineage["run_id"] == parents[shard]["run_id"]
        assert manifest["input"] == parents[shard]["input"]  # the media stay findable (export, report)
        assert manifest["rescore"]["rows"] == sum(r["source_shard"] == shard for r in rows)
    # quarantined samples have no rows and stay out; the parent's quarantine is carried over
    quarantined = pq.read_table(dataset / "quarantine").to_pylist()
    assert quarantined and pq.read_table(out / "quarantine").to_pylist() == quarantined
    assert not {r["key"] for r in rows} & {q["key"] for q in quarantined if q["error_type"] != "duplicate_key"}

    # agreement: rank correlation of the item scores and the share of items whose best caption changes
    scores, new_scores = [r["score"] for r in rows], [r["rescore"] for r in rows]
    changed = sum(r["rescore_caption"] != r["caption"] for r in rows)
    summary = json.loads((out / "rescore.json").read_text())
    figures = summary["agreement"]
    assert figures["items"] == len(rows)
    assert figures["item_rank_correlation"] == pytest.approx(spearmanr(scores, new_scores).statistic)
    assert figures["best_caption_changed"] == changed
    assert figures["best_caption_changed_share"] == pytest.approx(changed / len(rows))
    assert summary["parent"]["config_sha256"] == sorted({r["config_sha256"] for r in parent})
    assert summary["parent"]["run_id"] == sorted({r["run_id"] for r in parent})
    assert summary["scorer"]["model"] == "toy-audit"
    assert f"best caption changed for {changed} items" in result.stdout
    assert f"rank correlation of item scores {figures['item_rank_correlation']:.3f}" in result.stdout

    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert "rescored" in header["tags"] and header["model_licenses"]["rescore scorer"].startswith("apache-2.0")
    assert "## Rescore: a second scorer's view" in card
    assert f"| {len(rows)} | {figures['item_rank_correlation']:.3f} |" in card
    assert f"`{summary['parent']['config_sha256'][0]}`" in card and f"`{summary['parent']['run_id'][0]}`" in card
    assert "| the run's scorer, caption |" in card and "| new scorer, caption |" in card


def test_a_rerun_writes_nothing_and_another_scorer_into_the_same_out_is_refused(dataset, audited):
    out, _ = audited
    before = files_of(out)
    again = mils("rescore", str(dataset), str(out), "--scorer", "toy-audit", "--set", "scorer.device=cpu", "-q")
    assert again.returncode == 0, again.stderr
    assert "0 rescored, 2 already done, 0 failed" in again.stdout
    assert files_of(out) == before  # no duplicated rows, no rewritten file

    other = mils("rescore", str(dataset), str(out), "--scorer", "toy-scorer", "-q")
    assert other.returncode == 2
    assert "rescored with another scorer" in other.stderr and "new location" in other.stderr
    assert files_of(out) == before

    # a run stopped after its last shard and before its card: the rerun writes the card, nothing else
    (out / "rescore.json").unlink()
    (out / "README.md").unlink()
    healed = mils("rescore", str(dataset), str(out), "--scorer", "toy-audit", "--set", "scorer.device=cpu", "-q")
    assert healed.returncode == 0, healed.stderr
    summary = json.loads((out / "rescore.json").read_text())
    assert summary["rescore_id"] == json.loads(before["rescore.json"])["rescore_id"]
    assert (out / "README.md").is_file()
    after = files_of(out)
    assert {k: v for k, v in after.items() if k.startswith(("data/", "_manifests/"))} == {
        k: v for k, v in before.items() if k.startswith(("data/", "_manifests/"))
    }


def test_out_that_is_or_lies_inside_the_dataset_is_refused(dataset):
    config = rescore_config(str(dataset), "toy-audit")
    before = files_of(dataset)
    for out in (dataset, dataset / "rescored", dataset.parent):
        with pytest.raises(RescoreError, match="never written in place"):
            rescore_dataset(str(dataset), str(out), config)
    assert files_of(dataset) == before


def test_a_rescored_dataset_is_not_rescored_again(audited, tmp_path):
    out, _ = audited
    result = mils("rescore", str(out), str(tmp_path / "twice"), "--scorer", "toy-scorer")
    assert result.returncode == 2 and "is itself a rescore of" in result.stderr
    assert not (tmp_path / "twice").exists()


def test_the_scorer_must_be_named_and_known(dataset, tmp_path):
    result = mils("rescore", str(dataset), str(tmp_path / "a"))
    assert result.returncode == 2 and "say which scorer" in result.stderr
    result = mils("rescore", str(dataset), str(tmp_path / "b"), "--scorer", "siglip-please")
    assert result.returncode == 2 and "neither a bundled scorer" in result.stderr
    result = mils("rescore", str(dataset), str(tmp_path / "c"), "--scorer", "toy-audit", "--set", "scorer.backend=clap")
    assert result.returncode == 2 and "does not score image" in result.stderr
    with pytest.raises(ConfigError, match="one scorer"):
        rescore_config(str(dataset), config={"scorer": tiny_scorer_settings(), "extra_scorers": [{}]})
    assert not any((tmp_path / name).exists() for name in "abc")


# Run in a fresh interpreter: each call of the JSON list argv[1] (["cli", args...] or [a function
# of mils_pipeline.rescore, url]) with the native threads (Arrow's pools, BLAS, torch) started by then.
THREADS_AROUND = """
import importlib, json, os, sys, threading
from mils_pipeline import cli, rescore

def native_threads():
    return len(os.listdir("/proc/self/task"))

def call(name, *args):
    if ":" in name:  # another module's reader, "module:function"
        module, _, function = name.partition(":")
        return type(getattr(importlib.import_module(module), function)(*args)).__name__
    if name != "cli":
        return type(getattr(rescore, name)(*args)).__name__
    try:
        return cli.main(list(args))
    except SystemExit as exc:  # argparse refuses with exit code 2
        return exc.code

cli.build_parser()  # what importing the commands' modules starts is the baseline
before = native_threads()
seen = [(call(*c), native_threads() - before) for c in json.loads(sys.argv[1])]
print(json.dumps({"seen": seen, "python": [t.name for t in threading.enumerate()]}))
"""


def threads_around(calls: list[list[str]]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", THREADS_AROUND, json.dumps(calls)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_a_refusal_starts_no_thread_that_could_outlive_the_process(dataset, audited, tmp_path):
    # A refusal ends the process at once: a thread it started (an Arrow pool task holding a Python
    # file) could still run at interpreter exit and abort it (SIGABRT, "terminate called without
    # an active exception") instead of exiting with 2, seen about once in 20 refusals before.
    out, _ = audited
    clap = ["cli", "rescore", str(dataset), str(tmp_path / "c"), "--scorer", "toy-audit"]
    seen = threads_around(
        [
            [*clap, "--set", "scorer.backend=clap"],  # refused after reading the dataset's modality
            ["cli", "rescore", str(dataset), str(dataset / "inside"), "--scorer", "toy-audit"],
            ["cli", "export", str(dataset), str(tmp_path / "e"), "--top-fraction", "7"],
            ["dataset_modality", str(dataset)],
            ["read_agreement_columns", str(out)],
            ["_read_parquet", str(out / "data" / "part-shard-000.parquet")],
            # the other readers of a dataset's Parquet through Python files: the card, the report
            ["mils_pipeline.run.card:_scores", str(dataset)],
            ["mils_pipeline.html_report.dataset:open_dataset", str(out)],
            ["mils_pipeline.html_report.dataset:read_quarantine", str(dataset), 10],
        ]
    )
    # (result, native threads started), one per call
    assert seen["seen"] == [
        *([2, 0], [2, 0], [2, 0], ["str", 0], ["Table", 0], ["Table", 0]),
        *(["ndarray", 0], ["Dataset", 0], ["tuple", 0]),
    ]
    assert seen["python"] == ["MainThread"]
    assert not any((tmp_path / name).exists() for name in "ce")


def test_a_missing_source_shard_fails_that_shard_alone_and_a_rerun_does_only_it(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    manifest = copy / "_manifests" / "shard-001.json"
    original = manifest.read_text()
    body = json.loads(original)
    body["input"]["url"] = str(tmp_path / "gone" / "shard-001.tar")
    manifest.write_text(json.dumps(body))
    out = tmp_path / "out"

    result = mils("rescore", str(copy), str(out), "--scorer", "toy-audit", "-q")
    assert result.returncode == 2
    assert "1 rescored, 0 already done, 1 failed" in result.stdout
    assert "shard-001" in result.stderr and "missing" in result.stderr and "gone" in result.stderr
    assert sorted(p.name for p in (out / "data").iterdir()) == ["part-shard-000.parquet"]
    assert sorted(manifests_of(out)) == ["shard-000"]

    manifest.write_text(original)  # the source is back where the run read it
    result = mils("rescore", str(copy), str(out), "--scorer", "toy-audit", "-q")
    assert result.returncode == 0, result.stderr
    assert "1 rescored, 1 already done, 0 failed" in result.stdout
    assert sorted(r["key"] for r in rows_of(out)) == sorted(r["key"] for r in rows_of(dataset))


def test_the_html_report_shows_both_scores_and_their_agreement(audited):
    from mils_pipeline.export import export_dataset
    from mils_pipeline.html_report import write_report

    out, _ = audited
    report_dir = out.parent / "report"
    write_report(str(out), out=str(report_dir))
    figures = json.loads((out / "rescore.json").read_text())["agreement"]
    index = (report_dir / "index.html").read_text()
    assert 'id="agreement"' in index and "toy-audit" in index
    assert f"<td>{figures['item_rank_correlation']:.3f}</td>" in index
    assert f"<td>{figures['best_caption_changed']} ({figures['best_caption_changed_share']:.1%})</td>" in index
    gallery = json.loads((report_dir / "data" / "gallery.js").read_text().removeprefix("MILS.gallery(")[:-3])
    rows = {r["key"]: r for r in rows_of(out)}
    for item in gallery["items"]:
        assert item["rescore"] == pytest.approx(rows[item["key"]]["rescore"], abs=1e-4)
        assert item["rescoreCaption"] == rows[item["key"]]["rescore_caption"]
    details = (report_dir / "data" / "items-0.js").read_text()
    assert details.count('"rescore":') == sum(len(r["candidates"]) for r in rows.values())

    # the rescored dataset is a dataset like any other: its media export from the source shards
    assert export_dataset(str(out), str(out.parent / "export")).samples == len(rows)


def test_rescore_from_and_to_s3(s3, s3_endpoint, photos, pool_dir, tmp_path):
    write_corpus(tmp_path / "in", photos)
    s3.put(str(tmp_path / "in"), f"{BUCKET}/in", recursive=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_settings(pool_dir, max_rounds=1, top_k=3, operators=["crossover"])))

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mils_pipeline.cli", *args, "--quiet"]
        return subprocess.run(command, capture_output=True, text=True, env=env_for(s3_endpoint), timeout=600)

    captions, rescored = f"s3://{BUCKET}/captions", f"s3://{BUCKET}/rescored"
    assert run("caption", f"s3://{BUCKET}/in", captions, "-c", str(config)).returncode == 0
    result = run("rescore", captions, rescored, "--scorer", "toy-audit")
    assert result.returncode == 0, result.stderr
    s3.get(rescored.removeprefix("s3://"), str(tmp_path / "rescored"), recursive=True)
    s3.get(captions.removeprefix("s3://"), str(tmp_path / "captions"), recursive=True)
    parent, rows = rows_of(tmp_path / "captions"), rows_of(tmp_path / "rescored")
    assert [r["key"] for r in rows] == [r["key"] for r in parent]
    assert all(c["rescore"] is not None for r in rows for c in r["candidates"])
    for shard, manifest in manifests_of(tmp_path / "rescored").items():
        assert manifest["input"]["url"] == f"s3://{BUCKET}/in/{shard}.tar"
        assert manifest["rescore"]["parent"]["dataset"] == captions
    summary = json.loads((tmp_path / "rescored" / "rescore.json").read_text())
    assert summary["agreement"]["items"] == len(rows)
    assert "## Rescore" in (tmp_path / "rescored" / "README.md").read_text()

    again = run("rescore", captions, rescored, "--scorer", "toy-audit")
    assert again.returncode == 0 and "0 rescored, 2 already done" in again.stdout
    refused = run("rescore", captions, f"{captions}/rescored", "--scorer", "toy-audit")
    assert refused.returncode == 2 and "never written in place" in refused.stderr


def test_media_stored_in_the_rows_need_no_source_shards(photos, pool_dir, tmp_path):
    write_corpus(tmp_path / "in", photos)
    settings = run_settings(pool_dir, max_rounds=0, top_k=3, operators=["crossover"])
    settings["output"] = {"include_media": True}
    caption_dataset(str(tmp_path / "in"), str(tmp_path / "captions"), RunConfig.model_validate(settings))
    expected = expected_scores(tmp_path / "captions", rows_of(tmp_path / "captions"), scorer_settings("toy-audit"))
    shutil.rmtree(tmp_path / "in")  # the rows hold their media: the source shards are not read

    report = rescore_dataset(
        str(tmp_path / "captions"), str(tmp_path / "out"), rescore_config(str(tmp_path / "captions"), "toy-audit")
    )
    rows = rows_of(tmp_path / "out")
    assert report.figures["items"] == len(rows) == len(expected) > 0
    for row, scores in zip(rows, expected, strict=True):
        assert row["image"]["bytes"]  # the media column is carried too
        assert [c["rescore"] for c in row["candidates"]] == pytest.approx(list(scores), abs=1e-5)

    # media the new scorer cannot decode: the row goes to quarantine with the decoder's reason, not away
    part = tmp_path / "captions" / "data" / "part-shard-000.parquet"
    table = pq.read_table(part)
    damaged = table.to_pylist()
    damaged[0]["image"] = {"bytes": b"not an image", "path": damaged[0]["image"]["path"]}
    pq.write_table(pa.Table.from_pylist(damaged, schema=table.schema), part)
    report = rescore_dataset(
        str(tmp_path / "captions"), str(tmp_path / "out2"), rescore_config(str(tmp_path / "captions"), "toy-audit")
    )
    assert sum(o.quarantined for o in report.outcomes) == 1
    assert damaged[0]["key"] not in {r["key"] for r in rows_of(tmp_path / "out2")}
    assert len(rows_of(tmp_path / "out2")) == len(rows) - 1
    [new] = [q for q in pq.read_table(tmp_path / "out2" / "quarantine").to_pylist() if q["key"] == damaged[0]["key"]]
    assert new["run_id"] == report.run_id and new["error_type"] and new["message"]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_rescore_dataset_flow_on_a_prefect_server(prefect_server, dataset, tmp_path):
    from flows.rescore import rescore_dataset_flow
    from tests.test_flows import artifacts

    out = str(tmp_path / "audited")
    summary = rescore_dataset_flow(str(dataset), out, scorer="toy-audit", overrides=["scorer.device=cpu"])
    assert summary["shards"] == {"shard-000": "done", "shard-001": "done"}
    assert summary["items"] == len(rows_of(dataset)) == len(rows_of(tmp_path / "audited"))
    assert summary["report"] == str(tmp_path / "audited" / "report" / "index.html")
    assert 'id="agreement"' in (tmp_path / "audited" / "report" / "index.html").read_text()
    [agreement] = artifacts(key="mils-rescore-agreement")
    assert "rank correlation of item scores" in agreement.data
    assert artifacts(key="mils-rescore-shards")

    again = rescore_dataset_flow(str(dataset), out, scorer="toy-audit", overrides=["scorer.device=cpu"])
    assert again["shards"] == {"shard-000": "skipped", "shard-001": "skipped"}
    assert len(rows_of(tmp_path / "audited")) == summary["items"]


def test_readme_rescore_command_as_written(dataset, tmp_path):
    from tests.doc_commands import run_script, shell_blocks
    from tests.test_doc_commands import _env

    (block,) = [b for b in shell_blocks() if b.document == "README.md" and "mils rescore" in b.text]
    shutil.copytree(dataset, tmp_path / "mils-demo" / "captions")
    script = "\n".join(c.text for c in block.commands)
    result = run_script(script, tmp_path, _env(tmp_path))
    assert result.returncode == 0, f"{script}\n{result.stderr}"
    rows = rows_of(tmp_path / "mils-demo" / "audited")
    assert len(rows) == len(rows_of(dataset))
    assert {r["rescore_scorer"]["model"] for r in rows} == {"toy-audit"}
