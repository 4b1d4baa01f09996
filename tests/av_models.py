"""Tiny randomly initialised video and audio scorers, built in the tests (nothing downloads)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TINY_ARCHITECTURE

# A 2-stage CLAP: the audio tower's final width (hidden_size) is its patch width doubled once.
TINY_CLAP_ARCHITECTURE = {
    "text_config": {
        "vocab_size": 300,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 66,
        "projection_dim": 32,
    },
    "audio_config": {
        "hidden_size": 32,
        "patch_embeds_hidden_size": 16,
        "depths": [1, 1],
        "num_attention_heads": [2, 2],
        "window_size": 4,
        "projection_dim": 32,
    },
    "projection_dim": 32,
}


def tiny_clap_settings(**extra) -> dict:
    return {
        "backend": "clap",
        "model": "mils-test-tiny-clap",
        "pretrained": None,
        "architecture": TINY_CLAP_ARCHITECTURE,
        "init_seed": 0,
        **extra,
    }


def tiny_video_settings(**extra) -> dict:
    return {
        "backend": "open_clip",
        "model": "mils-test-tiny",
        "pretrained": None,
        "architecture": TINY_ARCHITECTURE,
        "init_seed": 0,
        "frames": 4,
        **extra,
    }


def save_tiny_clap_checkpoint(directory: Path, corpus: list[str]) -> Path:
    """A CLAP checkpoint directory as `save_pretrained` writes it: tiny random weights, a BPE
    tokenizer trained on ``corpus`` with the tokenizers package, and a feature extractor."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
    )
    torch.manual_seed(1)
    architecture = {**TINY_CLAP_ARCHITECTURE, "text_config": {**TINY_CLAP_ARCHITECTURE["text_config"]}}
    architecture["text_config"]["vocab_size"] = fast.vocab_size
    model = ClapModel(ClapConfig(**architecture))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    ClapFeatureExtractor(truncation="rand_trunc").save_pretrained(directory)
    return directory


TINY_XCLIP_ARCHITECTURE = {
    "text_config": {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
    },
    "vision_config": {
        "image_size": 32,
        "patch_size": 16,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "mit_hidden_size": 32,
        "mit_intermediate_size": 64,
        "mit_num_hidden_layers": 1,
        "mit_num_attention_heads": 2,
    },
    "projection_dim": 32,
    "prompt_layers": 1,
    "prompt_attention_heads": 2,
}


def tiny_xclip_settings(**extra) -> dict:
    return {
        "backend": "xclip",
        "model": "mils-test-tiny-xclip",
        "pretrained": None,
        "architecture": TINY_XCLIP_ARCHITECTURE,
        "init_seed": 0,
        "frames": 4,
        **extra,
    }
