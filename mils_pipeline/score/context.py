"""How many tokens a scorer's text tower reads, and how many caption words fit in them.

A text longer than the context is cut to its first tokens before it is embedded: the scorer rates
the prefix, and the words after it change nothing. SigLIP ViT-SO400M-14 reads 16 tokens, CLIP 77,
so the longest caption worth asking for depends on the scorer. The run config knows the context
from files alone (open_clip's model configs, ``scorer.architecture``, a checkpoint directory's
config), without building the model or importing torch; the built scorer reports the same number
from its tokenizer (``Scorer.text_context``), and tests/test_conformance.py checks the two agree.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mils_pipeline.config import ScorerConfig

# Tokens per English caption word, on the high side: CLIP's BPE took 1.02 (everyday-photos) and 1.08
# (toy-scenes) tokens per word over the bundled seed pools; sentencepiece vocabularies (SigLIP) split
# a little more. With a start and an end token, 16 tokens hold 10 words: the paper's SigLIP setting.
TOKENS_PER_WORD = 1.3
SPECIAL_TOKENS = 2

# transformers text towers: the config key of their position table, the positions it holds when
# the config leaves it out (ClapTextConfig, XCLIPTextConfig defaults), and the positions a text
# cannot use (RoBERTa, CLAP's text tower, starts counting at padding_idx + 1 = 2).
_TRANSFORMERS_TEXT = {"clap": (514, 2), "xclip": (77, 0)}


def caption_words_within(context_tokens: int) -> int:
    """The longest caption, in words, that a text tower of ``context_tokens`` reads whole."""
    return max(1, int((context_tokens - SPECIAL_TOKENS) / TOKENS_PER_WORD))


def configured_text_context(config: ScorerConfig) -> int | None:
    """Tokens the scorer ``config`` describes will read, from files only; None when only the model
    itself could say (an open_clip ``hf-hub:`` model, a transformers model named by hub id)."""
    if config.backend == "open_clip":
        return _open_clip_context(config)
    if config.backend in _TRANSFORMERS_TEXT:
        return _transformers_context(config)
    return None


def _open_clip_context(config: ScorerConfig) -> int | None:
    model_cfg: dict[str, Any] | None = config.architecture
    if model_cfg is None and config.checkpoint:
        directory = Path(config.checkpoint).expanduser()
        if (directory / "open_clip_config.json").is_file():
            model_cfg = json.loads((directory / "open_clip_config.json").read_text()).get("model_cfg")
    if model_cfg is None:
        model_cfg = _shipped_open_clip_config(config.model)
    if model_cfg is None:
        return None
    return int((model_cfg.get("text_cfg") or {}).get("context_length", 77))


def _shipped_open_clip_config(model: str) -> dict[str, Any] | None:
    """open_clip's own JSON config of ``model`` (shipped in its package), read without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model_configs" / f"{model}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _transformers_context(config: ScorerConfig) -> int | None:
    default_positions, offset = _TRANSFORMERS_TEXT[config.backend]
    model_cfg: dict[str, Any] | None = config.architecture
    if model_cfg is None and config.checkpoint:
        path = Path(config.checkpoint).expanduser() / "config.json"
        model_cfg = json.loads(path.read_text()) if path.is_file() else None
    if model_cfg is None:
        return None
    positions = (model_cfg.get("text_config") or {}).get("max_position_embeddings", default_positions)
    return int(positions) - offset
