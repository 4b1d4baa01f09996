"""Cost in one unit: GPU-seconds-equivalent on the reference GPU of docs/PERFORMANCE.md.

Completion tokens, prompt tokens, text encodes and media encodes are priced with one table
(``mils_pipeline/data/cost_model.yaml``). The loop uses it to value its operators and to stop an
item when it stops paying, the quality benchmark to give the equal-budget baseline the same
budget, and the card to report what a dataset cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml


@dataclass(frozen=True)
class CostModel:
    """GPU-seconds per unit of work for one modality."""

    completion_token: float
    prompt_token: float
    text_encode: float
    media_encode: float
    gpu: str

    def gpu_seconds(
        self, completion_tokens: int = 0, prompt_tokens: int = 0, text_encodes: int = 0, media_encodes: int = 0
    ) -> float:
        return (
            completion_tokens * self.completion_token
            + prompt_tokens * self.prompt_token
            + text_encodes * self.text_encode
            + media_encodes * self.media_encode
        )


@cache
def cost_model(modality: str = "image") -> CostModel:
    table = yaml.safe_load(resources.files("mils_pipeline.data").joinpath("cost_model.yaml").read_text())
    return CostModel(
        completion_token=float(table["completion_token"]),
        prompt_token=float(table["prompt_token"]),
        text_encode=float(table["text_encode"][modality]),
        media_encode=float(table["media_encode"][modality]),
        gpu=str(table["gpu"]),
    )
