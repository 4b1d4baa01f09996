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
    structured output (``generator.structured_output``) constrain decoding to it; backends with a
    list guard stop the reply at ``n`` new captions, after ``patience`` lines in a row without one
    (0: never), and with ``refuse_known`` keep a line from ending on a known caption; others
    ignore it."""

    n: int
    max_words: int
    patience: int = 0
    refuse_known: bool = False


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by every prompt of one generate call."""

    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...] = ()
    candidate_list: CandidateList | None = None
    # text every prompt of the call starts with: a backend may evaluate it once for all of them
    shared_prefix: str = ""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    # prompt tokens the engine served from its prefix cache (vLLM reports them; 0 where unknown)
    cached_prompt_tokens: int = 0
    # completion tokens of the reply's lines that the backend's list guard accepted as new
    # candidates (None: the backend has no guard; the caller estimates the share from characters)
    useful_tokens: int | None = None


@runtime_checkable
class Generator(Protocol):
    identity: ModelIdentity

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        """Complete every prompt (one seed each); the batch is one call, however the backend runs it.

        A backend that sets ``guards_lists = True`` also takes ``known=``: per prompt, the normal
        forms (``text.normalise_text``) of the captions it must not write again. With
        ``params.candidate_list`` it then stops a reply once it holds ``n`` new captions and keeps
        it from ending a line on a known one (mils_pipeline/generate/llamacpp_batch.py)."""
        ...

    def close(self) -> None: ...
