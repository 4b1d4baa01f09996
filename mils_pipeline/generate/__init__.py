"""Generators: backends chosen from a registry by the run config's ``generator.backend``."""

from __future__ import annotations

from collections.abc import Callable

from mils_pipeline.config import GeneratorConfig
from mils_pipeline.errors import ConfigError
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


__all__ = [
    "BACKENDS",
    "CandidateList",
    "Completion",
    "Generator",
    "ModelIdentity",
    "Prompt",
    "SamplingParams",
    "build_generator",
]
