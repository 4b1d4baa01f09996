"""A real Prefect fleet for the tests: a local Prefect server (``prefect_env``), the ``gpu`` pool
and the ``caption_shard/gpu`` deployment of deploy/ (``fleet``), process workers, and the few REST
reads the tests make. Shared by test_fanout, test_fanout_waves, test_fleet_faults and test_soak;
a test module takes the fixtures by importing them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from mils_pipeline.fleet import GPU_LIMIT

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-local")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        # flow runs send heartbeats as often as Prefect allows, and the server takes back the
        # concurrency slots of expired leases every 2 s (tests/test_fleet_faults.py)
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
        "MILS_PROJECT_DIR": str(REPO),
    }
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            stop(server)
            pytest.fail(f"Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield env
    stop(server)
    log.close()


def prefect(env, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([PREFECT, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, f"prefect {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result


def start_workers(env: dict[str, str], logs: Path, *names: str) -> list[subprocess.Popen]:
    """``prefect worker start`` on the ``gpu`` pool, one slot each, one process per name (logs in
    ``logs/<name>.log``); stop them with ``stop``."""
    workers = []
    for name in names:
        log = open(logs / f"{name}.log", "w")  # kept open for the worker's life
        workers.append(
            subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "gpu", "--name", name, "--limit", "1"],
                env={**env, "MILS_WORKER_NAME": name},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
            )
        )
    return workers


@pytest.fixture(scope="module")
def fleet(prefect_env):
    """The server with the `gpu` pool (the locked template of deploy/) and `caption_shard/gpu`."""
    env = prefect_env
    prefect(
        env,
        "work-pool",
        "create",
        "gpu",
        "--type",
        "process",
        "--base-job-template",
        "deploy/process-base-job-template.json",
    )
    prefect(env, "--no-prompt", "deploy", "--name", "gpu", "--prefect-file", "deploy/prefect.yaml")
    return env


CRASH_AFTER = 75  # seconds without a heartbeat; the workers send one every 30 s (prefect_env)


def setup_fleet(env: dict[str, str], gpus: int) -> str:
    """deploy/README.md's command, as written there, with this test's slots and crash delay."""
    command = [sys.executable, "-m", "mils_pipeline.fleet", "--gpus", str(gpus), "--crash-after", str(CRASH_AFTER)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


class Api:
    """The few reads of the Prefect REST API these tests make."""

    def __init__(self, env: dict[str, str]) -> None:
        self.client = httpx.Client(base_url=env["PREFECT_API_URL"] + "/", timeout=30)

    def unit_runs(self, output: str) -> list[dict]:
        runs = self.client.post(
            "flow_runs/filter", json={"deployments": {"name": {"any_": ["gpu"]}}, "limit": 200}
        ).json()
        return [r for r in runs if r["parameters"].get("output") == output]

    def shard_tasks(self, flow_run_ids: list[str]) -> list[dict]:
        body = {"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200}
        return [
            t for t in self.client.post("task_runs/filter", json=body).json() if t["name"].startswith("caption shard")
        ]

    def active_slots(self) -> int:
        return self.client.get(f"v2/concurrency_limits/{GPU_LIMIT}").json()["active_slots"]

    def automations(self) -> list[dict]:
        return self.client.post("automations/filter", json={}).json()


def ts(value: str | None) -> float:
    return datetime.fromisoformat(value).timestamp() if value else float("nan")


def unit_process(flow_run_id: str) -> int:
    """The pid of the process executing ``flow_run_id`` (the flow run engine's environment names it)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no process runs flow run {flow_run_id}")


def ancestors(pid: int) -> list[int]:
    """The parent, grandparent, ... of process ``pid``."""
    found = []
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        found.append(pid)
    return found
