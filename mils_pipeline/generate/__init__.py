"""Generators: backends chosen from a registry by the run config's ``generator.backend``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mils_pipeline.config import GeneratorConfig
from mils_pipeline.errors import ConfigError, GenerationError
from mils_pipeline.generate.base import CandidateList, Completion, Generator, ModelIdentity, Prompt, SamplingParams
from mils_pipeline.registry import GENERATOR_BACKENDS, load_factory

BACKENDS = GENERATOR_BACKENDS  # generator.backend -> "module:factory"; the table lives in registry.py


def build_generator(config: GeneratorConfig) -> Generator:
    """Create the generator the config names. Heavy imports happen here, not at package import."""
    try:
        target = BACKENDS[config.backend]
    except KeyError:
        raise ConfigError(
            f"generator.backend {config.backend!r} is not known; choose one of {sorted(BACKENDS)}"
        ) from None
    factory: Callable[[GeneratorConfig], Generator] = load_factory(target)
    return factory(config)


class UnusedGenerator:
    """Stands in for the generator of a run whose operators never call an LLM (``optimize.operators``
    without rewrite or edit): no weights are loaded and no engine is started. Provenance says so: the
    configured backend and model, ``revision`` "not loaded"."""

    def __init__(self, config: GeneratorConfig, reason: str) -> None:
        self.reason = reason
        self.identity = ModelIdentity(
            backend=config.backend,
            model=str(config.model or "default"),
            revision="not loaded",
            parameters={"loaded": False, "reason": reason},
        )

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        raise GenerationError(
            f"the generator was not loaded ({self.reason}); add an LLM operator (rewrite or edit) to "
            "optimize.operators to use it"
        )

    def close(self) -> None:
        return None


__all__ = [
    "BACKENDS",
    "CandidateList",
    "Completion",
    "Generator",
    "ModelIdentity",
    "Prompt",
    "SamplingParams",
    "UnusedGenerator",
    "build_generator",
]
