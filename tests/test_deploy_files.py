"""The deploy files say what a container runs. No Docker or Kubernetes here: the Dockerfile's
instructions are read and the argv a container gets is composed by the OCI rule (entrypoint, then
the args/command given at start, or the image's CMD when none is given)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def instructions(path: Path) -> dict[str, list[str]]:
    """The last ENTRYPOINT and CMD of a Dockerfile, in exec form."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword in ("ENTRYPOINT", "CMD"):
            found[keyword] = json.loads(rest)
    return found


def container_argv(image: dict[str, list[str]], args: list[str] | None) -> list[str]:
    return image.get("ENTRYPOINT", []) + (args if args is not None else image.get("CMD", []))


def test_the_worker_image_runs_a_worker_by_default_and_a_flow_run_when_a_pool_starts_one():
    image = instructions(DEPLOY / "Dockerfile.gpu-worker")
    assert image["ENTRYPOINT"] == []  # also drops the vLLM base image's own entrypoint
    assert container_argv(image, None) == ["prefect", "worker", "start", "--pool", "gpu", "--limit", "1"]
    # Kubernetes and Docker work pools start each flow run's container with this as args/command
    flow_run = shlex.split("prefect flow-run execute")
    assert container_argv(image, flow_run) == flow_run


def test_the_kubernetes_template_leaves_the_command_to_the_worker():
    template = json.loads((DEPLOY / "k8s" / "gpu-base-job-template.json").read_text())
    [container] = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert "command" not in container and "args" not in container  # Prefect fills in the flow run's command
