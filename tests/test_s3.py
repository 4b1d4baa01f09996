"""Object storage for real: a moto S3 server on loopback, reached through s3fs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from mils_pipeline.io.shards import write_shard
from tests.conftest import BUCKET, readable_text, run_settings


def upload_shards(s3, prefix: str, photos: dict[str, bytes], tmp_path, names: list[str]) -> None:
    for name in names:
        local = tmp_path / f"{name}.tar"
        write_shard(str(local), [(f"{name}_{n}", {"jpg": photos[n]}) for n in ("astronaut", "coins")])
        s3.put_file(str(local), f"{BUCKET}/{prefix}/{name}.tar")


def env_for(endpoint: str, offline: bool = True) -> dict[str, str]:
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    if not offline:
        # datasets refuses every remote path, s3:// included, in offline mode
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(key, None)
    return env


def mils(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mils_pipeline.cli", *args, "--quiet"],
        capture_output=True,
        text=True,
        env=env_for(endpoint),
        timeout=600,
    )


def snapshot(s3) -> dict[str, str]:
    s3.invalidate_cache()
    return {path: s3.info(path)["ETag"] for path in s3.find(f"{BUCKET}/out")}


def test_caption_from_s3_to_s3_then_rerun_and_backfill(s3, s3_endpoint, photos, pool_dir, tmp_path):
    upload_shards(s3, "in", photos, tmp_path, ["shard-000", "shard-001"])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_settings(pool_dir, max_rounds=1)))

    first = mils(s3_endpoint, "caption", f"s3://{BUCKET}/in", f"s3://{BUCKET}/out", "-c", str(config))
    assert first.returncode == 0, first.stderr
    assert "items:         4 captioned" in first.stdout
    objects = snapshot(s3)
    assert {p.removeprefix(f"{BUCKET}/out/") for p in objects} == {
        "README.md",
        "score_histogram.png",
        "data/part-shard-000.parquet",
        "data/part-shard-001.parquet",
        "quarantine/part-shard-000.parquet",
        "quarantine/part-shard-001.parquet",
        "_manifests/shard-000.json",
        "_manifests/shard-001.json",
    }
    manifest = json.loads(s3.cat_file(f"{BUCKET}/out/_manifests/shard-000.json"))
    assert manifest["input"]["etag"] and manifest["input"]["url"] == f"s3://{BUCKET}/in/shard-000.tar"
    assert "testing" not in json.dumps(manifest)

    rerun = mils(s3_endpoint, "caption", f"s3://{BUCKET}/in", f"s3://{BUCKET}/out", "-c", str(config))
    assert rerun.returncode == 0 and "(2 already done, skipped)" in rerun.stdout
    assert snapshot(s3) == objects

    upload_shards(s3, "in", photos, tmp_path, ["shard-002"])
    backfill = mils(s3_endpoint, "caption", f"s3://{BUCKET}/in", f"s3://{BUCKET}/out", "-c", str(config))
    assert backfill.returncode == 0 and "items:         2 captioned" in backfill.stdout
    after = snapshot(s3)
    untouched = {p: e for p, e in after.items() if "shard-000" in p or "shard-001" in p}
    assert untouched == {p: e for p, e in objects.items() if p in untouched}
    assert f"{BUCKET}/out/data/part-shard-002.parquet" in after

    load = subprocess.run(
        [
            sys.executable,
            "-c",
            "import datasets, json; ds = datasets.load_dataset('parquet', "
            f"data_files='s3://{BUCKET}/out/data/*.parquet', split='train'); "
            "print(json.dumps({'rows': ds.num_rows, 'keys': sorted(ds['key'])}))",
        ],
        capture_output=True,
        text=True,
        env=env_for(s3_endpoint, offline=False),
        timeout=300,
    )
    assert load.returncode == 0, load.stderr
    loaded = json.loads(load.stdout.strip().splitlines()[-1])
    assert loaded["rows"] == 6 and len(set(loaded["keys"])) == 6

    card = s3.cat_file(f"{BUCKET}/out/README.md").decode()
    header = yaml.safe_load(card.split("---")[1])
    assert header["configs"][0]["data_files"][0]["path"] == "data/part-*.parquet"
    assert "| 3 | 6 | 0 |" in card


def test_endpoint_from_the_config_instead_of_the_environment(s3, s3_endpoint, photos, pool_dir, tmp_path):
    upload_shards(s3, "in", photos, tmp_path, ["shard-000"])
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({**run_settings(pool_dir, max_rounds=1), "storage": {"endpoint_url": s3_endpoint}})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mils_pipeline.cli",
            "caption",
            f"s3://{BUCKET}/in",
            f"s3://{BUCKET}/out2",
            "-c",
            str(config),
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert s3.exists(f"{BUCKET}/out2/data/part-shard-000.parquet")


def test_missing_bucket_is_a_clear_error(s3_endpoint, tmp_path):
    result = mils(s3_endpoint, "caption", "s3://no-such-bucket/in", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no-such-bucket" in result.stderr and "Traceback" not in result.stderr


def test_credentials_never_reach_logs_manifests_parquet_or_the_card(s3, s3_endpoint, photos, pool_dir, tmp_path):
    upload_shards(s3, "in", photos, tmp_path, ["shard-000"])
    secret = "mils-test-secret-Zq81xV"  # moto accepts any credentials
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_settings(pool_dir, max_rounds=0)))
    env = {**env_for(s3_endpoint), "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": secret + "-token"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mils_pipeline.cli",
            "-v",
            "caption",
            f"s3://{BUCKET}/in",
            f"s3://{BUCKET}/out",
            "-c",
            str(config),
            "--profile",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "botocore" in result.stderr  # debug logging of the S3 client was on, and is clean
    assert secret not in result.stdout + result.stderr
    s3.invalidate_cache()
    written = s3.find(f"{BUCKET}/out")
    assert any(p.endswith(".parquet") for p in written) and any(p.endswith("README.md") for p in written)
    for path in written:
        data = s3.cat_file(path)
        assert secret.encode() not in data, path
        assert secret not in readable_text(path, data), path  # Parquet pages are compressed: search the rows
    (part,) = [p for p in written if p.endswith("data/part-shard-000.parquet")]
    assert "shard-000_astronaut" in readable_text(part, s3.cat_file(part))  # the decoded search sees the rows
