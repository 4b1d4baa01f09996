"""The Generator protocol: a text-only LLM that completes a batch of prompts in one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mils_pipeline.backends import ModelIdentity  # generator backends import it from here

# A prompt is plain text (completion style) or a list of chat messages ({"role", "content"}).
Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class CandidateList:
    """What a refine reply should be: ``n`` captions of at most ``max_words`` words. Backends with
    structured output (``generator.structured_output``) constrain decoding to it; others ignore it."""

    n: int
    max_words: int


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by every prompt of one generate call."""

    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...] = ()
    candidate_list: CandidateList | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"


@runtime_checkable
class Generator(Protocol):
    identity: ModelIdentity

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        """Complete every prompt (one seed each); the batch is one call, however the backend runs it."""
        ...

    def close(self) -> None: ...
