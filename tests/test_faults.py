"""Faults during real runs: a killed process, an object store that goes away, a full disk, an
output without write permission. Each costs a retry or a rerun, never a lost or duplicated row,
and no reader ever sees a partial file."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import OutputError
from mils_pipeline.run import build_runtime, caption_dataset
from tests.conftest import run_settings
from tests.fleet import free_port
from tests.watch import VisibleFilesWatcher, dataset_keys, write_corpus


def _mils(*args: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start `mils`; with ``log``, its stderr goes to that file (a pipe nobody reads while the run
    goes on would fill up and block a chatty, debug-logging child)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mils_pipeline.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if log is None else log.open("w"),
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def _config_file(tmp_path: Path, pool_dir, **extra) -> Path:
    settings = run_settings(pool_dir, max_rounds=1)
    settings.update(extra)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _wait_for(predicate, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before the fault could be injected: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run to reach the fault point")
        time.sleep(0.05)


def test_sigkill_midway_then_rerun_gives_every_sample_exactly_once(tmp_path, photos, pool_dir):
    keys = write_corpus(tmp_path / "in", photos, shards=4, per_shard=2)
    config = _config_file(tmp_path, pool_dir)
    out = tmp_path / "out"
    watcher = VisibleFilesWatcher(out)
    watcher.start()
    run = _mils("caption", str(tmp_path / "in"), str(out), "-c", str(config), "-q")
    _wait_for(lambda: (out / "_manifests" / "s0.json").exists(), timeout=900, process=run)
    run.send_signal(signal.SIGKILL)  # shard s1 is under way
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL
    done_before_rerun = sorted(p.stem for p in (out / "_manifests").glob("*.json"))
    assert done_before_rerun and len(done_before_rerun) < 4

    rerun = _mils("caption", str(tmp_path / "in"), str(out), "-c", str(config), "-q")
    stdout, stderr = rerun.communicate(timeout=900)
    watcher.stop.set()
    watcher.join()
    assert rerun.returncode == 0, stderr
    assert f"({len(done_before_rerun)} already done, skipped)" in stdout
    assert sorted(dataset_keys(out)) == sorted(keys)  # all there, none twice
    assert watcher.problems == [] and watcher.reads > 0
    assert not list(out.rglob("*.tmp"))


def test_s3_server_stopped_and_restarted_mid_run_costs_retries_not_data(tmp_path, photos, pool_dir, monkeypatch):
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    credentials = {"AWS_ACCESS_KEY_ID": "faults", "AWS_SECRET_ACCESS_KEY": "faults", "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in credentials.items():  # s3fs in this process; the subprocess gets them in its env
        monkeypatch.setenv(name, value)
    try:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir("faults")
        keys = write_corpus(tmp_path / "in", photos, shards=16, per_shard=1)
        fs.put(str(tmp_path / "in") + "/", "faults/in/", recursive=True)
        # seeds only (no refinement rounds): shards go by in a fraction of a second, so the
        # outage below surely falls on S3 requests
        config = _config_file(
            tmp_path, pool_dir, storage={"endpoint_url": endpoint, "max_attempts": 20}, optimize={"max_rounds": 0}
        )
        log = tmp_path / "run.log"
        run = _mils(
            "-v", "caption", "s3://faults/in", "s3://faults/out", "-c", str(config), "-q", env=credentials, log=log
        )
        _wait_for(lambda: fs.exists("faults/out/_manifests/s0.json"), timeout=900, process=run)
        server.stop()
        time.sleep(6)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # moto keeps its buckets in this process: the same data comes back
        run.communicate(timeout=900)
        stderr = log.read_text()
        assert run.returncode == 0, stderr[-3000:]
        assert "Retry needed" in stderr or "Retryable error" in stderr  # the outage was met, and retried
        fs.invalidate_cache()
        assert len(fs.ls("faults/out/_manifests")) == 16
        assert sorted(dataset_keys("faults/out/data", fs)) == sorted(keys)
    finally:
        server.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 512 KiB mounted for the test (needs root with CAP_SYS_ADMIN, as on the
    project's machines and CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs to fill it; mount failed: {result.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_is_a_clear_error_with_no_partial_file_and_a_rerun_completes(small_disk, tmp_path, photos, pool_dir):
    keys = write_corpus(tmp_path / "in", photos, shards=1, per_shard=4)
    config = RunConfig.model_validate(run_settings(pool_dir, max_rounds=0))
    out = small_disk / "out"
    filler = small_disk / "filler"
    free = os.statvfs(small_disk)
    with open(filler, "wb") as fh:  # leave one page free: the dataset's files cannot fit
        fh.write(b"\0" * (free.f_bavail * free.f_frsize - 4096))
    runtime = build_runtime(config)
    try:
        with pytest.raises(OutputError, match="free space") as failure:
            caption_dataset(str(tmp_path / "in"), str(out), config, runtime=runtime)
        assert "No space left on device" in str(failure.value)  # the cause, not only the advice
        assert not (out / "_manifests" / "s0.json").exists()
        assert not list(out.rglob("*.tmp"))
        for part in out.rglob("*.parquet"):
            pq.read_table(part)  # anything visible is whole

        filler.unlink()
        summary = caption_dataset(str(tmp_path / "in"), str(out), config, runtime=runtime)
    finally:
        runtime.close()
    assert summary.rows == 4
    assert sorted(dataset_keys(out)) == sorted(keys)


def test_output_without_write_permission_fails_before_any_work(tmp_path, photos, pool_dir):
    write_corpus(tmp_path / "in", photos, shards=1, per_shard=1)
    settings = run_settings(pool_dir, max_rounds=1)  # model files that do not exist: loading any would fail
    settings["generator"]["model"] = str(tmp_path / "no-such-model.gguf")
    settings["scorer"]["checkpoint"] = str(tmp_path / "no-such-weights.pt")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    command = [sys.executable, "-m", "mils_pipeline.cli", "caption", str(tmp_path / "in"), str(locked / "out")]
    command += ["-c", str(config), "-q"]
    if os.geteuid() == 0:  # root writes anywhere: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.fail("running as root, this test needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    assert "cannot write" in result.stderr and "permissions" in result.stderr
    assert "Permission denied" in result.stderr  # the cause, not only the advice every OSError gets
    assert "Traceback" not in result.stderr and "no-such" not in result.stderr  # no model was loaded
    assert not (locked / "out").exists()
    with contextlib.suppress(OSError):
        locked.chmod(0o755)
