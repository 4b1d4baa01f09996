"""Cost in one unit: GPU-seconds-equivalent on the reference GPU of docs/PERFORMANCE.md.

Completion tokens, prompt tokens, text encodes and media encodes are priced with one table
(``mils_pipeline/data/cost_model.yaml``). The loop uses it to value its operators and to stop an
item when it stops paying, the quality benchmark to give the equal-budget baseline the same
budget, the card to report what a dataset cost, and ``mils estimate`` to price a whole corpus on a
named GPU: the table's ``gpus`` scale the reference GPU's figures by memory bandwidth (decode) and
dense bf16 throughput (prefill, encoders), and give a rental price per hour.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from mils_pipeline.errors import ConfigError


@dataclass(frozen=True)
class CostModel:
    """GPU-seconds per unit of work for one modality on one GPU."""

    completion_token: float
    prompt_token: float
    text_encode: float
    media_encode: float
    gpu: str
    usd_per_hour: float | None = None  # the table's rental price of ``gpu``

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
def _table() -> dict[str, Any]:
    return yaml.safe_load(resources.files("mils_pipeline.data").joinpath("cost_model.yaml").read_text())


def gpu_names() -> list[str]:
    """The GPUs the cost model can price, the reference GPU first."""
    table = _table()
    return [table["gpu"], *(name for name in table["gpus"] if name != table["gpu"])]


@cache
def cost_model(modality: str = "image", gpu: str | None = None) -> CostModel:
    """The prices of ``modality``'s work on ``gpu`` (default: the reference GPU the table is in)."""
    table = _table()
    reference = table["gpus"][table["gpu"]]
    name = gpu or table["gpu"]
    if name not in table["gpus"]:
        raise ConfigError(f"no GPU named {name!r} in the cost model; known GPUs: {', '.join(gpu_names())}")
    card = table["gpus"][name]
    decode = float(reference["memory_bandwidth_tb_s"]) / float(card["memory_bandwidth_tb_s"])
    compute = float(reference["bf16_tflops"]) / float(card["bf16_tflops"])
    return CostModel(
        completion_token=float(table["completion_token"]) * decode,
        prompt_token=float(table["prompt_token"]) * compute,
        text_encode=float(table["text_encode"][modality]) * compute,
        media_encode=float(table["media_encode"][modality]) * compute,
        gpu=name,
        usd_per_hour=float(card["usd_per_hour"]),
    )
