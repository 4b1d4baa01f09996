"""Video scorer from any open_clip image model: a clip's sampled frames are embedded as images
and mean-pooled (ViCLIP-style frame pooling without a video-specific model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from mils_pipeline.config import ScorerConfig
from mils_pipeline.media.video import VideoClip
from mils_pipeline.score.hf_common import mean_pooled
from mils_pipeline.score.open_clip_image import OpenClipImageScorer


class OpenClipVideoScorer(OpenClipImageScorer):
    modality = "video"

    def __init__(self, config: ScorerConfig) -> None:
        super().__init__(config)
        self.decode_options: dict[str, Any] = {"frames": config.frames}
        self.identity = replace(
            self.identity, parameters={**self.identity.parameters, "frames": config.frames, "pooling": "mean"}
        )

    def embed_media(self, media: Sequence[VideoClip]) -> np.ndarray:
        """One row per clip: the mean of its frames' image embeddings, renormalised. Frames of
        several clips share encoder batches."""
        frames = [frame for clip in media for frame in clip.frames]
        rows = super().embed_media(frames)
        if not frames:
            return rows
        return mean_pooled(rows, [len(clip.frames) for clip in media])
