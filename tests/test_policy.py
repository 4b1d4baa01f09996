"""The worker policy holds the trust boundary: whoever can create a flow run chooses its parameters,
and the worker refuses what its own environment does not allow, before any model loads or any byte
is read or written.

Through a real Prefect server: the `gpu` pool is created with deploy/'s locked base job template and
the `caption_shard/gpu` deployment from deploy/prefect.yaml; two process workers serve it, one on
the queue `closed` (default policy, prefixes set) and one on the queue `open` (policy opened in its
environment). The attacks are flow-run parameters. Fast checks of the rules and of the CLI follow.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from mils_pipeline.config import ScorerConfig, config_from_dict
from mils_pipeline.errors import ModelUnavailableError
from mils_pipeline.io.shards import ShardInfo, list_shards, write_shard
from mils_pipeline.policy import PolicyError, check_run
from mils_pipeline.score import build_scorer
from mils_pipeline.seeding import write_seed_pool
from tests.av_models import save_tiny_clap_checkpoint
from tests.conftest import run_settings, tiny_scorer_settings
from tests.fleet import PREFECT, REPO, prefect, prefect_env, stop  # noqa: F401 (prefect_env: a fixture)

SECRET_VARIABLE = "MILS_TEST_WORKER_SECRET"
SECRET = "worker-secret-5f0c2a9e"
POLICY_VARIABLES = (
    "MILS_POLICY_FILE",
    "MILS_ALLOW_PIPE_URLS",
    "MILS_API_KEY_VARIABLES",
    "MILS_GENERATOR_BASE_URLS",
    "MILS_SOURCE_PREFIXES",
    "MILS_OUTPUT_PREFIXES",
    "MILS_MODEL_DIRS",
    "OPENAI_BASE_URL",
)


class Attacker:
    """A loopback HTTP server that records every request (and its Authorization header)."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                received.append((self.command, self.path, self.headers.get("Authorization")))
                self.send_response(404)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = _record

            def log_message(self, *args) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Fleet:
    """The server's environment, the places the workers' policies name, and one way to submit and
    wait for `caption_shard/gpu` runs."""

    def __init__(self, env: dict[str, str], root: Path, pool_id: str, attacker: Attacker) -> None:
        self.env, self.root, self.pool_id, self.attacker = env, root, pool_id, attacker

    def config(self, **sections: Any) -> dict[str, Any]:
        config = run_settings((self.root / "pools", self.pool_id), max_rounds=0)
        return {**config, **sections}

    def run(self, queue: str, *units: tuple[dict, str, dict], job_variables: dict | None = None) -> list:
        """Submit (shard, output, config) units of one shard each to a queue; the final flow runs, in order."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("caption_shard/gpu")
            ids = [
                client.create_flow_run_from_deployment(
                    deployment.id,
                    parameters={"shards": [shard], "output": output, "config": config},
                    work_queue_name=queue,
                    job_variables=job_variables,
                ).id
                for shard, output, config in units
            ]
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                runs = [client.read_flow_run(run_id) for run_id in ids]
                if all(run.state is not None and run.state.is_final() for run in runs):
                    return runs
                time.sleep(1)
        logs = "\n".join(p.read_text()[-2000:] for p in self.root.glob("worker-*.log"))
        pytest.fail(f"flow runs did not finish: {[r.state for r in runs]}\n{logs}")


@pytest.fixture(scope="module")
def fleet(prefect_env, tmp_path_factory, photos, small_pool_texts):  # noqa: F811 (the imported fixture)
    env = prefect_env
    root = tmp_path_factory.mktemp("fleet")
    template = "deploy/process-base-job-template.json"  # the locked one: no flow run sets env or command
    prefect(env, "work-pool", "create", "gpu", "--type", "process", "--base-job-template", template)
    for queue in ("closed", "open"):
        prefect(env, "work-queue", "create", queue, "--pool", "gpu")
    prefect(env, "--no-prompt", "deploy", "--name", "gpu", "--prefect-file", "deploy/prefect.yaml")

    for where in ("in", "private"):
        write_shard(str(root / where / "s.tar"), [("coins", {"jpg": photos["coins"]})])
    pool = write_seed_pool(small_pool_texts, root / "pools", {"theme": "test"})
    (root / "private" / "pool.txt").write_text("\n".join(small_pool_texts[:50]) + "\n")
    (root / "models").mkdir()
    attacker = Attacker()

    base = {k: v for k, v in env.items() if k not in POLICY_VARIABLES} | {SECRET_VARIABLE: SECRET}
    policies = {
        "closed": {  # the defaults, and the prefixes a fleet sets
            "MILS_SOURCE_PREFIXES": str(root / "in"),
            "MILS_OUTPUT_PREFIXES": f"{root / 'out'},{root / 'pools'}",
            "MILS_MODEL_DIRS": str(root / "models"),
        },
        "open": {
            "MILS_ALLOW_PIPE_URLS": "true",
            "MILS_API_KEY_VARIABLES": f"OPENAI_API_KEY,{SECRET_VARIABLE}",
            "MILS_GENERATOR_BASE_URLS": attacker.url,
        },
    }
    workers = []
    for queue, policy in policies.items():
        log = open(root / f"worker-{queue}.log", "w")
        command = [PREFECT, "worker", "start", "--pool", "gpu", "--work-queue", queue, "--name", queue, "--limit", "2"]
        workers.append(
            subprocess.Popen(
                command, env=base | policy, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
            )
        )
    yield Fleet(env, root, pool.id, attacker)
    for process in workers:
        stop(process)
    attacker.close()


def shard_of(url_or_dir: str) -> dict:
    if url_or_dir.startswith("pipe:"):
        return ShardInfo(url=url_or_dir, name="pipe-s", size=0, etag=None, mtime=None).to_dict()
    (shard,) = list_shards(url_or_dir)
    return shard.to_dict()


def pipe_unit(fleet: Fleet, tag: str) -> tuple[tuple[dict, str, dict], Path]:
    marker = fleet.root / f"{tag}-command-ran"
    shard = shard_of(f"pipe:touch {marker} && cat {fleet.root / 'in' / 's.tar'}")
    return (shard, str(fleet.root / "out" / tag), fleet.config(storage={"allow_pipe_urls": True})), marker


def secret_unit(fleet: Fleet, tag: str) -> tuple[dict, str, dict]:
    generator = {"backend": "openai", "base_url": fleet.attacker.url, "api_key_env": SECRET_VARIABLE, "max_retries": 0}
    return shard_of(str(fleet.root / "in")), str(fleet.root / "out" / tag), fleet.config(generator=generator)


def paths_unit(fleet: Fleet, tag: str) -> tuple[tuple[dict, str, dict], Path]:
    outside = fleet.root / f"{tag}-elsewhere"
    seed_pool = {"pool": str(fleet.root / "private" / "pool.txt"), "dir": str(fleet.root / "pools")}
    return (shard_of(str(fleet.root / "private")), str(outside), fleet.config(seed_pool=seed_pool)), outside


def refusal(run) -> str:
    assert run.state.is_failed(), run.state
    assert "PolicyError" in run.state.message, run.state.message
    return run.state.message


def test_a_pipe_url_is_refused_on_the_worker_and_its_command_never_runs(fleet):
    unit, marker = pipe_unit(fleet, "closed-pipe")
    (run,) = fleet.run("closed", unit)
    assert "MILS_ALLOW_PIPE_URLS" in refusal(run)
    assert not marker.exists()
    assert not Path(unit[1]).exists()


def test_a_secret_of_the_worker_is_never_sent_to_a_server_the_run_names(fleet):
    (run,) = fleet.run("closed", secret_unit(fleet, "closed-secret"))
    message = refusal(run)
    assert "MILS_API_KEY_VARIABLES" in message and "MILS_GENERATOR_BASE_URLS" in message
    assert SECRET not in message
    assert fleet.attacker.received == []


def test_paths_outside_the_workers_prefixes_are_refused_and_nothing_is_written_there(fleet):
    unit, outside = paths_unit(fleet, "closed-paths")
    climbing = (
        shard_of(str(fleet.root / "in")) | {"name": "../../../climbed"},
        str(fleet.root / "out" / "x"),
        fleet.config(),
    )
    runs = fleet.run("closed", unit, climbing)
    message = refusal(runs[0])
    assert all(v in message for v in ("MILS_SOURCE_PREFIXES", "MILS_OUTPUT_PREFIXES", "MILS_MODEL_DIRS"))
    assert "not one the planner makes" in refusal(runs[1])
    assert not outside.exists() and not (fleet.root / "out" / "x").exists()
    assert not list(fleet.root.rglob("climbed*"))


def test_a_flow_run_cannot_set_the_workers_environment(fleet):
    from prefect.exceptions import PrefectHTTPStatusError

    unit, marker = pipe_unit(fleet, "job-variables")
    with pytest.raises(PrefectHTTPStatusError, match="422") as refused:  # by the server, as the template says
        fleet.run("closed", unit, job_variables={"env": {"MILS_ALLOW_PIPE_URLS": "true"}})
    assert "'env' was unexpected" in str(refused.value)
    assert not marker.exists()


def test_with_the_policy_opened_on_the_worker_the_same_runs_go_through(fleet):
    pipe, marker = pipe_unit(fleet, "open-pipe")
    paths, outside = paths_unit(fleet, "open-paths")
    piped, secret, elsewhere = fleet.run("open", pipe, secret_unit(fleet, "open-secret"), paths)

    assert piped.state.is_completed(), piped.state.message
    assert marker.exists()
    assert pq.read_table(Path(pipe[1]) / "data").column("key").to_pylist() == ["coins"]

    # the worker lends the variable to the server it was told to trust: the request carries the key
    assert ("GET", "/v1/models", f"Bearer {SECRET}") in fleet.attacker.received
    assert secret.state.is_failed() and "PolicyError" not in secret.state.message, secret.state.message

    assert elsewhere.state.is_completed(), elsewhere.state.message
    assert json.loads((outside / "_manifests" / "s.json").read_text())["rows"] == 1


# The rules themselves, in this process (no models, nothing read).


@pytest.fixture
def closed(monkeypatch, tmp_path):
    for name in POLICY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MILS_SOURCE_PREFIXES", f"{tmp_path / 'in'},s3://corpus/shards")
    monkeypatch.setenv("MILS_OUTPUT_PREFIXES", "s3://captions/")
    return tmp_path


def test_dot_segments_and_symbolic_links_do_not_lead_out_of_a_prefix(closed):
    (closed / "in").mkdir()
    (closed / "in" / "link").symlink_to(closed)
    config = config_from_dict({})
    check_run(config, str(closed / "in" / "s.tar"), "s3://captions/v1")
    for source, output in [
        (str(closed / "in" / ".." / "s.tar"), "s3://captions/v1"),
        (str(closed / "in" / "link" / "s.tar"), "s3://captions/v1"),
        ("s3://corpus/shards/../private/s.tar", "s3://captions/v1"),
        ("s3://corpus/shards-other/s.tar", "s3://captions/v1"),
        (str(closed / "in" / "s.tar"), "s3://captions/v1/../../private"),
    ]:
        with pytest.raises(PolicyError, match="is outside what this worker allows"):
            check_run(config, source, output)


def test_a_base_url_matches_by_host_and_port_not_by_its_text(closed, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://vllm-fleet:8000/v1")
    for allowed in ("http://vllm-fleet:8000/v1", "http://VLLM-FLEET:8000/v1/", "http://user@vllm-fleet:8000/v1"):
        check_run(config_from_dict({"generator": {"backend": "openai", "base_url": allowed}}))
    for refused in (
        "http://vllm-fleet:8000@evil:8000/v1",
        "http://vllm-fleet.evil:8000/v1",
        "http://vllm-fleet:8001/v1",
    ):
        with pytest.raises(PolicyError, match=r"generator\.base_url"):
            check_run(config_from_dict({"generator": {"backend": "openai", "base_url": refused}}))


def test_the_policy_file_is_read_and_a_variable_overrides_one_key(closed, monkeypatch):
    policy = closed / "policy.yaml"
    policy.write_text("allow_pipe_urls: true\noutput_prefixes: [s3://captions/]\n")
    monkeypatch.setenv("MILS_POLICY_FILE", str(policy))
    monkeypatch.delenv("MILS_OUTPUT_PREFIXES")
    piped = config_from_dict({"storage": {"allow_pipe_urls": True}})
    check_run(piped, "pipe:cat s.tar", "s3://captions/v1")
    monkeypatch.setenv("MILS_ALLOW_PIPE_URLS", "false")
    with pytest.raises(PolicyError, match="MILS_ALLOW_PIPE_URLS"):
        check_run(piped, "pipe:cat s.tar", "s3://captions/v1")


def test_an_unreadable_policy_file_refuses_every_run(closed, monkeypatch):
    monkeypatch.setenv("MILS_POLICY_FILE", str(closed / "missing.yaml"))
    with pytest.raises(PolicyError, match="MILS_POLICY_FILE"):
        check_run(config_from_dict({}))
    (closed / "typo.yaml").write_text("allow_pipe_url: true\n")
    monkeypatch.setenv("MILS_POLICY_FILE", str(closed / "typo.yaml"))
    with pytest.raises(PolicyError, match="allow_pipe_url"):
        check_run(config_from_dict({}))


def test_the_cli_is_held_to_the_policy_too(tmp_path, photos):
    write_shard(str(tmp_path / "s.tar"), [("coins", {"jpg": photos["coins"]})])
    marker = tmp_path / "command-ran"
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}
    source = f"pipe:touch {marker} && cat {tmp_path / 's.tar'}"
    command = ["caption", source, str(tmp_path / "out"), "--set", "storage.allow_pipe_urls=true"]
    result = subprocess.run(
        [sys.executable, "-m", "mils_pipeline.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "MILS_ALLOW_PIPE_URLS" in result.stderr, result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


class RunsCommand:
    """Unpickling this runs a shell command: what a weights file from an untrusted place can hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("backend", ["open_clip", "clap"])
def test_a_weights_file_that_would_run_code_when_unpickled_is_not_loaded(backend, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"weight": RunsCommand(marker)}, protocol=2)
    if backend == "open_clip":
        (tmp_path / "scorer.pt").write_bytes(payload)
        config, modality = ScorerConfig(**tiny_scorer_settings(checkpoint=str(tmp_path / "scorer.pt"))), "image"
    else:
        directory = save_tiny_clap_checkpoint(tmp_path / "clap", ["a dog barks", "rain on a roof"] * 3)
        (directory / "model.safetensors").unlink()
        (directory / "pytorch_model.bin").write_bytes(payload)
        config, modality = ScorerConfig(backend="clap", model="tiny", checkpoint=str(directory)), "audio"
    with pytest.raises(ModelUnavailableError, match=r"scorer\.checkpoint"):
        build_scorer(config, modality)
    assert not marker.exists()
