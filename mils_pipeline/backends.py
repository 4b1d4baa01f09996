"""What generator and scorer backends share: a model's provenance, the device and precision a
model runs in, and the error for an optional dependency that is not installed.

Both families import from here, never from each other, so a scorer does not depend on the
generator package (or the reverse). Nothing here imports torch at module import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mils_pipeline.errors import ConfigError, ModelUnavailableError


@dataclass(frozen=True)
class ModelIdentity:
    """Provenance of a model: which backend, which weights, with which parameters."""

    backend: str
    model: str
    revision: str
    parameters: dict[str, Any] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.model,
            "revision": self.revision,
            "parameters": json.dumps(self.parameters, sort_keys=True),
        }


def missing_dependency(what: str, extra: str, exc: ImportError) -> ModelUnavailableError:
    """The error for ``what`` (e.g. "scorer.backend=clap needs torch and transformers") when an
    import failed: it names the extra that installs it. Raise it ``from exc``."""
    return ModelUnavailableError(f"{what}: pip install 'mils-pipeline[{extra}]' ({exc})")


def resolve_device_and_precision(device: str, precision: str) -> tuple[str, str]:
    """The concrete (device, precision) of the ``scorer.device`` and ``scorer.precision`` settings:
    auto is cuda when a CUDA device is visible, and fp16 on cuda, fp32 elsewhere."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("scorer.device=cuda but no CUDA device is visible; use scorer.device=auto or cpu")
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    return device, precision
