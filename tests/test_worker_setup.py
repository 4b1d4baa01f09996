"""How a worker is set up: it finds this repository at its own MILS_PROJECT_DIR when a flow run
starts (the deployments' pull step), and a unit that computes on a GPU holds it alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mils_pipeline.errors import WorkerSetupError
from mils_pipeline.run.gpu import claim_gpus

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_pull_steps() -> dict:
    """deploy/prefect.yaml's pull steps, run by Prefect's own step runner as a flow run's start does.
    A failing step raises the step's own error."""
    from prefect.deployments.steps.core import StepExecutionError, run_steps

    steps = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())["pull"]
    try:
        return asyncio.run(run_steps(steps, print_function=lambda *_: None))
    except StepExecutionError as exc:
        raise exc.__cause__ from None


def test_the_pull_step_moves_to_the_project_directory_the_worker_names(prefect_server, monkeypatch, tmp_path):
    project = tmp_path / "worker-checkout"
    (project / "flows").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # restored after the test
    monkeypatch.setenv("MILS_PROJECT_DIR", str(project))
    assert run_pull_steps() == {"directory": str(project)}
    assert Path.cwd() == project


def test_a_worker_without_the_project_directory_refuses_the_flow_run_naming_the_variable(
    prefect_server, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MILS_PROJECT_DIR", raising=False)
    with pytest.raises(WorkerSetupError, match="MILS_PROJECT_DIR is not set on this worker"):
        run_pull_steps()
    monkeypatch.setenv("MILS_PROJECT_DIR", str(tmp_path))
    with pytest.raises(WorkerSetupError, match="no flows/ directory"):
        run_pull_steps()


def other_process_claims(gpus: str, lock_dir: Path) -> str:
    code = (
        "import sys; from pathlib import Path; from mils_pipeline.errors import WorkerSetupError\n"
        "from mils_pipeline.run.gpu import claim_gpus\n"
        "try:\n    claim_gpus(sys.argv[1], Path(sys.argv[2]))\nexcept WorkerSetupError:\n    print('refused')\n"
        "else:\n    print('claimed')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, gpus, str(lock_dir)], capture_output=True, text=True, cwd=REPO, check=True
    )
    return result.stdout.strip()


HOLD_A_GPU = """
import sys, time
from pathlib import Path
from mils_pipeline.run.gpu import claim_gpus
claim = claim_gpus(sys.argv[1], Path(sys.argv[2]))
print("held", flush=True)
sys.stdin.readline()
"""


def test_a_second_unit_on_a_gpu_another_unit_holds_is_refused_and_other_gpus_are_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_GPU, "0", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkerSetupError) as refused:
            claim_gpus("0", tmp_path)
        assert f"held by shard unit process {holder.pid}" in str(refused.value)
        assert "CUDA_VISIBLE_DEVICES=<its GPU> and --limit 1" in str(refused.value)
        other = claim_gpus("1", tmp_path)  # a worker pinned to another GPU runs its unit
        other.release()
    finally:
        holder.communicate("\n", timeout=30)
    claim_gpus("0", tmp_path).release()  # the lock went with its process


def test_runtimes_of_one_process_share_its_claim_on_all_visible_gpus_until_the_last_lets_go(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    first = claim_gpus(lock_dir=tmp_path)
    second = claim_gpus(lock_dir=tmp_path)  # a retry's fresh runtime in the same unit process
    assert first is second and first.gpus == "all"
    first.release()
    assert other_process_claims("all", tmp_path) == "refused"
    second.release()
    assert other_process_claims("all", tmp_path) == "claimed"
    assert os.listdir(tmp_path) == ["gpu-all.lock"]
