"""`mils estimate`: counting a corpus from tar headers, a pilot captioned by the real run driver
(SmolLM2 through llama.cpp, the tiny open_clip scorer), extrapolation with intervals, the GPU
budget a flow enforces, locally and on S3 (moto)."""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.cli import main
from mils_pipeline.config import RunConfig
from mils_pipeline.costs import cost_model, gpu_names
from mils_pipeline.errors import ConfigError
from mils_pipeline.estimate import (
    BOOTSTRAP_RESAMPLES,
    FIGURES,
    CorpusCount,
    GpuBudgetExceededError,
    IndexedSample,
    Interval,
    ShardIndex,
    check_gpu_budget,
    count_corpus,
    enforce_gpu_budget,
    estimate_corpus,
    estimate_markdown,
    extrapolate,
    index_tar,
)
from mils_pipeline.io.manifest import read_manifests
from mils_pipeline.io.shards import iter_samples, list_shards, write_shard
from mils_pipeline.io.storage import configure_storage
from mils_pipeline.policy import PolicyError
from mils_pipeline.run import caption_dataset
from tests.conftest import BUCKET, run_settings

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")


def write_four_shards(directory: Path, photos: dict[str, bytes]) -> int:
    """4 shards of 4 photos each, and one sample without an image (quarantined); returns the samples."""
    for shard in range(4):
        samples = [(f"s{shard}_{n}", {"jpg": photos[PHOTOS[(shard + n) % len(PHOTOS)]]}) for n in range(4)]
        if shard == 2:
            samples.insert(1, ("s2_notes", {"txt": b"no image here"}))
        write_shard(str(directory / f"shard-{shard:03d}.tar"), samples)
    return 17


def run_yaml(path: Path, pool_dir, **optimize) -> Path:
    path.write_text(yaml.safe_dump(run_settings(pool_dir, **optimize)))
    return path


def actual_figures(output: Path) -> dict[str, float]:
    manifests = read_manifests(str(output)).values()
    rows = pq.read_table(output / "data").to_pylist()
    return {
        "completion_tokens": sum(m["cost"]["loop"]["completion_tokens"] for m in manifests),
        "prompt_tokens": sum(m["cost"]["loop"]["prompt_tokens"] for m in manifests),
        "text_encodes": sum(r["cost"]["texts_encoded"] for r in rows),
        "media_encodes": sum(r["cost"]["media_encoded"] for r in rows),
    }


def test_estimate_of_a_four_shard_corpus_brackets_the_actual_runs_tokens(tmp_path, photos, pool_dir, capsys):
    samples = write_four_shards(tmp_path / "in", photos)
    config = run_yaml(tmp_path / "run.yaml", pool_dir, max_rounds=2)
    code = main(
        [
            "estimate",
            str(tmp_path / "in"),
            "-c",
            str(config),
            "--pilot",
            "8",
            "--json",
            str(tmp_path / "est.json"),
            "-q",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "items:         16 [16 - 16] with image media (counted from tar headers; 17 [17 - 17] samples)" in printed
    assert "GPU-hours on H100-80GB:" in printed
    estimate = json.loads((tmp_path / "est.json").read_text())
    assert estimate["items"]["point"] == samples - 1 and estimate["items_exact"]
    assert estimate["pilot_items"] == 8

    started = time.perf_counter()
    assert main(["caption", str(tmp_path / "in"), str(tmp_path / "out"), "-c", str(config), "-q"]) == 0
    actual = {**actual_figures(tmp_path / "out"), "wall_seconds": time.perf_counter() - started}
    tokens = estimate["totals"]["completion_tokens"]
    print(f"\npilot-vs-actual: {json.dumps({'estimate': estimate['totals'], 'actual': actual})}")
    assert actual["completion_tokens"] > 0 and tokens["low"] > 0
    assert tokens["low"] <= actual["completion_tokens"] <= tokens["high"]
    assert tokens["low"] < tokens["point"] < tokens["high"]  # a pilot of 8 of 17 items leaves some spread
    assert estimate["totals"]["media_encodes"]["point"] == pytest.approx(16, abs=3)  # one encode per image
    assert estimate["totals"]["gpu_hours"]["point"] > 0
    # cost is GPU-hours at the cost model's price
    hours, cost = estimate["totals"]["gpu_hours"], estimate["totals"]["cost_usd"]
    assert cost["high"] == pytest.approx(hours["high"] * cost_model("image").usd_per_hour)


def test_estimate_from_s3_counts_as_locally_and_pilots_the_source_bytes(s3, s3_endpoint, photos, pool_dir, tmp_path):
    write_four_shards(tmp_path / "in", photos)
    for tar in sorted((tmp_path / "in").glob("*.tar")):
        s3.put_file(str(tar), f"{BUCKET}/corpus/{tar.name}")
    settings = run_settings(pool_dir, max_rounds=1)
    settings["storage"] = {"endpoint_url": s3_endpoint}
    config = RunConfig.model_validate(settings)
    configure_storage(config.storage)
    local = count_corpus(list_shards(str(tmp_path / "in")))
    remote = count_corpus(list_shards(f"s3://{BUCKET}/corpus"))
    assert [c.samples for c in remote.counted] == [c.samples for c in local.counted]

    estimate = estimate_corpus(
        f"s3://{BUCKET}/corpus", config, pilot=4, gpu="A100-80GB", work_dir=str(tmp_path / "work")
    )
    assert estimate.items.point == 16 and estimate.pilot_items == 4 and estimate.gpu == "A100-80GB"
    assert estimate.totals["completion_tokens"].low > 0
    # the pilot's shards hold the source samples byte for byte
    source = {s.key: s.members for tar in (tmp_path / "in").glob("*.tar") for s in iter_samples(str(tar))}
    pilot = [s for tar in (tmp_path / "work" / "pilot-shards").glob("*.tar") for s in iter_samples(str(tar))]
    assert len(pilot) == 4 and all(sample.members == source[sample.key] for sample in pilot)


class CountingReader(io.RawIOBase):
    """A file that counts the bytes read from it."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "rb")
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer) -> int:
        data = self.file.read(len(buffer))
        buffer[: len(data)] = data
        self.bytes_read += len(data)
        return len(data)

    def close(self) -> None:
        self.file.close()
        super().close()


def test_a_key_in_two_shards_is_two_pilot_items(tmp_path, photos, pool_dir):
    write_shard(str(tmp_path / "in" / "a.tar"), [("000", {"jpg": photos["astronaut"]})])
    write_shard(str(tmp_path / "in" / "b.tar"), [("000", {"jpg": photos["rocket"]})])
    config = RunConfig.model_validate(run_settings(pool_dir, max_rounds=1, operators=["crossover"]))
    estimate = estimate_corpus(str(tmp_path / "in"), config, pilot=2, work_dir=str(tmp_path / "work"))
    assert estimate.pilot_captioned == 2 and estimate.pilot_quarantined == 0
    keys = pq.read_table(tmp_path / "work" / "pilot-captions" / "data").column("key").to_pylist()
    assert sorted(keys) == ["a/000", "b/000"]


def test_a_policy_that_limits_paths_needs_a_work_dir_for_the_pilot(tmp_path, photos, pool_dir, monkeypatch):
    write_four_shards(tmp_path / "in", photos)
    config = RunConfig.model_validate(run_settings(pool_dir, max_rounds=1, operators=["crossover"]))
    monkeypatch.setenv("MILS_SOURCE_PREFIXES", f"{tmp_path / 'in'},{tmp_path / 'work'}")
    monkeypatch.setenv("MILS_OUTPUT_PREFIXES", f"{tmp_path / 'work'},{pool_dir[0]}")
    with pytest.raises(PolicyError, match="--work-dir"):
        estimate_corpus(str(tmp_path / "in"), config, pilot=2)
    estimate = estimate_corpus(str(tmp_path / "in"), config, pilot=2, work_dir=str(tmp_path / "work"))
    assert estimate.pilot_captioned == 2
    with pytest.raises(ConfigError, match="not empty"):  # a second pilot never reads the first one's manifests
        estimate_corpus(str(tmp_path / "in"), config, pilot=2, work_dir=str(tmp_path / "work"))


def test_counting_reads_tar_headers_not_media(tmp_path):
    rng = random.Random(0)
    samples = [(f"clip{i}", {"mp4": rng.randbytes(500_000), "json": b"{}"}) for i in range(6)]
    write_shard(str(tmp_path / "big.tar"), samples)
    reader = CountingReader(tmp_path / "big.tar")
    indexed, damage = index_tar(reader)
    reader.close()
    assert damage is None
    assert [s.key for s in indexed] == [s.key for s in iter_samples(str(tmp_path / "big.tar"))]
    assert [len(s.members) for s in indexed] == [2] * 6
    assert reader.bytes_read < 0.01 * (tmp_path / "big.tar").stat().st_size


def test_a_damaged_shard_counts_the_samples_before_the_damage(tmp_path):
    write_shard(str(tmp_path / "whole.tar"), [(f"k{i}", {"txt": b"x" * 3000}) for i in range(5)])
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    with open(tmp_path / "cut.tar", "rb") as fh:
        indexed, damage = index_tar(fh)
    assert damage and 0 < len(indexed) < 5


def test_a_large_corpus_is_counted_from_a_sample_of_shards_with_an_interval(tmp_path):
    rng = random.Random(1)
    total = 0
    for shard in range(12):
        items = rng.randint(3, 9)
        total += items
        write_shard(
            str(tmp_path / f"shard-{shard:02d}.tar"),
            [(f"s{shard}_{i}", {"jpg": rng.randbytes(rng.randint(1500, 2500))}) for i in range(items)],
        )
    count = count_corpus(list_shards(str(tmp_path)), count_shards=4, seed=3)
    assert not count.exact and len(count.counted) == 4 and count.shards == 12
    assert count.items.low < count.items.high
    assert count.items.low <= total <= count.items.high
    every = count_corpus(list_shards(str(tmp_path)), count_shards=12)
    assert every.exact and every.items.point == total


def test_a_run_over_budget_is_refused_with_the_figures(tmp_path, photos, pool_dir):
    write_four_shards(tmp_path / "in", photos)
    config = RunConfig.model_validate(run_settings(pool_dir, max_rounds=1, operators=["crossover"]))
    with pytest.raises(GpuBudgetExceededError) as refused:
        check_gpu_budget(str(tmp_path / "in"), config, max_gpu_hours=1e-9, pilot=3)
    estimate = refused.value.estimate
    hours = estimate.totals["gpu_hours"]
    assert 0 <= hours.low <= hours.point < hours.high
    message = str(refused.value)
    assert f"up to {hours.high:,.3g} GPU-hours on H100-80GB" in message and "max_gpu_hours=1e-09" in message
    assert estimate.totals["completion_tokens"].point == 0  # word operators only: no LLM
    enforce_gpu_budget(estimate, max_gpu_hours=hours.high * 2)  # within budget: no error
    markdown = estimate_markdown(estimate, max_gpu_hours=1e-9)
    assert "| GPU-hours |" in markdown and "| items | 16 | 16 - 16 |" in markdown and "**refused**" in markdown
    with pytest.raises(ConfigError, match="max_gpu_hours"):
        check_gpu_budget(str(tmp_path / "in"), config, max_gpu_hours=0)


def test_the_interval_covers_the_total_as_often_as_it_says():
    """Many pilots of 8 from one population of 17 items (measured SmolLM2 completion tokens per
    item, a quarantined sample at 0): the 95% interval holds the total about 95% of the time."""
    tokens = np.array([81, 108, 59, 54, 40, 89, 64, 37, 0, 92, 91, 37, 55, 76, 57, 60, 57], dtype=float)
    population = np.zeros((len(tokens), len(FIGURES)))
    population[:, 0] = tokens
    items = [IndexedSample(f"k{i}", ((f"k{i}.jpg", 512, 1),)) for i in range(len(tokens))]
    count = CorpusCount(
        shards=4,
        bytes=0,
        counted=[ShardIndex(None, items)],
        items=Interval(17, 17, 17),
        samples=Interval(17, 17, 17),
        exact=True,
        draws=np.full(BOOTSTRAP_RESAMPLES, 17.0),
    )
    rng = np.random.default_rng(0)
    trials = 400
    covered = 0
    for _ in range(trials):
        pilot = population[rng.choice(len(tokens), size=8, replace=False)]
        _, totals = extrapolate(pilot, count, 0.95, rng)
        covered += totals["completion_tokens"].low <= tokens.sum() <= totals["completion_tokens"].high
    assert 0.91 <= covered / trials <= 0.99


def test_a_budget_check_before_a_rerun_leaves_out_the_shards_already_done(tmp_path, photos, pool_dir):
    write_four_shards(tmp_path / "in", photos)
    config = RunConfig.model_validate(run_settings(pool_dir, max_rounds=1, operators=["crossover"]))
    caption_dataset(str(tmp_path / "in"), str(tmp_path / "out"), config, select=["shard-00[012]"])
    estimate = check_gpu_budget(str(tmp_path / "in"), config, 1.0, pilot=2, output=str(tmp_path / "out"))
    assert estimate.shards == 1 and estimate.items.point == 4  # shard-003 only
    caption_dataset(str(tmp_path / "in"), str(tmp_path / "out"), config)
    done = check_gpu_budget(str(tmp_path / "in"), config, 1e-9, output=str(tmp_path / "out"))
    assert done.shards == 0 and done.pilot_items == 0 and done.totals["gpu_hours"].high == 0


def test_named_gpus_scale_the_reference_prices():
    reference = cost_model("image")
    assert cost_model("image", "H100-80GB") == reference and gpu_names()[0] == reference.gpu
    a100 = cost_model("image", "A100-80GB")
    assert a100.completion_token > reference.completion_token and a100.media_encode > reference.media_encode
    assert a100.usd_per_hour < reference.usd_per_hour
    with pytest.raises(ConfigError, match="known GPUs: H100-80GB"):
        cost_model("image", "TPU-v9")


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--pilot", "1"], "at least 2 items"), (["--gpu", "TPU-v9"], "known GPUs"), (["--confidence", "2"], "between")],
)
def test_bad_estimate_options_are_refused_with_the_fix(tmp_path, photos, pool_dir, capsys, flags, message):
    write_four_shards(tmp_path / "in", photos)
    config = run_yaml(tmp_path / "run.yaml", pool_dir)
    assert main(["estimate", str(tmp_path / "in"), "-c", str(config), *flags, "-q"]) == 2
    assert message in capsys.readouterr().err


def test_readme_estimate_command_as_written(tmp_path, photos, pool_dir):
    from tests.doc_commands import run_script, shell_blocks
    from tests.test_doc_commands import _env, tiny_run_yaml

    (block,) = [b for b in shell_blocks() if b.document == "README.md" and "mils estimate" in b.text]
    write_four_shards(tmp_path / "shards", photos)
    tiny_run_yaml(tmp_path / "run.yaml", pool_dir)
    script = "\n".join(c.text for c in block.commands)
    result = run_script(script, tmp_path, _env(tmp_path))
    assert result.returncode == 0, f"{script}\n{result.stderr}"
    assert "items:         16 [16 - 16]" in result.stdout and "GPU-hours on A100-80GB:" in result.stdout
