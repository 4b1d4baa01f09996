"""X-CLIP video scorer (transformers XCLIPModel, e.g. microsoft/xclip-base-patch32): a video-text
model that attends across a clip's frames instead of averaging them.

Texts are embedded on their own (`get_text_features`), without X-CLIP's video-conditioned prompt,
so a text's embedding does not depend on the clip and the text-embedding cache and the stored
seed-pool embeddings apply as for any other scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mils_pipeline.backends import ModelIdentity, resolve_device_and_precision
from mils_pipeline.config import ScorerConfig
from mils_pipeline.media.video import VideoClip
from mils_pipeline.score.footprint import (
    TEXT_TOKENS,
    ScorerFootprint,
    scorer_weight_bytes,
    transformer_activation_bytes,
)
from mils_pipeline.score.hf_common import (
    TORCH_DTYPES,
    byte_level_tokenizer,
    import_transformers,
    load_pretrained,
    normalised,
    truncated_by,
    weights_source,
)


def _frames_exactly(frames: list[Any], count: int) -> list[Any]:
    """X-CLIP's frame attention has a fixed frame count: a shorter clip repeats frames evenly."""
    if len(frames) == count:
        return frames
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return [frames[i] for i in picks]


class XClipVideoScorer:
    modality = "video"

    def __init__(self, config: ScorerConfig) -> None:
        torch, transformers = import_transformers()
        self._torch = torch
        source, revision = weights_source(config)
        self.random_weights = source is None
        self.device, precision = resolve_device_and_precision(config.device, config.precision)
        if source is None:
            torch.manual_seed(config.init_seed)
            architecture = dict(config.architecture or {})
            architecture.setdefault("vision_config", {})["num_frames"] = config.frames
            model = transformers.XCLIPModel(transformers.XCLIPConfig(**architecture))
            vision = model.config.vision_config
            tokenizer = byte_level_tokenizer(model.config.text_config.max_position_embeddings, eos_last=True)
            processor = transformers.VideoMAEImageProcessor(
                size={"shortest_edge": vision.image_size},
                crop_size={"height": vision.image_size, "width": vision.image_size},
            )
        else:
            model = load_pretrained(transformers.XCLIPModel, source, config, "X-CLIP model")
            tokenizer = load_pretrained(transformers.AutoTokenizer, source, config, "X-CLIP tokenizer")
            processor = load_pretrained(transformers.VideoMAEImageProcessor, source, config, "X-CLIP image processor")
        self.frames = int(model.config.vision_config.num_frames)
        self._model = model.to(self.device, dtype=getattr(torch, TORCH_DTYPES[precision])).eval()
        self._dtype = next(self._model.parameters()).dtype
        self._tokenizer = tokenizer
        self._processor = processor
        self.text_context = min(int(tokenizer.model_max_length), model.config.text_config.max_position_embeddings)
        self.decode_options: dict[str, Any] = {"frames": self.frames}
        self.media_batch_size = config.media_batch_size
        self.identity = ModelIdentity(
            backend="xclip",
            model=config.model,
            revision=revision,
            parameters={"precision": precision, "architecture": config.architecture, "frames": self.frames},
        )

    def embed_media(self, media: Sequence[VideoClip]) -> np.ndarray:
        """One row per clip (``media_batch_size`` clips per encoder call)."""
        torch = self._torch
        rows = []
        with torch.inference_mode():
            for start in range(0, len(media), self.media_batch_size):
                batch = [
                    _frames_exactly(clip.frames, self.frames) for clip in media[start : start + self.media_batch_size]
                ]
                pixels = self._processor.preprocess(batch, return_tensors="pt")["pixel_values"]
                pixels = pixels.to(self.device, dtype=self._dtype)
                rows.append(normalised(self._model.get_video_features(pixel_values=pixels).pooler_output))
        return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            tokens = self._tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
            return normalised(self._model.get_text_features(**tokens).pooler_output)

    def truncated(self, texts: Sequence[str]) -> np.ndarray:
        return truncated_by(self._tokenizer, texts, self.text_context)

    def footprint(self) -> ScorerFootprint:
        """Weights as loaded; a media item is a clip: its frames go through the vision tower together
        (each frame's patches plus one message token), the cross-frame layers are small beside it."""
        vision, text = self._model.config.vision_config, self._model.config.text_config
        element_bytes = self._dtype.itemsize
        pixels = 3 * vision.image_size**2 * element_bytes
        tokens = (vision.image_size // vision.patch_size) ** 2 + 2  # patches, class token, message token
        frame = pixels + transformer_activation_bytes(
            tokens, vision.hidden_size, vision.num_attention_heads, vision.intermediate_size, element_bytes
        )
        text_tokens = min(text.max_position_embeddings, TEXT_TOKENS)
        return ScorerFootprint(
            weight_bytes=scorer_weight_bytes(self._model),
            text_bytes_per_item=transformer_activation_bytes(
                text_tokens, text.hidden_size, text.num_attention_heads, text.intermediate_size, element_bytes
            ),
            media_bytes_per_item=self.frames * frame,
        )
