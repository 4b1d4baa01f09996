"""How much device memory a scorer needs, estimated from its shapes: what ``Scorer.footprint``
returns and the arithmetic the backends share to compute it. The GPU memory plan (memory.py)
reads only this, never a backend's model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Tokens a caption or seed-pool text takes at most in a tokenizer that pads to the longest text of
# the batch (transformers): captions are a few dozen words, so 77 (CLIP's context) bounds them.
TEXT_TOKENS = 77


@dataclass(frozen=True)
class ScorerFootprint:
    """Bytes a scorer needs on the device: its weights, and peak activations per batch element
    (one text; one media item as ``embed_media`` batches them, ``media_batch_size`` per call)."""

    weight_bytes: int
    text_bytes_per_item: int
    media_bytes_per_item: int


def transformer_activation_bytes(
    tokens: int, width: int, heads: int, mlp_width: int, element_bytes: int, attended: int | None = None
) -> int:
    """Peak activations of one sequence through one transformer block at inference: the residual
    stream, q/k/v, the MLP's hidden layer, and the attention matrix when it is materialised. Each
    token attends to ``attended`` others: all ``tokens`` unless attention is windowed."""
    attended = tokens if attended is None else attended
    return element_bytes * (tokens * (5 * width + mlp_width) + heads * tokens * attended)


def scorer_weight_bytes(model: Any) -> int:
    """Bytes of a torch module's parameters and buffers as loaded (after the precision cast)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
