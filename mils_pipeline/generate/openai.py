"""OpenAI-compatible backend: any server that speaks ``/v1/completions`` and ``/v1/chat/completions``
(``vllm serve``, llama.cpp's server, SGLang, hosted APIs).

Plain httpx rather than the ``openai`` SDK: the backend needs only two POST routes and one GET, its
own retry policy (429, 5xx, timeouts and lost connections, with backoff, then one clear error) and
server extensions such as vLLM's ``structured_outputs`` in the body; httpx is already installed
with Prefect, and the SDK would add a second retry layer to switch off.

A round's prompts are sent at once, at most ``generator.max_concurrency`` in flight; the server
batches them. The API key comes from the config or the environment and goes only into the
Authorization header: never into the model identity, logs or outputs.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mils_pipeline.config import GeneratorConfig
from mils_pipeline.errors import ConfigError, GenerationError, ModelUnavailableError
from mils_pipeline.generate.base import Completion, ModelIdentity, Prompt, SamplingParams
from mils_pipeline.generate.structured import caption_list_regex, caption_list_schema, json_max_tokens
from mils_pipeline.logs import register_secret
from mils_pipeline.policy import check_generator
from mils_pipeline.settings import secret_from_env, settings

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0
_HINTS = {
    401: "check the API key (generator.api_key or the variable named by generator.api_key_env)",
    403: "check the API key (generator.api_key or the variable named by generator.api_key_env)",
    404: "check generator.base_url (it ends with /v1) and generator.model (a model the server serves)",
}


def public_url(url: str) -> str:
    """The URL without user info or query: safe to log and to record as provenance."""
    import httpx

    parsed = httpx.URL(url)
    return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))


class OpenAIGenerator:
    def __init__(self, config: GeneratorConfig) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise ModelUnavailableError(
                "generator.backend=openai needs httpx: pip install 'mils-pipeline[openai]'"
            ) from exc
        check_generator(config)  # before the key is read: a run names the variable and the server
        base_url = config.base_url or settings().openai_base_url
        if not base_url:
            raise ConfigError(
                "generator.backend=openai needs the server's URL: set generator.base_url (e.g. "
                "http://vllm:8000/v1) or $OPENAI_BASE_URL"
            )
        key = config.api_key.get_secret_value() if config.api_key else secret_from_env(config.api_key_env)
        register_secret(key)  # a key from the config, or from a variable the log filter does not list
        self.url = public_url(base_url).rstrip("/")
        self.prompt_style = config.prompt_style
        self.structured_output = config.structured_output
        self.max_retries = config.max_retries
        self.retry_backoff = config.retry_backoff
        self._client = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=config.request_timeout,
            limits=httpx.Limits(max_connections=config.max_concurrency),
        )
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="mils-openai")
        self.model, served_from = self._served_model(config.model)
        self.identity = ModelIdentity(
            backend="openai",
            model=self.model,
            revision=f"served:{served_from}",
            parameters={
                "prompt_style": config.prompt_style,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "structured_output": config.structured_output,
                "server": self.url,
            },
        )

    def _served_model(self, wanted: str | None) -> tuple[str, str]:
        """(model name, what the server says it serves) from ``GET /models``."""
        listing = self._request("GET", "models", None, threading.Event())
        models = [m for m in listing.get("data", []) if isinstance(m, dict) and "id" in m]
        if wanted is None:
            if not models:
                raise GenerationError(f"the server at {self.url} lists no models; set generator.model")
            entry = models[0]
        else:
            entry = next((m for m in models if m["id"] == wanted), None)
            if entry is None:
                log.warning(
                    "the server at %s does not list model %r (it lists %s)", self.url, wanted, [m["id"] for m in models]
                )
                entry = {"id": wanted}
        return str(entry["id"]), str(entry.get("root") or entry["id"])

    def _request(self, method: str, path: str, body: dict[str, Any] | None, abort: threading.Event) -> dict[str, Any]:
        """One API call with retries on 429, 5xx, timeouts and lost connections; then GenerationError."""
        import httpx

        failure = ""
        for attempt in range(self.max_retries + 1):
            delay = min(MAX_BACKOFF, self.retry_backoff * 2**attempt) * random.uniform(0.5, 1.0)
            try:
                response = self._client.request(method, path, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status < 400:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise GenerationError(f"the server at {self.url} answered {path} with no JSON") from exc
                if status != 429 and status < 500:
                    hint = _HINTS.get(status, "the request was rejected as it is; retrying will not help")
                    raise GenerationError(
                        f"the server at {self.url} answered {method} {path} with HTTP {status}: "
                        f"{response.text[:500]} ({hint})"
                    )
                failure = f"HTTP {status}: {response.text[:200]}"
                retry_after = response.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    delay = min(MAX_BACKOFF, float(retry_after))
            if attempt == self.max_retries or abort.is_set():
                break
            log.warning(
                "generator server %s: %s; retry %d of %d in %.1f s",
                self.url,
                failure,
                attempt + 1,
                self.max_retries,
                delay,
            )
            if abort.wait(delay):
                break
        abort.set()  # the other requests of this call stop retrying: the call fails as a whole
        raise GenerationError(
            f"the generator server at {self.url} failed {method} {path} after {attempt + 1} attempt(s); last "
            f"error: {failure}. Check that the server is up and reachable (generator.base_url), or raise "
            "generator.max_retries / generator.request_timeout"
        )

    def _body(self, prompt: Prompt, params: SamplingParams, seed: int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": seed,
        }
        shape = params.candidate_list
        structured = shape is not None and self.structured_output != "off"
        if structured and self.structured_output == "json":
            body["max_tokens"] = json_max_tokens(params.max_tokens, shape)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "caption_list", "schema": caption_list_schema(shape), "strict": True},
            }
        elif structured:
            body["structured_outputs"] = {"regex": caption_list_regex(shape)}  # a vLLM extension
        if params.stop and not structured:  # the grammar bounds a structured reply
            body["stop"] = list(params.stop)
        if isinstance(prompt, str):
            return "completions", {**body, "prompt": prompt}
        return "chat/completions", {**body, "messages": prompt}

    def _one(self, prompt: Prompt, params: SamplingParams, seed: int, abort: threading.Event) -> Completion:
        path, body = self._body(prompt, params, seed)
        data = self._request("POST", path, body, abort)
        try:
            choice = data["choices"][0]
            text = choice["text"] if path == "completions" else choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise GenerationError(
                f"the server at {self.url} answered {path} without a completion: {data!r:.300}"
            ) from exc
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}  # OpenAI's and vLLM's (--enable-prompt-tokens-details)
        return Completion(
            text=text or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason") or "stop",
            cached_prompt_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
        )

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        if len(prompts) != len(seeds):
            raise ValueError("generate needs one seed per prompt")
        abort = threading.Event()
        futures = [self._pool.submit(self._one, p, params, s, abort) for p, s in zip(prompts, seeds, strict=True)]
        try:
            return [future.result() for future in futures]
        except BaseException:
            abort.set()
            for future in futures:
                future.cancel()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
