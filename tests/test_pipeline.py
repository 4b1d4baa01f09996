"""Shards in, Parquet out, end to end: real tars, real SmolLM2, real (tiny) open_clip."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import OutputError, ShardReadError
from mils_pipeline.io.shards import write_shard
from mils_pipeline.run import build_runtime, caption_dataset
from tests.conftest import run_settings

DESIGN_COLUMNS = {
    "key": pa.string(),
    "source_shard": pa.string(),
    "modality": pa.string(),
    "media_sha256": pa.string(),
    "caption": pa.string(),
    "score": pa.float32(),
    "rounds": pa.int32(),
    "stop_reason": pa.string(),
    "prompt_sha256": pa.string(),
    "config_sha256": pa.string(),
    "seed_pool_id": pa.string(),
    "run_id": pa.string(),
}


def write_corpus(directory: Path, photos: dict[str, bytes]) -> None:
    write_shard(
        str(directory / "shard-000.tar"),
        [
            ("astronaut", {"jpg": photos["astronaut"], "json": b'{"source": "skimage"}'}),
            ("chelsea", {"jpg": photos["chelsea"]}),
            ("notes", {"txt": b"no image in this sample"}),
        ],
    )
    write_shard(
        str(directory / "shard-001.tar"),
        [
            ("rocket", {"jpg": photos["rocket"]}),
            ("broken", {"jpg": photos["coffee"][:150]}),
            ("empty", {"png": b""}),
            ("camera", {"jpg": photos["camera"]}),
            ("rocket", {"jpg": photos["coins"]}),
        ],
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, photos, small_pool_texts):
    from mils_pipeline.seeding import write_seed_pool

    root = tmp_path_factory.mktemp("run")
    write_corpus(root / "in", photos)
    pool = write_seed_pool(small_pool_texts, root / "pools", {"theme": "test"})
    config = RunConfig.model_validate(run_settings((root / "pools", pool.id), max_rounds=1, top_k=3))
    runtime = build_runtime(config)
    summary = caption_dataset(str(root / "in"), str(root / "out"), config, runtime=runtime)
    yield root, config, runtime, summary
    runtime.close()


def test_every_captionable_sample_becomes_one_row_with_the_design_columns(finished_run):
    root, config, runtime, _ = finished_run
    table = pq.read_table(root / "out" / "data")
    assert sorted(table.column("key").to_pylist()) == ["astronaut", "camera", "chelsea", "rocket"]
    for name, type_ in DESIGN_COLUMNS.items():
        assert table.schema.field(name).type == type_, name
    for name in ("candidates", "trajectory", "generator", "scorer", "created_at", "cost"):
        assert name in table.schema.names
    row = table.to_pylist()[0]
    assert row["modality"] == "image"
    assert row["config_sha256"] == config.config_sha256()
    assert row["seed_pool_id"] == runtime.seed_pool.id
    assert row["generator"]["backend"] == "llamacpp" and row["generator"]["revision"].startswith("sha256:")
    assert row["scorer"]["revision"] == "random-init:seed=0"
    assert row["caption"] == row["candidates"][0]["text"]
    assert row["score"] == pytest.approx(row["candidates"][0]["score"])
    assert [r["round"] for r in row["trajectory"]] == list(range(row["rounds"] + 1))
    assert set(row["candidates"][0]) == {"text", "score", "round", "components", "operator", "truncated"}
    # the tiny scorer reads 32 tokens: no caption of at most 10 words is cut
    assert not any(c["truncated"] for c in row["candidates"]) and all(r["truncated"] == 0 for r in row["trajectory"])
    assert [c["name"] for c in row["candidates"][0]["components"]] == ["image"]
    assert [(s["name"], s["weight"]) for s in row["scorers"]] == [("image", 1.0)]
    assert row["created_at"].tzinfo is not None


def test_bad_samples_are_quarantined_with_their_reason(finished_run):
    root, *_ = finished_run
    rows = pq.read_table(root / "out" / "quarantine").to_pylist()
    reasons = {(r["source_shard"], r["key"]): r["error_type"] for r in rows}
    assert reasons == {
        ("shard-000", "notes"): "no_media",
        ("shard-001", "broken"): "corrupt",
        ("shard-001", "empty"): "empty",
        ("shard-001", "rocket"): "duplicate_key",
    }
    assert all(r["message"] for r in rows)


def test_manifests_record_input_config_and_counts(finished_run):
    root, config, _, summary = finished_run
    manifest = json.loads((root / "out" / "_manifests" / "shard-001.json").read_text())
    assert manifest["config_sha256"] == config.config_sha256()
    assert manifest["rows"] == 2 and manifest["quarantined"] == 3
    assert manifest["input"]["size"] == (root / "in" / "shard-001.tar").stat().st_size
    assert manifest["cost"]["loop"]["completion_tokens"] > 0
    assert summary.rows == 4 and summary.quarantined == 4


def test_dataset_card_header_is_yaml_with_data_files(finished_run):
    root, *_ = finished_run
    text = (root / "out" / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["configs"][0]["data_files"][0]["path"] == "data/part-*.parquet"
    assert "random" in text.lower()
    assert "image preprocessing: open_clip's own" in text  # random weights: nothing to follow


def test_rerun_with_same_config_writes_nothing(finished_run):
    root, config, runtime, _ = finished_run
    out = root / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    summary = caption_dataset(str(root / "in"), str(out), config, runtime=runtime)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert summary.skipped == 2 and summary.rows == 0
    assert before == after


def test_new_config_on_the_same_output_is_refused_not_overwritten(finished_run):
    root, config, _, _ = finished_run
    out = root / "out"
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}
    changed = config.model_copy(update={"optimize": config.optimize.model_copy(update={"top_k": 4})})
    with pytest.raises(OutputError, match="new dataset version"):
        caption_dataset(str(root / "in"), str(out), changed)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()} == before


def test_truncated_shard_keeps_what_came_before_and_quarantines_the_rest(finished_run, tmp_path, photos):
    _, config, runtime, _ = finished_run
    source = tmp_path / "in"
    write_shard(str(source / "cut.tar"), [(n, {"jpg": photos[n]}) for n in ("astronaut", "chelsea", "coffee")])
    with tarfile.open(source / "cut.tar") as tar:
        coffee = tar.getmember("coffee.jpg")
    data = (source / "cut.tar").read_bytes()
    (source / "cut.tar").write_bytes(data[: coffee.offset_data + 100])
    summary = caption_dataset(str(source), str(tmp_path / "out"), config, runtime=runtime)
    assert summary.rows == 2
    assert pq.read_table(tmp_path / "out" / "data").column("key").to_pylist() == ["astronaut", "chelsea"]
    quarantine = pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
    assert [(q["key"], q["error_type"]) for q in quarantine] == [("coffee", "damaged_shard")]
    assert "coffee" in quarantine[0]["message"]
    manifest = json.loads((tmp_path / "out" / "_manifests" / "cut.json").read_text())
    assert manifest["status"] == "done" and manifest["rows"] == 2 and manifest["quarantined"] == 1


def test_file_urls_and_media_bytes_in_the_output(finished_run, tmp_path, photos):
    _, config, runtime, _ = finished_run
    write_shard(str(tmp_path / "in" / "one.tar"), [("coffee", {"jpg": photos["coffee"]})])
    with_media = config.model_copy(update={"output": config.output.model_copy(update={"include_media": True})})
    runtime.config = with_media
    try:
        caption_dataset(f"file://{tmp_path}/in", f"file://{tmp_path}/out", with_media, runtime=runtime)
    finally:
        runtime.config = config
    row = pq.read_table(tmp_path / "out" / "data").to_pylist()[0]
    assert row["image"]["bytes"] == photos["coffee"] and row["image"]["path"] == "coffee.jpg"


def with_unloadable_models(config: RunConfig, directory: Path) -> RunConfig:
    """``config`` naming model files that do not exist: a run that loaded any model would fail on them."""
    generator = config.generator.model_copy(update={"model": str(directory / "no-such-model.gguf")})
    scorer = config.scorer.model_copy(update={"checkpoint": str(directory / "no-such-weights.pt")})
    return config.model_copy(update={"generator": generator, "scorer": scorer})


def test_missing_source_and_empty_directory_are_clear_errors_before_any_model_loads(finished_run, tmp_path):
    _, config, _, _ = finished_run
    unloadable = with_unloadable_models(config, tmp_path)
    with pytest.raises(ShardReadError, match="does not exist"):
        caption_dataset(str(tmp_path / "nowhere"), str(tmp_path / "out"), unloadable)
    with pytest.raises(ShardReadError, match=r"no \.tar shards"):
        caption_dataset(str(tmp_path), str(tmp_path / "out"), unloadable)


def test_unwritable_output_fails_before_any_work(finished_run, tmp_path):
    root, config, _, _ = finished_run
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="cannot write"):
        caption_dataset(str(root / "in"), str(blocker / "out"), with_unloadable_models(config, tmp_path))


def test_local_output_loads_with_datasets(finished_run):
    import datasets

    root, *_ = finished_run
    dataset = datasets.load_dataset(
        "parquet", data_files=str(root / "out" / "data" / "*.parquet"), split="train", cache_dir=str(root / "hf-cache")
    )
    assert dataset.num_rows == 4
    assert dataset.features["candidates"].feature["text"].dtype == "string"
    assert sorted(dataset["key"]) == ["astronaut", "camera", "chelsea", "rocket"]


def test_card_and_manifests_carry_cost_figures(finished_run):
    root, *_ = finished_run
    card = (root / "out" / "README.md").read_text()
    assert "## Cost" in card and "completion tokens" in card
    manifest = json.loads((root / "out" / "_manifests" / "shard-000.json").read_text())
    loop, encoder = manifest["cost"]["loop"], manifest["cost"]["text_encoder"]
    assert loop["prompt_tokens"] > 0 and loop["generate_calls"] >= 1 and loop["media_encoded"] == 2
    assert encoder["requested"] >= encoder["encoded"] >= 0
    assert 0 < loop["useful_completion_tokens"] <= loop["completion_tokens"]
    assert sum(loop["completion_tokens_by_round"].values()) == loop["completion_tokens"]
    assert "useful token share" in card
    assert re.search(r"By round: round 1: \d+% of \d+", card)  # per round, as in manifests and --profile


def test_word_operators_alone_never_load_the_llm_and_provenance_says_so(tmp_path, photos, small_pool_texts):
    from mils_pipeline.errors import GenerationError
    from mils_pipeline.generate import UnusedGenerator
    from mils_pipeline.seeding import write_seed_pool

    write_corpus(tmp_path / "in", photos)
    pool = write_seed_pool(small_pool_texts, tmp_path / "pools", {"theme": "test"})
    settings = run_settings((tmp_path / "pools", pool.id), max_rounds=1, top_k=3, operators=["crossover"])
    settings["generator"]["model"] = str(tmp_path / "no-such-model.gguf")  # loading it would fail the run
    runtime = build_runtime(RunConfig.model_validate(settings))
    assert isinstance(runtime.generator, UnusedGenerator)
    with pytest.raises(GenerationError, match="add an LLM operator"):
        runtime.generator.generate(["a prompt"], runtime.optimizer._sampling("rewrite"), [0])
    summary = caption_dataset(str(tmp_path / "in"), str(tmp_path / "out"), runtime.config, runtime=runtime)
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert summary.rows == len(rows) == 4
    for row in rows:
        assert row["generator"]["revision"] == "not loaded"
        assert row["generator"]["model"].endswith("no-such-model.gguf")
        assert {c["operator"] for c in row["candidates"]} <= {"seed", "crossover"}
        assert row["cost"]["completion_tokens"] == 0
    runtime.close()
