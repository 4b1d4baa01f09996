"""open_clip image scorer: any open_clip model, from a pretrained tag, a local checkpoint, or a
config dict (tiny test models). fp32 on CPU, half precision on GPU."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mils_pipeline.config import ScorerConfig
from mils_pipeline.errors import ConfigError, ModelUnavailableError
from mils_pipeline.generate.base import ModelIdentity
from mils_pipeline.hashing import file_sha256

OFFLINE_FIX = (
    "Nothing is downloaded when the hub cannot be reached. On a machine with network, fetch the "
    'weights once (for example `python -c "import open_clip; '
    "open_clip.create_model('{model}', pretrained='{pretrained}')\"`, then copy the file from the "
    "Hugging Face cache), and set scorer.checkpoint=/path/to/open_clip_model.safetensors"
)


def register_architecture(name: str, architecture: dict[str, Any]) -> None:
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(architecture))
        open_clip.add_model_config(path)


def resolve_device_and_precision(config: ScorerConfig) -> tuple[str, str]:
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("scorer.device=cuda but no CUDA device is visible; use scorer.device=auto or cpu")
    precision = config.precision
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    return device, precision


class OpenClipImageScorer:
    modality = "image"

    def __init__(self, config: ScorerConfig) -> None:
        try:
            import open_clip
            import torch
        except ImportError as exc:
            raise ModelUnavailableError(
                "scorer.backend=open_clip needs open_clip_torch and torch: pip install 'mils-pipeline[open_clip]'"
            ) from exc
        self._torch = torch
        if config.architecture is not None:
            register_architecture(config.model, config.architecture)
        if config.model not in open_clip.list_models() and not config.model.startswith("hf-hub:"):
            raise ConfigError(
                f"scorer.model {config.model!r} is not an open_clip model; give scorer.architecture "
                "for a custom one, or pick one of open_clip.list_models()"
            )
        self.device, precision = resolve_device_and_precision(config)
        weights, revision = self._weights(config)
        self.random_weights = weights is None
        if self.random_weights:
            torch.manual_seed(config.init_seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                config.model, pretrained=weights, precision=precision, device=self.device
            )
        except Exception as exc:  # the hub client raises many types; all mean "could not fetch"
            if config.checkpoint:
                raise ModelUnavailableError(f"could not load scorer.checkpoint {config.checkpoint}: {exc}") from exc
            fix = OFFLINE_FIX.format(model=config.model, pretrained=config.pretrained)
            raise ModelUnavailableError(
                f"could not load open_clip model {config.model!r} (pretrained={config.pretrained!r}): "
                f"{type(exc).__name__}: {exc}. {fix}"
            ) from exc
        try:
            tokenizer = open_clip.get_tokenizer(config.model)
        except Exception as exc:  # SigLIP-style tokenizers come from the hub
            raise ModelUnavailableError(
                f"the tokenizer of {config.model!r} could not be loaded ({type(exc).__name__}: {exc}). "
                "SigLIP-style tokenizers come from the Hugging Face hub: run once with network so it is "
                "in the HF cache, then set HF_HUB_OFFLINE=1 (or point HF_HOME at a cache that holds it)"
            ) from exc
        model.eval()
        self._model = model
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self._dtype = next(model.parameters()).dtype
        self.identity = ModelIdentity(
            backend="open_clip",
            model=config.model,
            revision=revision,
            parameters={
                "precision": precision,
                "architecture": config.architecture,
            },
        )
        self.media_batch_size = config.media_batch_size

    @staticmethod
    def _weights(config: ScorerConfig) -> tuple[str | None, str]:
        if config.checkpoint:
            path = Path(config.checkpoint).expanduser()
            if not path.is_file():
                raise ModelUnavailableError(f"scorer.checkpoint {path} is not a file")
            return str(path), f"sha256:{file_sha256(path)}"
        if config.pretrained:
            return config.pretrained, f"pretrained:{config.pretrained}"
        return None, f"random-init:seed={config.init_seed}"

    def embed_media(self, media: Sequence[Any]) -> np.ndarray:
        torch = self._torch
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(media), self.media_batch_size):
                batch = media[start : start + self.media_batch_size]
                pixels = torch.stack([self._preprocess(image) for image in batch])
                pixels = pixels.to(self.device, dtype=self._dtype)
                outputs.append(self._model.encode_image(pixels, normalize=True).float().cpu().numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            tokens = self._tokenizer(list(texts)).to(self.device)
            return self._model.encode_text(tokens, normalize=True).float().cpu().numpy()
