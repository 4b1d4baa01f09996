"""The deploy files say what a container runs. No Docker engine or Kubernetes cluster here: the
Dockerfile's instructions are read, the Kubernetes and Docker workers' own packages (prefect-kubernetes,
prefect-docker) build a flow run's job against a real Prefect server, and the argv a container gets is
composed by the OCI rule (entrypoint, then the args/command given at start, or the image's CMD when
none is given)."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import uuid
from pathlib import Path

import pytest
import yaml

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


# ---- what the work pools' own workers make of the templates, through a real Prefect server ----


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def resolve_job(job_configuration: type, pool_type: str, template: dict, job_variables: dict | None = None):
    """The job configuration a ``pool_type`` worker builds for a flow run of the ``caption_shard``
    deployment: work pool, deployment and flow run made on the server, then the worker's own
    ``resolve_for_flow_run`` (template, variables, then ``prepare_for_flow_run``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pull_steps = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())["pull"]

    async def build():
        async with get_client() as client:
            pool = await client.create_work_pool(
                WorkPoolCreate(name=f"{pool_type}-{uuid.uuid4().hex[:6]}", type=pool_type, base_job_template=template)
            )
            flow_id = await client.create_flow_from_name("caption_shard")
            deployment_id = await client.create_deployment(
                flow_id=flow_id,
                name=f"gpu-{pool.name}",
                work_pool_name=pool.name,
                entrypoint="flows/caption.py:caption_shard_flow",
                pull_steps=pull_steps,
                job_variables=job_variables or {},
            )
            flow_run = await client.create_flow_run_from_deployment(deployment_id)
            return await job_configuration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name="test-worker"
            )

    return asyncio.run(build())


def test_the_kubernetes_worker_renders_a_job_whose_container_runs_the_flow_run(prefect_server):
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((DEPLOY / "k8s" / "gpu-base-job-template.json").read_text())
    job = resolve_job(KubernetesWorkerJobConfiguration, "kubernetes", template)
    pod = job.job_manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # Kubernetes runs `command` (else the image's ENTRYPOINT) followed by `args` (else the image's CMD)
    assert "command" not in container
    image = instructions(DEPLOY / "Dockerfile.gpu-worker")
    assert container_argv(image, container["args"]) == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "PREFECT__FLOW_RUN_ID" in env and env["MILS_POLICY_FILE"].endswith("deploy/worker-policy.yaml")
    assert job.namespace == job.job_manifest["metadata"]["namespace"] == "mils"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"  # one GPU per unit


def test_the_docker_worker_starts_the_image_with_the_flow_run_command(prefect_server):
    """prefect-docker's own template and configuration give the command; docker-py turns it into the
    create-container request (``Cmd``). No Docker engine here: the engine's rule (the image's
    Entrypoint, then Cmd) is applied by ``container_argv``."""
    from docker.types import ContainerConfig
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    template = DockerWorker.get_default_base_job_template()
    job = resolve_job(
        DockerWorkerJobConfiguration, "docker", template, {"image": "registry.example.com/mils-gpu-worker:latest"}
    )
    request = ContainerConfig("1.44", job.image, job.command, environment=job.env)
    assert request["Entrypoint"] is None  # the image's entrypoint stands
    image = instructions(DEPLOY / "Dockerfile.gpu-worker")
    assert container_argv(image, request["Cmd"]) == ["prefect", "flow-run", "execute"]


def test_compose_gives_each_worker_its_command_and_one_gpu_worker_one_gpu():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    image = instructions(DEPLOY / "Dockerfile.gpu-worker")
    for name in ("gpu-worker", "control-worker"):
        service = compose["services"][name]
        assert "entrypoint" not in service  # the image's empty entrypoint stands: work pools can run flows in it
        assert container_argv(image, service["command"])[:3] == ["prefect", "worker", "start"]
    gpu = compose["services"]["gpu-worker"]
    assert gpu["command"][-2:] == ["--limit", "1"] and gpu["environment"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_the_kubernetes_worker_and_the_vllm_fleet_live_with_the_jobs_and_mount_their_models():
    template = json.loads((DEPLOY / "k8s" / "gpu-base-job-template.json").read_text())
    job_pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    [claim] = [v["persistentVolumeClaim"]["claimName"] for v in job_pod["volumes"] if "persistentVolumeClaim" in v]
    namespace = template["job_configuration"]["namespace"]
    documents = [
        d for f in ("vllm-fleet.yaml", "worker.yaml") for d in yaml.safe_load_all((DEPLOY / "k8s" / f).read_text())
    ]
    for document in documents:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == namespace, document["metadata"]
    fleet = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "vllm-fleet")
    volumes = fleet["spec"]["template"]["spec"]["volumes"]
    assert claim in [v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v]
    # the runs' short URL names the fleet's Service, which resolves from a job in the same namespace
    service = next(d for d in documents if d["kind"] == "Service")
    fleet_config = yaml.safe_load((DEPLOY / "configs" / "images-vllm-fleet.yaml").read_text())
    assert fleet_config["generator"]["base_url"].startswith(f"http://{service['metadata']['name']}:8000/")
    worker = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefect-worker")
    [container] = worker["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["prefect", "worker", "start"] and "kubernetes" in container["command"]
    accounts = {d["metadata"]["name"] for d in documents if d["kind"] == "ServiceAccount"}
    assert job_pod["serviceAccountName"] in accounts


def test_the_worker_image_installs_every_extra_a_worker_runs():
    dockerfile = (DEPLOY / "Dockerfile.gpu-worker").read_text()
    extras = set(re.search(r'-e "\.\[([^\]]+)\]"', dockerfile).group(1).split(","))
    needed = {"vllm", "openai", "open_clip", "video", "audio", "transformers", "prefect", "kubernetes", "s3", "hub"}
    assert needed <= extras
