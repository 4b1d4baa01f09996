"""CLAP audio scorer (transformers ClapModel; default laion/clap-htsat-unfused).

A clip arrives decoded as windows of the model's input length at its sample rate (the decoder
runs ahead, in the prefetch thread); each window is embedded and a clip's windows are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mils_pipeline.config import ScorerConfig
from mils_pipeline.generate.base import ModelIdentity
from mils_pipeline.media.audio import AudioClip, AudioSpec
from mils_pipeline.score.hf_common import (
    TORCH_DTYPES,
    byte_level_tokenizer,
    import_transformers,
    load_pretrained,
    mean_pooled,
    normalised,
    weights_source,
)
from mils_pipeline.score.open_clip_image import resolve_device_and_precision


class ClapAudioScorer:
    modality = "audio"

    def __init__(self, config: ScorerConfig) -> None:
        torch, transformers = import_transformers()
        self._torch = torch
        source, revision = weights_source(config)
        self.random_weights = source is None
        self.device, precision = resolve_device_and_precision(config)
        if source is None:
            torch.manual_seed(config.init_seed)
            model = transformers.ClapModel(transformers.ClapConfig(**(config.architecture or {})))
            max_length = model.config.text_config.max_position_embeddings - 2  # RoBERTa offsets positions by 2
            tokenizer = byte_level_tokenizer(max_length)
            extractor = transformers.ClapFeatureExtractor(truncation="rand_trunc")
        else:
            model = load_pretrained(transformers.ClapModel, source, config, "CLAP model")
            tokenizer = load_pretrained(transformers.AutoTokenizer, source, config, "CLAP tokenizer")
            extractor = load_pretrained(transformers.ClapFeatureExtractor, source, config, "CLAP feature extractor")
        self._model = model.to(self.device, dtype=getattr(torch, TORCH_DTYPES[precision])).eval()
        self._dtype = next(self._model.parameters()).dtype
        self._tokenizer = tokenizer
        self._extractor = extractor
        self.spec = AudioSpec(
            sample_rate=int(extractor.sampling_rate),
            window_seconds=extractor.nb_max_samples / extractor.sampling_rate,
            windows=config.windows,
        )
        self.decode_options: dict[str, Any] = {"audio": self.spec}
        self.media_batch_size = config.media_batch_size
        self.identity = ModelIdentity(
            backend="clap",
            model=config.model,
            revision=revision,
            parameters={
                "precision": precision,
                "architecture": config.architecture,
                "sample_rate": self.spec.sample_rate,
                "window_seconds": self.spec.window_seconds,
                "windows": config.windows,
                "pooling": "mean",
            },
        )

    def embed_media(self, media: Sequence[AudioClip]) -> np.ndarray:
        """One row per clip: the mean of its windows' embeddings, renormalised."""
        torch = self._torch
        windows = [w for clip in media for w in clip.windows]
        rows = []
        with torch.inference_mode():
            for start in range(0, len(windows), self.media_batch_size):
                batch = windows[start : start + self.media_batch_size]
                features = self._extractor(batch, sampling_rate=self.spec.sample_rate, return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in features.items()}
                inputs["input_features"] = inputs["input_features"].to(self._dtype)
                rows.append(normalised(self._model.get_audio_features(**inputs).pooler_output))
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return mean_pooled(np.concatenate(rows), [len(clip.windows) for clip in media])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            tokens = self._tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
            return normalised(self._model.get_text_features(**tokens).pooler_output)
