"""CLAP audio scorer (transformers ClapModel; default laion/clap-htsat-unfused).

A clip arrives decoded as windows of the model's input length at its sample rate (the decoder
runs ahead, in the prefetch thread); each window is embedded and a clip's windows are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mils_pipeline.backends import ModelIdentity, resolve_device_and_precision
from mils_pipeline.config import ScorerConfig
from mils_pipeline.media.audio import AudioClip, AudioSpec
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
    mean_pooled,
    normalised,
    truncated_by,
    weights_source,
)


class ClapAudioScorer:
    modality = "audio"

    def __init__(self, config: ScorerConfig) -> None:
        torch, transformers = import_transformers()
        self._torch = torch
        source, revision = weights_source(config)
        self.random_weights = source is None
        self.device, precision = resolve_device_and_precision(config.device, config.precision)
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
        # RoBERTa's position ids start after the padding index: two positions no token can use
        self.text_context = min(int(tokenizer.model_max_length), model.config.text_config.max_position_embeddings - 2)
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

    def truncated(self, texts: Sequence[str]) -> np.ndarray:
        return truncated_by(self._tokenizer, texts, self.text_context)

    def footprint(self) -> ScorerFootprint:
        """Weights as loaded; a media item is one window, a mel spectrogram through HTSAT (a Swin
        transformer: stages of windowed attention, each a quarter of the tokens at twice the width)."""
        audio, text = self._model.config.audio_config, self._model.config.text_config
        element_bytes = self._dtype.itemsize
        channels = 4 if audio.enable_fusion else 1  # fusion stacks the whole clip with three crops
        spectrogram = channels * audio.spec_size**2 * element_bytes
        tokens, width = (audio.spec_size // audio.patch_size) ** 2, audio.patch_embeds_hidden_size
        stages = []
        for stage, heads in enumerate(audio.num_attention_heads):
            stage_tokens, stage_width = tokens // 4**stage, width * 2**stage
            mlp = int(stage_width * audio.mlp_ratio)
            stages.append(
                transformer_activation_bytes(
                    stage_tokens, stage_width, heads, mlp, element_bytes, attended=audio.window_size**2
                )
            )
        text_tokens = min(text.max_position_embeddings - 2, TEXT_TOKENS)
        return ScorerFootprint(
            weight_bytes=scorer_weight_bytes(self._model),
            text_bytes_per_item=transformer_activation_bytes(
                text_tokens, text.hidden_size, text.num_attention_heads, text.intermediate_size, element_bytes
            ),
            media_bytes_per_item=spectrogram + max(stages),
        )
