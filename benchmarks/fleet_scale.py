"""Fleet scale: what planning and fan-out cost at 1,000 and 10,000 shards, on real components.

    PYTHONPATH=. nice -n 19 .venv/bin/python benchmarks/fleet_scale.py      # ~2.5 min on 2 cores
    PYTHONPATH=. nice -n 19 .venv/bin/python benchmarks/fleet_scale.py --in-flight 64 256 --window 45 \
        --all-done-up-to 10000                                               # docs/SCALE.md's figures

1. Planning on S3: a moto S3 server on loopback holds ``--shards`` tiny shards (a valid tar of one
   small member each); ``plan_shards`` runs over them into an empty output, then again after every
   shard got its finished manifest (a rerun that has nothing to do; by default only up to 1,000
   shards, ``--all-done-up-to 10000`` for 10,000). Printed: wall time and the
   requests the S3 server received, by operation (counted at the server, from its request log).
2. The parent's polling cost: a real ``prefect server``, the ``caption_shard/gpu`` deployment of
   deploy/prefect.yaml on a process pool with NO worker, so every unit the parent submits stays
   Scheduled. A parent ``caption_dataset`` over the largest shard set (units of 8) runs with each
   ``--in-flight`` bound; once it has submitted that many units, the HTTP requests its Prefect
   client sends are counted for ``--window`` seconds (every request of the parent process: polling,
   logs, artifacts). Printed: units submitted, and requests per minute by kind.

The machine's load (``uptime``) is printed at start and end: the machine may be shared.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
BUCKET = "fleet-scale"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def tiny_tar() -> bytes:
    """A valid WebDataset tar with one small member."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = b"tiny"
        info = tarfile.TarInfo("k0.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class RequestCounter(logging.Handler):
    """Counts the requests the moto server logs (werkzeug's request log: one line per request)."""

    pattern = re.compile(r"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP")  # werkzeug colours some lines (ANSI codes)

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.search(record.getMessage())
        if match:
            method, target = match.groups()
            self.counts[self.kind(method, target)] += 1

    @staticmethod
    def kind(method: str, target: str) -> str:
        path, _, query = target.partition("?")
        if method == "GET" and "list-type=2" in query:
            return "LIST"
        return f"{method} {'bucket' if path.count('/') <= 1 else 'object'}"


def start_s3() -> tuple[Any, str, RequestCounter]:
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    counter = RequestCounter()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False
    werkzeug.addHandler(counter)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}", counter


def plan_on_s3(endpoint: str, counter: RequestCounter, sizes: list[int], all_done_up_to: int) -> list[dict[str, Any]]:
    import s3fs

    from mils_pipeline.config import config_from_dict
    from mils_pipeline.io.manifest import manifest_url
    from mils_pipeline.run import plan_shards

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    config = config_from_dict({"storage": {"endpoint_url": endpoint}})
    body = tiny_tar()
    results = []
    for size in sizes:
        source, output = f"s3://{BUCKET}/src-{size}", f"s3://{BUCKET}/out-{size}"
        started = time.perf_counter()
        fs.pipe({f"{BUCKET}/src-{size}/shard-{i:05d}.tar": body for i in range(size)}, batch_size=64)
        uploaded = time.perf_counter() - started
        row: dict[str, Any] = {"shards": size, "upload_s": round(uploaded, 1)}
        shards: list[Any] = []
        for case in ("empty output", "all done") if size <= all_done_up_to else ("empty output",):
            if shards:  # every shard's finished manifest, as a completed run leaves them
                manifests = {
                    manifest_url(output, shard).removeprefix("s3://"): json.dumps(
                        {
                            "manifest_version": 1,
                            "shard": shard.name,
                            "input": shard.identity(),
                            "config_sha256": config.config_sha256(),
                        }
                    ).encode()
                    for shard in shards
                }
                fs.pipe(manifests, batch_size=64)
            s3fs.S3FileSystem.clear_instance_cache()  # the planner's own client, with nothing cached
            counter.counts.clear()
            started = time.perf_counter()
            plan = plan_shards(source, output, config)
            seconds = time.perf_counter() - started
            row[case] = {
                "seconds": round(seconds, 2),
                "requests": sum(counter.counts.values()),
                "by_kind": dict(counter.counts),
                "todo": len(plan.todo),
            }
            shards = plan.shards
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def start_prefect(home: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MILS_PROJECT_DIR": str(REPO),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    log = open(home / "server.log", "w")  # kept open for the server's life
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
                    return server, env
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            stop(server)
            raise SystemExit(f"Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def prefect(env: dict[str, str], *args: str) -> None:
    result = subprocess.run([PREFECT, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"prefect {' '.join(args)}: {result.stdout}\n{result.stderr}")


def api_kind(method: str, path: str) -> str:
    path = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "{id}", path.split("/api", 1)[-1])
    return f"{method} {path}"


def parent(args: argparse.Namespace) -> None:
    """The parent flow in this process, its Prefect client's requests recorded: submits units to a
    pool with no worker, and after ``args.in_flight`` are submitted counts ``args.window`` seconds."""
    import httpx

    requests: list[tuple[float, str]] = []  # every request sent, a retried one (5xx, timeout) each time
    statuses: Counter[str] = Counter()
    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send
    submit = "POST /deployments/{id}/create_flow_run"

    def record(request: httpx.Request, response: httpx.Response | None) -> None:
        kind = api_kind(request.method, request.url.path)
        requests.append((time.monotonic(), kind))
        status = str(response.status_code) if response is not None else "no response"
        statuses[status if kind != submit else f"{status} (submit)"] += 1

    def send(self: httpx.Client, request: httpx.Request, *a: Any, **k: Any) -> httpx.Response:
        response = None
        try:
            response = sync_send(self, request, *a, **k)
            return response
        finally:
            record(request, response)

    async def asend(self: httpx.AsyncClient, request: httpx.Request, *a: Any, **k: Any) -> httpx.Response:
        response = None
        try:
            response = await async_send(self, request, *a, **k)
            return response
        finally:
            record(request, response)

    httpx.Client.send, httpx.AsyncClient.send = send, asend  # type: ignore[method-assign]

    from flows.caption import caption_dataset_flow

    def run() -> None:
        caption_dataset_flow(
            args.source,
            args.output,
            config={"storage": {"endpoint_url": args.endpoint}},
            shard_deployment="caption_shard/gpu",
            poll_seconds=args.poll_seconds,
            max_units_in_flight=args.in_flight,
        )

    threading.Thread(target=run, daemon=True).start()
    started = time.monotonic()
    while statuses["201 (submit)"] < args.in_flight:
        if time.monotonic() - started > 600:
            raise SystemExit("the parent did not submit its units in 10 minutes")
        time.sleep(0.2)
    submitted_after = time.monotonic() - started
    time.sleep(2)  # the last submission's own follow-up calls
    window_start = time.monotonic()
    time.sleep(args.window)
    in_window = Counter(kind for at, kind in list(requests) if at >= window_start)
    per_minute = {kind: round(count * 60 / args.window, 1) for kind, count in in_window.most_common()}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:  # after the window: not counted
        on_server = client.count_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])))
    report = {
        "in_flight": args.in_flight,
        "submitted": statuses["201 (submit)"],
        "unit_runs_on_server": on_server,
        "submit_seconds": round(submitted_after, 1),
        "window_s": args.window,
        "requests_per_minute": round(sum(in_window.values()) * 60 / args.window, 1),
        "by_kind_per_minute": per_minute,
        "statuses": dict(statuses),
    }
    print("PARENT", json.dumps(report), flush=True)
    os._exit(0)


def polling_cost(endpoint: str, shards: int, bounds: list[int], window: float, poll_seconds: float) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        home = Path(tmp) / "prefect"
        home.mkdir()
        server, env = start_prefect(home)
        try:
            prefect(env, "work-pool", "create", "gpu", "--type", "process")
            prefect(env, "--no-prompt", "deploy", "--name", "gpu", "--prefect-file", "deploy/prefect.yaml")
            for bound in bounds:
                command = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--parent",
                    "--source",
                    f"s3://{BUCKET}/src-{shards}",
                    "--output",
                    str(Path(tmp) / f"out-{bound}"),
                    "--endpoint",
                    endpoint,
                    "--in-flight",
                    str(bound),
                    "--window",
                    str(window),
                    "--poll-seconds",
                    str(poll_seconds),
                ]
                result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
                if "PARENT" not in result.stdout:
                    raise SystemExit(f"parent failed: {result.stdout[-2000:]}\n{result.stderr[-3000:]}")
                row = {"shards": shards, **json.loads(result.stdout.split("PARENT", 1)[1])}
                results.append(row)
                print(json.dumps(row), flush=True)
        finally:
            stop(server)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[64], help="e.g. 64 256: two reads a poll")
    parser.add_argument(
        "--all-done-up-to",
        type=int,
        default=1000,
        help="plan again with every manifest written only for shard counts up to this (10,000: ~3 more minutes)",
    )
    parser.add_argument("--window", type=float, default=30.0, help="seconds the parent's requests are counted")
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    parser.add_argument("--skip-prefect", action="store_true", help="planning on S3 only")
    parser.add_argument("--parent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parent:
        args.in_flight = args.in_flight[0]
        parent(args)
        return
    print("load at start:", uptime(), flush=True)
    started = time.perf_counter()
    server, endpoint, counter = start_s3()
    try:
        print("planning on S3 (requests counted at the S3 server):", flush=True)
        plan_on_s3(endpoint, counter, args.shards, args.all_done_up_to)
        if not args.skip_prefect:
            print(f"parent's Prefect API requests, {max(args.shards)} shards in units of 8, no worker:", flush=True)
            polling_cost(endpoint, max(args.shards), args.in_flight, args.window, args.poll_seconds)
    finally:
        server.stop()
    print(f"total {time.perf_counter() - started:.0f} s; load at end:", uptime(), flush=True)


if __name__ == "__main__":
    main()
