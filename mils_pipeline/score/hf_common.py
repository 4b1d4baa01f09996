"""What the transformers scorers (CLAP, X-CLIP) share: where the weights come from, the offline
failure message, a tokenizer for randomly initialised models, and batched normalised embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mils_pipeline.backends import missing_dependency
from mils_pipeline.config import ScorerConfig
from mils_pipeline.errors import ModelUnavailableError
from mils_pipeline.hashing import directory_sha256

OFFLINE_FIX = (
    "Nothing is downloaded when the hub cannot be reached. On a machine with network, fetch the "
    "model once (for example `hf download {model} --revision {revision} --local-dir /models/{name}`), "
    "copy the directory, and set scorer.checkpoint=/models/{name}"
)
_WEIGHT_FILES = ("*.safetensors", "*.bin")


def import_transformers() -> tuple[Any, Any]:
    """(torch, transformers), or ModelUnavailableError naming the extra to install."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        what = "scorer backends clap and xclip need torch and transformers"
        raise missing_dependency(what, "transformers", exc) from exc
    return torch, transformers


def weights_source(config: ScorerConfig) -> tuple[str | None, str]:
    """(what to load with from_pretrained, revision label). None: random weights from
    ``config.architecture``."""
    if config.checkpoint:
        path = Path(config.checkpoint).expanduser()
        if not path.is_dir():
            raise ModelUnavailableError(
                f"scorer.checkpoint {path} is not a directory; a {config.backend} checkpoint is the directory "
                "written by save_pretrained (config.json, weights, tokenizer and feature extractor files)"
            )
        return str(path), f"sha256:{weights_sha256(path)}"
    if config.pretrained:
        return config.model, f"hub:{config.model}@{config.pretrained}"
    if config.architecture is None:
        raise ModelUnavailableError(
            f"scorer.pretrained is empty and there is no scorer.checkpoint: give scorer.architecture (the "
            f"model's config keywords) for a random-weight {config.backend} model, or a checkpoint directory"
        )
    return None, f"random-init:seed={config.init_seed}"


def weights_sha256(path: Path) -> str:
    """One hash over a checkpoint directory's weight files (names and contents)."""
    digest = directory_sha256(path, _WEIGHT_FILES)
    if not digest:
        raise ModelUnavailableError(f"scorer.checkpoint {path} holds no weights (*.safetensors or *.bin)")
    return digest


# torch dtype names of the scorer precisions
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_pretrained(loader: Any, source: str, config: ScorerConfig, what: str) -> Any:
    """``loader.from_pretrained`` with the hub's many failure types turned into one clear error.
    Model weights in a pickle (``*.bin``) are read with ``weights_only``: tensors, never code;
    tokenizers and processors read JSON and vocabulary files."""
    import transformers

    local = config.checkpoint is not None
    is_model = isinstance(loader, type) and issubclass(loader, transformers.PreTrainedModel)
    safe = {"weights_only": True} if is_model else {}
    try:
        if local:
            return loader.from_pretrained(source, local_files_only=True, **safe)
        return loader.from_pretrained(source, revision=config.pretrained, **safe)
    except Exception as exc:  # the hub client raises many types; all mean "could not load"
        if local:
            raise ModelUnavailableError(f"could not load the {what} from scorer.checkpoint {source}: {exc}") from exc
        fix = OFFLINE_FIX.format(model=config.model, revision=config.pretrained, name=config.model.split("/")[-1])
        raise ModelUnavailableError(
            f"could not load the {what} of {config.model!r} (revision {config.pretrained!r}): "
            f"{type(exc).__name__}: {exc}. {fix}"
        ) from exc


def byte_level_tokenizer(max_length: int, eos_last: bool = False) -> Any:
    """A tokenizer that needs no files: byte-level BPE without merges (one token per byte) and
    RoBERTa-style special tokens. For randomly initialised models only: real checkpoints bring
    their own tokenizer. ``eos_last`` gives the end token the highest id (CLIP-style text towers
    pool at the highest id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "<unk>"] + ([] if eos_last else ["</s>"])
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    if eos_last:
        vocab["</s>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def truncated_by(tokenizer: Any, texts: Sequence[str], context: int) -> np.ndarray:
    """Bool per text: more than ``context`` tokens in ``tokenizer`` (which cuts them to it)."""
    if not texts:
        return np.zeros(0, dtype=bool)
    ids = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
    return np.array([len(row) > context for row in ids], dtype=bool)


def normalised(features: Any) -> np.ndarray:
    """A (n, d) torch tensor -> L2-normalised float32 numpy rows."""
    array = features.float().cpu().numpy()
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return (array / np.maximum(norms, 1e-12)).astype(np.float32)


def mean_pooled(rows: np.ndarray, counts: list[int]) -> np.ndarray:
    """Average consecutive groups of rows (a clip's frames or windows), renormalised."""
    pooled = []
    start = 0
    for count in counts:
        mean = rows[start : start + count].mean(axis=0)
        pooled.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        start += count
    return np.stack(pooled).astype(np.float32) if pooled else np.zeros((0, rows.shape[1]), np.float32)
