"""open_clip image scorer: any open_clip model, from a pretrained tag, a local checkpoint, or a
config dict (tiny test models). fp32 on CPU, half precision on GPU."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mils_pipeline.backends import ModelIdentity, missing_dependency, resolve_device_and_precision
from mils_pipeline.config import ScorerConfig
from mils_pipeline.errors import ConfigError, ModelUnavailableError
from mils_pipeline.hashing import file_sha256
from mils_pipeline.score.footprint import ScorerFootprint, scorer_weight_bytes, transformer_activation_bytes

OFFLINE_FIX = (
    "Nothing is downloaded when the hub cannot be reached. On a machine with network, fetch the "
    'weights once (for example `python -c "import open_clip; '
    "open_clip.create_model('{model}', pretrained='{pretrained}')\"`, then copy the file from the "
    "Hugging Face cache), and set scorer.checkpoint=/path/to/open_clip_model.safetensors"
)


PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _preprocess_of(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {key: cfg[key] for key in PREPROCESS_KEYS if cfg.get(key) is not None}
    for key in ("mean", "std"):
        if key in out:
            out[key] = [float(v) for v in out[key]]
    return out


def checkpoint_files(checkpoint: str) -> tuple[Path, Path | None]:
    """(weights file, open_clip_config.json or None) of ``scorer.checkpoint``: a weights file, or a
    directory in the hub's layout (as copied from a Hugging Face cache)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                config = path / "open_clip_config.json"
                return path / name, config if config.is_file() else None
        raise ModelUnavailableError(f"scorer.checkpoint {path} is a directory without {' or '.join(WEIGHT_FILES)}")
    if not path.is_file():
        raise ModelUnavailableError(f"scorer.checkpoint {path} is not a file or a model directory")
    return path, None


def resolve_preprocess(config: ScorerConfig) -> tuple[dict[str, Any] | None, str]:
    """The image preprocessing a scorer's weights expect, and where it came from. None: leave it to
    open_clip (weights by pretrained tag, which open_clip matches itself, or random weights).

    A checkpoint file says nothing about how it was trained, and open_clip then falls back to the
    OpenAI CLIP values (resize and crop, OpenAI mean and std): wrong for SigLIP (squash, mean = std =
    0.5). So, in order: ``scorer.preprocess``; the checkpoint directory's open_clip_config.json; the
    pretrained tag ``scorer.pretrained`` names (open_clip's table, offline); the preprocessing every
    tag of the model shares. Tags that disagree, with none of those given, are a ConfigError."""
    import open_clip

    if config.preprocess is not None:
        return _preprocess_of(config.preprocess.model_dump()), "scorer.preprocess"
    if not config.checkpoint:
        return None, f"pretrained tag {config.pretrained}" if config.pretrained else "open_clip defaults"
    _, directory_config = checkpoint_files(config.checkpoint)
    if directory_config is not None:
        found = json.loads(directory_config.read_text()).get("preprocess_cfg") or {}
        if _preprocess_of(found):
            return _preprocess_of(found), str(directory_config)
    tags = open_clip.list_pretrained_tags_by_model(config.model)
    if config.pretrained and config.pretrained in tags:
        return _preprocess_of(open_clip.get_pretrained_cfg(config.model, config.pretrained)), (
            f"pretrained tag {config.pretrained}"
        )
    if config.pretrained and "pretrained" in config.model_fields_set:
        raise ConfigError(
            f"scorer.pretrained {config.pretrained!r} is not a tag of {config.model!r} (its tags: {tags}); it "
            "names the preprocessing of scorer.checkpoint: set the tag the checkpoint was trained as, or "
            "scorer.preprocess"
        )
    variants: dict[str, list[str]] = {}
    for tag in tags:
        variants.setdefault(json.dumps(_preprocess_of(open_clip.get_pretrained_cfg(config.model, tag))), []).append(tag)
    if len(variants) > 1:
        listed = "; ".join(f"{', '.join(names[:3])}: {cfg}" for cfg, names in variants.items())
        raise ConfigError(
            f"the pretrained tags of {config.model!r} preprocess images differently ({listed}), and nothing "
            f"says which one scorer.checkpoint {config.checkpoint} was trained as: set scorer.pretrained to "
            "its tag, or scorer.preprocess (mean, std, interpolation, resize_mode)"
        )
    if variants:
        return json.loads(next(iter(variants))), f"every pretrained tag of {config.model}"
    return None, "open_clip defaults"


def preprocess_arguments(preprocess_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments of ``open_clip.create_model_and_transforms`` that force ``preprocess_cfg``
    (from ``resolve_preprocess``; None: none, open_clip's own)."""
    if not preprocess_cfg:
        return {}
    return {
        "image_mean": tuple(preprocess_cfg["mean"]) if "mean" in preprocess_cfg else None,
        "image_std": tuple(preprocess_cfg["std"]) if "std" in preprocess_cfg else None,
        "image_interpolation": preprocess_cfg.get("interpolation"),
        "image_resize_mode": preprocess_cfg.get("resize_mode"),
    }


def register_architecture(name: str, architecture: dict[str, Any]) -> None:
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(architecture))
        open_clip.add_model_config(path)


class OpenClipImageScorer:
    modality = "image"

    def __init__(self, config: ScorerConfig) -> None:
        try:
            import open_clip
            import torch
        except ImportError as exc:
            what = "scorer.backend=open_clip needs open_clip_torch and torch"
            raise missing_dependency(what, "open_clip", exc) from exc
        self._torch = torch
        if config.architecture is not None:
            register_architecture(config.model, config.architecture)
        if config.model not in open_clip.list_models() and not config.model.startswith("hf-hub:"):
            raise ConfigError(
                f"scorer.model {config.model!r} is not an open_clip model; give scorer.architecture "
                "for a custom one, or pick one of open_clip.list_models()"
            )
        self.device, precision = resolve_device_and_precision(config.device, config.precision)
        weights, revision = self._weights(config)
        preprocess_cfg, preprocess_source = resolve_preprocess(config)
        forced = preprocess_arguments(preprocess_cfg)
        self.random_weights = weights is None
        if self.random_weights:
            torch.manual_seed(config.init_seed)
        try:
            # weights_only: a .pt/.bin checkpoint is unpickled without running code (safetensors never is)
            model, _, preprocess = open_clip.create_model_and_transforms(
                config.model,
                pretrained=weights,
                precision=precision,
                device=self.device,
                weights_only=True,
                **forced,
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
        self.text_context = int(tokenizer.context_length)
        # the dtype the towers compute in: with fp16/bf16, open_clip's own (non-timm) models keep some
        # parameters (positional_embedding, the first one) in fp32, so no parameter's dtype will do
        self._dtype = open_clip.get_input_dtype(precision) or torch.float32
        self._model_config = config.architecture or open_clip.get_model_config(config.model) or {}
        self.decode_options: dict[str, Any] = {}
        self.identity = ModelIdentity(
            backend="open_clip",
            model=config.model,
            revision=revision,
            parameters={
                "precision": precision,
                "architecture": config.architecture,
                "preprocess": {**(preprocess_cfg or {}), "source": preprocess_source},
            },
        )
        self.media_batch_size = config.media_batch_size

    @staticmethod
    def _weights(config: ScorerConfig) -> tuple[str | None, str]:
        if config.checkpoint:
            path, _ = checkpoint_files(config.checkpoint)
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

    def truncated(self, texts: Sequence[str]) -> np.ndarray:
        """open_clip's tokenizers cut a text to the context and pad the rest: tokenized one position
        wider, a text that fits leaves the last position padding (what an empty text has there)."""
        if not texts:
            return np.zeros(0, dtype=bool)
        wider = self._tokenizer([*texts, ""], context_length=self.text_context + 1)
        padding = wider[-1, -1]
        return (wider[:-1, -1] != padding).cpu().numpy()

    def footprint(self) -> ScorerFootprint:
        weights = scorer_weight_bytes(self._model)
        return footprint_from_open_clip_config(self._model_config, weights, self._dtype.itemsize)


def footprint_from_open_clip_config(
    model_config: dict[str, Any], weight_bytes: int, element_bytes: int = 2
) -> ScorerFootprint:
    """Per-item activation estimates from an open_clip model config (``open_clip.get_model_config``
    or ``scorer.architecture``); ``weight_bytes`` from the loaded model (``scorer_weight_bytes``).
    A media item is one image (a video clip's frames are embedded as images, in image batches)."""
    vision = model_config.get("vision_cfg", {})
    text = model_config.get("text_cfg", {})
    image_size = vision.get("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, list | tuple) else image_size
    if vision.get("timm_model_name"):  # SigLIP and friends: the tower's shape lives in timm
        v_tokens, v_width, v_heads, v_mlp = _timm_vision_shape(vision["timm_model_name"])
    else:
        v_width = vision.get("width", 768)
        v_tokens = (image_size // vision.get("patch_size", 16)) ** 2 + 1
        v_heads = max(1, v_width // vision.get("head_width", 64))
        v_mlp = int(v_width * vision.get("mlp_ratio", 4.0))
    t_width = text.get("width", 512)
    t_tokens = text.get("context_length", 77)
    t_heads = text.get("heads", 8)
    t_mlp = int(t_width * text.get("mlp_ratio", 4.0))
    pixels = 3 * image_size * image_size * element_bytes
    return ScorerFootprint(
        weight_bytes=weight_bytes,
        text_bytes_per_item=transformer_activation_bytes(t_tokens, t_width, t_heads, t_mlp, element_bytes),
        media_bytes_per_item=pixels + transformer_activation_bytes(v_tokens, v_width, v_heads, v_mlp, element_bytes),
    )


def _timm_vision_shape(name: str) -> tuple[int, int, int, int]:
    """(tokens, width, heads, MLP width) of a timm ViT, built on the meta device (no memory, no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        tower = timm.create_model(name, pretrained=False, num_classes=0)
    block = tower.blocks[0]
    tokens = tower.patch_embed.num_patches + getattr(tower, "num_prefix_tokens", 0)
    return tokens, tower.embed_dim, block.attn.num_heads, block.mlp.fc1.out_features
