"""Prompt templates written by this project.

Layout rule: the fixed instructions come first and the per-item scored candidates last, so a
prefix cache (vLLM's, llama.cpp's KV reuse) serves the common part of every request of a round.

Two styles. ``completion`` is a few-shot list continuation: small models (SmolLM2-135M, Gemma 3
270M) follow it far better than chat instructions. ``chat`` sends the same content through the
model's chat template, for instruction-tuned models on vLLM or an OpenAI-compatible server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mils_pipeline.generate.base import Prompt

MEDIA_NOUN = {"image": "photo", "video": "video clip", "audio": "sound recording"}

REFINE_INSTRUCTIONS = (
    "The lines below are captions of one {noun}. Each line starts with a score from a model that "
    "checks how well a caption matches the {noun}: higher is better. Write {n} new captions, each "
    "at most {max_words} words, that would score higher than the best one. Keep the details of "
    "high-scoring captions, drop or change the details of low-scoring ones, and try new details."
)
# Per modality, what a caption should say (the paper asks for scene and action in video, and for
# sound sources in audio). Image runs use REFINE_INSTRUCTIONS as it is.
REFINE_FOCUS = {
    "video": " Say what happens in the clip: the scene, who or what is in it, and what they do.",
    "audio": " Say what can be heard: what makes each sound, what it is doing, and where.",
}
SEED_INSTRUCTIONS = "Short captions of {theme}, one per line, each at most {max_words} words:"
# Edit mode: the best caption opens a list of its variations and the model continues the list.
# Small models copy the line above them with a change far more reliably than they improve on a
# list they are told about, so an edit round is a local search step around the best caption.
EDIT_INSTRUCTIONS = "Variations of the best caption, each changing one detail (at most {max_words} words):"


@dataclass(frozen=True)
class PromptTemplate:
    """The fixed text of a run's prompts; its hash goes into every output row."""

    style: str
    refine_instructions: str = REFINE_INSTRUCTIONS
    seed_instructions: str = SEED_INSTRUCTIONS
    edit_instructions: str = EDIT_INSTRUCTIONS

    def sha256(self) -> str:
        canonical = repr(sorted(asdict(self).items()))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def for_modality(cls, style: str, modality: str) -> PromptTemplate:
        """The run's templates: the refine instructions carry the modality's caption focus."""
        return cls(style=style, refine_instructions=REFINE_INSTRUCTIONS + REFINE_FOCUS.get(modality, ""))


SHOWN_HEADER = "Captions, best last:\n"


def refine_prefix(template: PromptTemplate, n: int, max_words: int, modality: str) -> str:
    """The text every completion-style refine prompt of a run starts with (the instructions), which
    a backend may evaluate once for all of them; empty for chat prompts."""
    if template.style == "chat":
        return ""
    noun = MEDIA_NOUN.get(modality, modality)
    return f"{template.refine_instructions.format(noun=noun, n=n, max_words=max_words)}\n\n{SHOWN_HEADER}"


def _score_lines(scored: Sequence[tuple[str, float]]) -> str:
    """Scored candidates worst first, best last: the best sits next to where the model writes."""
    ordered = sorted(scored, key=lambda pair: pair[1])
    return "\n".join(f"{score:.3f}: {text}" for text, score in ordered)


def refine_prompt(
    template: PromptTemplate,
    scored: Sequence[tuple[str, float]],
    n: int,
    max_words: int,
    modality: str,
    mode: str = "rewrite",
) -> Prompt:
    noun = MEDIA_NOUN.get(modality, modality)
    instructions = template.refine_instructions.format(noun=noun, n=n, max_words=max_words)
    shown = f"{SHOWN_HEADER}{_score_lines(scored)}\n\n"
    if mode == "edit":
        # the list the model continues opens with the best caption
        best = max(scored, key=lambda pair: pair[1])[0]
        header = template.edit_instructions.format(n=n, max_words=max_words)
        ask = f"{header}\nWrite {n} variations of this caption, one per line, numbered: {best}"
        tail = f"{header}\n1. {best}\n2."
    else:
        ask = f"Write {n} new captions, one per line, numbered."
        tail = "New captions:\n1."
    if template.style == "chat":
        return [{"role": "system", "content": instructions}, {"role": "user", "content": shown + ask}]
    return f"{instructions}\n\n{shown}{tail}"


def seed_prompt(template: PromptTemplate, theme: str, examples: Sequence[str], max_words: int) -> Prompt:
    header = template.seed_instructions.format(theme=theme, max_words=max_words)
    if template.style == "chat":
        shown = "\n".join(f"- {e}" for e in examples)
        return [
            {"role": "system", "content": header},
            {"role": "user", "content": f"Examples:\n{shown}\n\nWrite 20 more, one per line, all different."},
        ]
    numbered = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, start=1))
    return f"{header}\n{numbered}\n{len(examples) + 1}."


def refine_stop(template: PromptTemplate, n: int, mode: str = "rewrite", guarded: bool = False) -> tuple[str, ...]:
    """Stop once the N-th candidate is written, or when the model starts a new block. An edit
    prompt's list starts with the best caption as item 1, so its N new ones end at N + 1.
    ``guarded``: the backend stops the reply itself once it holds N new captions (its list guard),
    so the list may run past N lines when some were repeats."""
    if template.style == "chat":
        return ()
    # a blank line ends the list: what small models write after it is commentary, and tokens
    blocks = ("\nCaptions", "\n\n")
    if guarded:
        return blocks
    last = n + 1 if mode == "edit" else n
    return (f"\n{last + 1}.", *blocks)


def max_tokens_for(n: int, max_words: int) -> int:
    """Completion budget for N captions of at most ``max_words`` words (about 1.5 tokens a word,
    plus list numbering), instead of a large fixed cap."""
    return n * (int(max_words * 1.5) + 4) + 16
