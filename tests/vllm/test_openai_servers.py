"""The openai backend against real OpenAI-compatible servers on 127.0.0.1: `vllm serve` (from the
vLLM test env) and llama.cpp's server, each running SmolLM2-135M-Instruct, with the real pipeline
(WebDataset shards, a tiny open_clip scorer, Parquet output) in this process."""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import GenerationError
from mils_pipeline.generate import CandidateList, SamplingParams, build_generator
from mils_pipeline.generate.parsing import parse_candidates
from mils_pipeline.generate.structured import caption_list_regex
from mils_pipeline.io.shards import write_shard
from mils_pipeline.run import build_runtime, caption_dataset
from mils_pipeline.text import word_count
from tests.conftest import readable_text, run_settings
from tests.vllm.conftest import API_KEY, SERVED_MODEL, Server, allow_generator_server

pytestmark = pytest.mark.vllm

SHARDS = {
    "shard-000": ["astronaut", "chelsea"],
    "shard-001": ["coffee", "rocket"],
    "shard-002": ["camera", "coins"],
}
ALL_KEYS = sorted(key for keys in SHARDS.values() for key in keys)


def write_corpus(directory: Path, photos: dict[str, bytes]) -> Path:
    for shard, keys in SHARDS.items():
        write_shard(str(directory / f"{shard}.tar"), [(key, {"jpg": photos[key]}) for key in keys])
    return directory


def server_config(pool_dir, server: Server, **generator) -> RunConfig:
    settings = run_settings(pool_dir, top_k=5, new_per_round=4, max_rounds=2, max_active_items=4)
    settings["generator"] = {
        "backend": "openai",
        "base_url": server.url,
        "max_retries": 2,
        "retry_backoff": 0.2,
        "request_timeout": 120,
        **generator,
    }
    return RunConfig.model_validate(settings)


def output_rows(output: Path) -> list[dict]:
    rows = []
    for part in sorted((output / "data").glob("part-*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    return rows


def assert_key_written_nowhere(output: Path) -> None:
    """Searched in every file's bytes and in what a reader decodes (Parquet pages are compressed)."""
    files = [path for path in output.rglob("*") if path.is_file()]
    assert any(path.suffix == ".parquet" for path in files) and any(path.suffix == ".json" for path in files)
    for path in files:
        data = path.read_bytes()
        assert API_KEY.encode() not in data, f"the API key leaked into {path}"
        assert API_KEY not in readable_text(path.name, data), f"the API key leaked into {path}"


def test_vllm_serve_captions_a_job_end_to_end(vllm_server, tmp_path, photos, pool_dir, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    source = write_corpus(tmp_path / "corpus", photos)
    config = server_config(pool_dir, vllm_server)
    summary = caption_dataset(str(source), str(tmp_path / "out"), config)

    assert [s.status for s in summary.shards] == ["done"] * 3
    rows = output_rows(tmp_path / "out")
    assert sorted(r["key"] for r in rows) == ALL_KEYS
    for row in rows:
        assert row["rounds"] == 2 and row["caption"]
        assert row["generator"]["backend"] == "openai" and row["generator"]["model"] == SERVED_MODEL
        assert row["generator"]["revision"].startswith("served:")
        assert row["cost"]["completion_tokens"] > 0
    assert sum(r["cost"]["texts_scored"] for r in rows) > 0, "the server's replies gave scored candidates"
    assert_key_written_nowhere(tmp_path / "out")


class KillsServerDuringCall:
    """The real generator; during its N-th generate call, while that call's completions are being
    generated, the server is killed (SIGKILL). The kill comes after a third of the shortest earlier
    call: the requests are sent at the start of a call and a completion takes seconds on the CPU."""

    def __init__(self, generator, server: Server, call: int) -> None:
        self._generator, self._server, self._call = generator, server, call
        self.identity = generator.identity
        self.calls = 0
        self.durations: list[float] = []
        self.killed_in_flight = False
        self._in_call = threading.Event()

    def _kill_in_flight(self) -> None:
        if self._in_call.is_set():  # checked before the kill: the call fails soon after it
            self.killed_in_flight = True
            self._server.kill()

    def generate(self, prompts, params, seeds):
        self.calls += 1
        timer = None
        if self.calls == self._call:
            timer = threading.Timer(min(self.durations) / 3, self._kill_in_flight)
            timer.start()
        self._in_call.set()
        started = time.perf_counter()
        try:
            return self._generator.generate(prompts, params, seeds)
        finally:
            self._in_call.clear()
            self.durations.append(time.perf_counter() - started)
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        self._generator.close()


def test_server_killed_mid_run_retries_then_fails_clearly_and_a_rerun_completes(
    vllm_server, tmp_path, photos, pool_dir, monkeypatch, caplog
):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    source, output = write_corpus(tmp_path / "corpus", photos), tmp_path / "out"
    config = server_config(pool_dir, vllm_server)
    runtime = build_runtime(config)
    # one shard = two rounds = two generate calls: call 4 is the second round of shard-001
    killer = KillsServerDuringCall(runtime.generator, vllm_server, call=4)
    runtime.optimizer.generator = killer
    with caplog.at_level(logging.WARNING, logger="mils_pipeline.generate.openai"):
        with pytest.raises(GenerationError) as failure:
            caption_dataset(str(source), str(output), config, runtime=runtime)
    runtime.close()
    message = str(failure.value)
    assert vllm_server.url in message and "attempt" in message and "generator.base_url" in message
    assert API_KEY not in message
    assert killer.killed_in_flight, f"the kill came after the call returned (earlier calls: {killer.durations})"
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) >= config.generator.max_retries, "each request was retried before the run failed"
    # a request the server had accepted and was answering lost its connection (not a refused connect)
    assert re.search(r"RemoteProtocolError|ReadError", retries[0]) and "ConnectError" not in retries[0], retries
    assert sorted(p.stem for p in (output / "_manifests").glob("*.json")) == ["shard-000"]
    assert sorted(r["key"] for r in output_rows(output)) == SHARDS["shard-000"]

    vllm_server.start()
    summary = caption_dataset(str(source), str(output), config)
    assert [(s.shard, s.status) for s in summary.shards] == [
        ("shard-000", "skipped"),
        ("shard-001", "done"),
        ("shard-002", "done"),
    ]
    keys = [r["key"] for r in output_rows(output)]
    assert sorted(keys) == ALL_KEYS, "every item exactly once: nothing lost, nothing duplicated"
    assert_key_written_nowhere(output)


def structured_replies(server: Server, mode: str, style: str, monkeypatch) -> list[str]:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    config = RunConfig.model_validate(
        {"generator": {"backend": "openai", "base_url": server.url, "structured_output": mode, "prompt_style": style}}
    )
    generator = build_generator(config.generator)
    from mils_pipeline.generate.prompts import PromptTemplate, max_tokens_for, refine_prompt

    template = PromptTemplate(style=style)
    scored = [("a dog on a sofa", 0.21), ("a brown dog lying on a red couch", 0.27), ("a living room", 0.12)]
    prompts = [refine_prompt(template, scored, 4, 10, "image") for _ in range(3)]
    params = SamplingParams(0.5, 0.9, max_tokens_for(4, 10), candidate_list=CandidateList(4, 10))
    completions = generator.generate(prompts, params, [1, 2, 3])
    generator.close()
    assert all(c.finish_reason == "stop" for c in completions), [c.finish_reason for c in completions]
    return [c.text for c in completions]


def test_structured_json_through_vllm_serve_returns_well_formed_lists(vllm_server, monkeypatch):
    for text in structured_replies(vllm_server, "json", "chat", monkeypatch):
        captions = json.loads(text)["captions"]
        assert len(captions) == 4 and all(1 <= word_count(c) <= 10 for c in captions), captions
        assert parse_candidates(text, 10).candidates


def test_structured_regex_through_vllm_serve_returns_caption_lines(vllm_server, monkeypatch):
    for text in structured_replies(vllm_server, "regex", "completion", monkeypatch):
        assert re.fullmatch(caption_list_regex(CandidateList(4, 10)), text), text
        assert parse_candidates(text, 10).candidates


def test_llamacpp_server_runs_the_same_job_with_the_key_from_the_config(llamacpp_server, tmp_path, photos, pool_dir):
    source = write_corpus(tmp_path / "corpus", photos)
    config = server_config(
        pool_dir, llamacpp_server, api_key=API_KEY, api_key_env="MILS_NO_SUCH_VARIABLE", prompt_style="chat"
    )
    assert API_KEY not in config.to_yaml() and API_KEY not in json.dumps(config.model_dump(mode="json"))
    summary = caption_dataset(str(source), str(tmp_path / "out"), config)

    assert [s.status for s in summary.shards] == ["done"] * 3
    rows = output_rows(tmp_path / "out")
    assert sorted(r["key"] for r in rows) == ALL_KEYS
    assert {r["generator"]["model"] for r in rows} == {SERVED_MODEL}
    assert all(r["cost"]["completion_tokens"] > 0 for r in rows)
    assert_key_written_nowhere(tmp_path / "out")


def test_a_wrong_key_is_a_clear_error_without_retries(llamacpp_server, pool_dir):
    import time

    def refused() -> int:  # counted at the server, from its access log
        return llamacpp_server.log.read_text().count('"GET /v1/models HTTP/1.1" 401')

    before = refused()
    config = server_config(pool_dir, llamacpp_server, api_key="sk-wrong")  # max_retries > 0: none may be used
    assert config.generator.max_retries > 0
    with pytest.raises(GenerationError, match=r"HTTP 401") as err:
        build_generator(config.generator)
    # the project's hint, not only the server's own "Invalid API key"
    assert "check the API key (generator.api_key or the variable named by generator.api_key_env)" in str(err.value)
    time.sleep(0.5)  # the access log line is written as the response goes out
    assert refused() - before == 1  # one request: a 401 is not retried


class FlakyProxy:
    """A loopback proxy in front of a real server that fails the first POSTs as told ("429" with
    ``Retry-After: retry_after``, "503", or "timeout": answer later than the client waits), then
    forwards; it notes when each POST arrives. Only the failures are made up: rate limits and
    overload cannot be produced on demand by the real servers here."""

    def __init__(self, upstream: str, failures: list[str], stall_seconds: float, retry_after: str = "0.2") -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        proxy = self
        self.failures = list(failures)
        self.arrivals: list[float] = []  # time.monotonic() of each POST

        class Handler(BaseHTTPRequestHandler):
            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {"Authorization": self.headers.get("Authorization", ""), "Content-Type": "application/json"}
                upstream_url = upstream.rstrip("/") + self.path.removeprefix("/v1")
                answer = httpx.request(method, upstream_url, content=body or None, headers=headers, timeout=300)
                self._reply(answer.status_code, answer.content)

            def _reply(self, status: int, content: bytes, extra: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **(extra or {})}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (the "timeout" case)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                proxy.arrivals.append(time.monotonic())
                failure = proxy.failures.pop(0) if proxy.failures else None
                if failure == "429":
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    self._reply(429, b'{"error": "rate limited"}', {"Retry-After": retry_after})
                elif failure == "503":
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    self._reply(503, b'{"error": "overloaded"}')
                elif failure == "timeout":
                    time.sleep(stall_seconds)
                    self._reply(504, b'{"error": "too late"}')
                else:
                    self._forward("POST")

            def log_message(self, *args) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        allow_generator_server(self.url)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def posts(self) -> int:
        return len(self.arrivals)

    def gaps(self) -> list[float]:
        """Seconds between one POST's arrival and the next: the client's wait for its answer (or
        its timeout) plus the delay it chose before retrying."""
        return [later - earlier for earlier, later in itertools.pairwise(self.arrivals)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def one_refine_request(generator) -> list:
    """One short request: it must finish well inside the client timeout of the retry tests."""
    from mils_pipeline.generate.prompts import PromptTemplate, refine_prompt

    prompt = refine_prompt(PromptTemplate(style="completion"), [("a dog on a sofa", 0.2)], 4, 10, "image")
    return generator.generate([prompt], SamplingParams(0.5, 0.9, 4), [5])


def test_429_5xx_and_timeouts_are_retried_with_backoff(llamacpp_server, caplog):
    backoff, retry_after, timeout = 0.4, 1.5, 20  # the real request takes 1-4 s on 2 busy cores
    proxy = FlakyProxy(llamacpp_server.url, ["429", "503", "timeout"], stall_seconds=21, retry_after=str(retry_after))
    try:
        config = RunConfig.model_validate(
            {
                "generator": {
                    "backend": "openai",
                    "base_url": proxy.url,
                    "api_key": API_KEY,
                    "max_retries": 3,
                    "retry_backoff": backoff,
                    "request_timeout": timeout,
                }
            }
        )
        generator = build_generator(config.generator)
        with caplog.at_level(logging.WARNING, logger="mils_pipeline.generate.openai"):
            completions = one_refine_request(generator)
        generator.close()
    finally:
        proxy.close()
    assert completions[0].completion_tokens > 0 and completions[0].text.strip()
    assert proxy.posts == 4
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3
    assert "HTTP 429" in retries[0] and "HTTP 503" in retries[1] and "Timeout" in retries[2]
    # retry n waits retry_backoff * 2**(n-1) times a jitter in [0.5, 1], or what Retry-After says
    after_429, after_503, after_timeout = proxy.gaps()
    assert after_429 >= retry_after, f"Retry-After honoured (this retry's own backoff is at most {backoff} s)"
    assert after_503 >= backoff * 2 * 0.5
    assert after_timeout >= timeout + backoff * 4 * 0.5


def test_retries_are_bounded_then_a_clear_error(llamacpp_server):
    backoff = 0.2
    proxy = FlakyProxy(llamacpp_server.url, ["503"] * 10, stall_seconds=0)
    try:
        config = RunConfig.model_validate(
            {
                "generator": {
                    "backend": "openai",
                    "base_url": proxy.url,
                    "api_key": API_KEY,
                    "max_retries": 2,
                    "retry_backoff": backoff,
                }
            }
        )
        generator = build_generator(config.generator)
        with pytest.raises(GenerationError, match=r"after 3 attempt\(s\); last error: HTTP 503"):
            one_refine_request(generator)
        generator.close()
    finally:
        proxy.close()
    assert proxy.posts == 3
    first, second = proxy.gaps()
    assert first >= backoff * 0.5 and second >= backoff * 2 * 0.5
