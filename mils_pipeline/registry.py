"""Backends are chosen from registries by name: a new backend is one new file and one registry line.

The tables are the only lists of backend names. They hold "module:factory" strings, not imports,
so the config can validate names against them without importing generate/ or score/ (and so
without torch or vLLM); the factories are imported only when a backend is built.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# generator.backend -> "module:factory"
GENERATOR_BACKENDS: dict[str, str] = {
    "llamacpp": "mils_pipeline.generate.llamacpp:LlamaCppGenerator",
    "vllm": "mils_pipeline.generate.vllm:VllmGenerator",
    "openai": "mils_pipeline.generate.openai:OpenAIGenerator",
}

# (scorer.backend, modality it scores) -> "module:factory"
SCORER_BACKENDS: dict[tuple[str, str], str] = {
    ("open_clip", "image"): "mils_pipeline.score.open_clip_image:OpenClipImageScorer",
    ("open_clip", "video"): "mils_pipeline.score.open_clip_video:OpenClipVideoScorer",
    ("xclip", "video"): "mils_pipeline.score.xclip_video:XClipVideoScorer",
    ("clap", "audio"): "mils_pipeline.score.clap_audio:ClapAudioScorer",
}


def scorer_backend_names() -> set[str]:
    """Every ``scorer.backend`` name, whatever modality it scores."""
    return {backend for backend, _ in SCORER_BACKENDS}


def load_factory(target: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute (imports happen only here)."""
    module_name, _, attribute = target.partition(":")
    return getattr(import_module(module_name), attribute)
