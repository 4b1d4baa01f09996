"""Every run configuration the project shows, checked against the real architecture it names.

The configurations come out of the files themselves, so a new one cannot be skipped: every YAML file
under deploy/configs/, and every fenced ``yaml`` block in README.md, docs/*.md and deploy/**/*.md.
Every configuration file the text names (``-c NAME``, ``--config NAME``, ``configs/NAME.yaml``, in
those documents and in any file under deploy/) must be one of them.

Each configuration is loaded with the project's loader, and each of its scorers is built offline:
- A scorer with ``architecture`` (a custom or tiny model, random weights) is built for real by
  ``build_scorer``, as a run builds it.
- A named production model (SigLIP ViT-SO400M-14: about 880M parameters; CLIP ViT-L/14: about 430M;
  CLAP HTSAT-unfused) is built on PyTorch's ``meta`` device with open_clip's / transformers' own
  constructors and the arguments the scorer passes (the image preprocessing it forces, the
  precision): shapes, dtypes, modules and transforms, no memory and no weights. Its checkpoint path
  is replaced by a file the test writes: an empty weights file for open_clip (only its path is read
  before the weights), and for CLAP / X-CLIP a directory holding the model family's default
  ``config.json`` (``ClapConfig()``, ``XCLIPConfig()``: the shapes of laion/clap-htsat-unfused and
  microsoft/xclip-base-patch32). Loading real weights is what these tests cannot do.

Checks: the preprocessing the scorer would apply equals what the weights' tag (``open_clip.get_pretrained_cfg``,
offline) or the open_clip defaults (random weights) prescribe, transform for transform, and QuickGELU
is used exactly when the tag says the weights were trained with it; the text context the run config
derives (``configured_text_context``) equals the tokenizer's, and the caption length fits it; on this
CPU the scorer runs on cpu in fp32, and the half precision a GPU worker picks (fp16) reaches the patch
embedding the pixels meet first; the config hash is stable (reloaded, dumped and reloaded, with
execution-only changes) and moves with a setting that changes the output.

Tokenizers: SigLIP's comes from the Hugging Face hub (``timm/ViT-B-16-SigLIP``), which cannot be
reached here. When it is in the local HF cache it is built and its context compared; otherwise the
context is checked against the built model's (its positional embedding, from open_clip's model
config), and the test says which in its findings (run with ``-s`` to see them). The CLAP / X-CLIP
tokenizers of real checkpoints live in the checkpoint directory; the tiny ones are built in code.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from mils_pipeline.backends import resolve_device_and_precision
from mils_pipeline.config import RunConfig, ScorerConfig, load_config
from mils_pipeline.errors import ConfigError
from mils_pipeline.score import build_scorer
from mils_pipeline.score.context import caption_words_within, configured_text_context

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]
FENCED_YAML = re.compile(r"^```ya?ml\n(.*?)^```", re.MULTILINE | re.DOTALL)
NAMED_CONFIG = re.compile(r"(?:(?:-c|--config)[ =]+|configs/)([\w./-]+\.ya?ml)\b")


def documented_configurations() -> dict[str, str]:
    """Where each configuration is shown (file, or file:line of its block) -> its YAML text."""
    found = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "deploy" / "configs").glob("*.y*ml"))}
    for document in DOCUMENTS:
        text = document.read_text()
        for block in FENCED_YAML.finditer(text):
            line = text.count("\n", 0, block.start()) + 1
            found[f"{document.relative_to(ROOT)}:{line}"] = block.group(1)
    return found


def named_configuration_files() -> dict[str, str]:
    """Configuration file names the documents and deploy/ use -> where the first use is."""
    sources = [*DOCUMENTS, *(p for p in sorted((ROOT / "deploy").rglob("*")) if p.is_file() and p.suffix != ".md")]
    names: dict[str, str] = {}
    for source in sources:
        for match in NAMED_CONFIG.finditer(source.read_text(errors="replace")):
            names.setdefault(match.group(1), str(source.relative_to(ROOT)))
    return names


CONFIGURATIONS = documented_configurations()


def test_the_documents_show_configurations_and_every_named_file_is_one_of_them():
    assert any(name.startswith("deploy/configs/") for name in CONFIGURATIONS)
    assert any(name.startswith("README.md:") for name in CONFIGURATIONS)
    for paper in ("paper-image.yaml", "paper-video.yaml", "paper-audio.yaml"):  # docs/EVALUATION.md runs them
        assert f"deploy/configs/{paper}" in CONFIGURATIONS
    blocks = [text for name, text in CONFIGURATIONS.items() if ":" in name]
    for name, where in named_configuration_files().items():
        shipped = (ROOT / name).is_file() or (ROOT / "deploy" / "configs" / Path(name).name).is_file()
        shown = any(Path(name).name in block.splitlines()[0] for block in blocks if block.startswith("#"))
        assert shipped or shown, f"{where} names {name}: neither a file under deploy/configs nor a block headed by it"


@functools.cache
def _open_clip_on_meta(model: str, forced: str, precision: str) -> tuple[Any, Any]:
    """open_clip's model and eval transform as ``create_model_and_transforms`` builds them, on the meta device."""
    import open_clip

    with torch.device("meta"):
        net, _, transform = open_clip.create_model_and_transforms(
            model, pretrained=None, precision=precision, device="meta", **json.loads(forced)
        )
    return net, transform


def _steps(transform: Any) -> list[tuple[str, dict[str, Any]]]:
    """A transform pipeline as (step, its settings), sequences as tuples (open_clip keeps lists or tuples)."""

    def plain(value: Any) -> Any:
        return tuple(float(v) for v in value) if isinstance(value, list | tuple) else value

    return [
        (type(step).__name__, {k: plain(v) for k, v in vars(step).items() if not k.startswith("_") and k != "training"})
        for step in transform.transforms
    ]


def _expected_transform(preprocess: dict[str, Any], size: Any) -> list[tuple[str, dict[str, Any]]]:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return _steps(image_transform_v2(PreprocessCfg(size=size, **preprocess), is_train=False))


def _uses_quick_gelu(net: Any) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(module, QuickGELU) for module in net.modules())


def _patch_embedding(net: Any) -> Any:
    visual = net.visual
    return visual.trunk.patch_embed.proj if hasattr(visual, "trunk") else visual.conv1


def _hub_tokenizer_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)


def _with_local_checkpoint(scorer: ScorerConfig, directory: Path) -> ScorerConfig:
    """``scorer`` with its checkpoint path replaced by one this test writes (see the module docstring)."""
    if not scorer.checkpoint:
        return scorer
    directory.mkdir(parents=True, exist_ok=True)
    if scorer.backend == "open_clip":
        weights = directory / Path(scorer.checkpoint).name
        if not weights.suffix:  # a hub-layout directory
            weights.mkdir()
            weights = weights / "open_clip_model.safetensors"
        weights.write_bytes(b"")
        return scorer.model_copy(update={"checkpoint": str(weights if weights.parent == directory else weights.parent)})
    import transformers

    family = {"clap": transformers.ClapConfig, "xclip": transformers.XCLIPConfig}[scorer.backend]
    (directory / "config.json").write_text(json.dumps(family().to_dict()))
    return scorer.model_copy(update={"checkpoint": str(directory)})


def _check_open_clip_named(scorer: ScorerConfig, precision: str, findings: list[str]) -> int:
    import open_clip

    from mils_pipeline.score.open_clip_image import preprocess_arguments, resolve_preprocess

    preprocess, source = resolve_preprocess(scorer)
    forced = json.dumps(preprocess_arguments(preprocess))
    net, transform = _open_clip_on_meta(scorer.model, forced, precision)
    parameters = sum(p.numel() for p in net.parameters())
    tags = open_clip.list_pretrained_tags_by_model(scorer.model)
    tag = scorer.pretrained if scorer.pretrained in tags else None
    size = net.visual.preprocess_cfg["size"]
    if scorer.checkpoint:
        # weights from a file: what the scorer forces must be what the weights' tag prescribes
        if tag is not None:
            prescribed = open_clip.get_pretrained_cfg(scorer.model, tag)
            expected = {k: prescribed[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in prescribed}
            assert _steps(transform) == _expected_transform(expected, size), scorer.model
            assert _uses_quick_gelu(net) == bool(prescribed.get("quick_gelu", False)), (
                f"{scorer.model} and tag {tag} disagree on QuickGELU: the weights would run with the wrong activation"
            )
        assert preprocess is not None, f"{scorer.model} from a checkpoint falls back to open_clip's OpenAI defaults"
        shown = f"preprocessing from {source}: {preprocess}"
    else:  # weights by hub tag: open_clip applies the tag's own preprocessing when it fetches them
        assert tag is not None and source == f"pretrained tag {tag}", (scorer.model, scorer.pretrained, source)
        shown = f"weights and preprocessing by hub tag {tag} (fetched at run time; fails offline with the fix)"
    hub_tokenizer = (open_clip.get_model_config(scorer.model) or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    if hub_tokenizer and not _hub_tokenizer_cached(hub_tokenizer):
        context, how = int(net.context_length), f"model config (tokenizer {hub_tokenizer} not cached offline)"
    else:
        tokenizer = open_clip.get_tokenizer(scorer.model)
        context, how = int(tokenizer.context_length), "tokenizer"
        assert tokenizer(["a dog"]).shape == (1, context) and int(net.context_length) == context
    # fp16, the precision a GPU worker picks: the pixels the scorer casts meet a patch embedding of that dtype
    half, _ = _open_clip_on_meta(scorer.model, forced, "fp16")
    assert _patch_embedding(half).weight.dtype == open_clip.get_input_dtype("fp16") == torch.float16
    assert _patch_embedding(net).weight.dtype == torch.float32
    findings.append(
        f"open_clip {scorer.model} on meta ({parameters / 1e6:.0f}M parameters): context {context} tokens "
        f"({how}); {shown}"
    )
    return context


def _check_transformers_named(scorer: ScorerConfig, findings: list[str]) -> int:
    import transformers

    from mils_pipeline.score.hf_common import TORCH_DTYPES

    config_json = json.loads((Path(scorer.checkpoint or "") / "config.json").read_text())
    model_class, config_class = {
        "clap": (transformers.ClapModel, transformers.ClapConfig),
        "xclip": (transformers.XCLIPModel, transformers.XCLIPConfig),
    }[scorer.backend]
    with torch.device("meta"):
        net = model_class(config_class(**config_json))
    positions = net.config.text_config.max_position_embeddings
    context = positions - (2 if scorer.backend == "clap" else 0)  # RoBERTa's positions start after padding
    half = net.to(dtype=getattr(torch, TORCH_DTYPES["fp16"]))
    assert next(half.parameters()).dtype == torch.float16
    parameters = sum(p.numel() for p in net.parameters())
    findings.append(
        f"{scorer.backend} {scorer.model} on meta ({parameters / 1e6:.0f}M parameters, the family's default "
        f"config): context {context} tokens (model config); preprocessing from the checkpoint directory's own "
        "feature extractor / image processor"
    )
    return context


def _check_built(scorer: ScorerConfig, media: str, findings: list[str]) -> int:
    """A custom or tiny architecture: the real scorer, as a run builds it."""
    built = build_scorer(scorer, media)
    assert built.device == "cpu" and built.random_weights
    assert {p.dtype for p in built._model.parameters()} == {torch.float32}
    assert built.truncated(["a dog", "word " * 200]).tolist() == [False, True]
    if scorer.backend == "open_clip":
        from open_clip.transform import PreprocessCfg

        defaults = PreprocessCfg()
        expected = {
            "mean": defaults.mean,
            "std": defaults.std,
            "interpolation": defaults.interpolation,
            "resize_mode": defaults.resize_mode,
        }
        if scorer.preprocess is not None:
            expected = scorer.preprocess.model_dump()
        size = built._model.visual.preprocess_cfg["size"]
        assert _steps(built._preprocess) == _expected_transform(expected, size)
    findings.append(
        f"{scorer.backend} {scorer.model} built for real (random weights): context {built.text_context} tokens "
        "(tokenizer)"
    )
    return built.text_context


@pytest.mark.parametrize("where", sorted(CONFIGURATIONS))
def test_documented_configuration_conforms(where: str, tmp_path: Path) -> None:
    path = ROOT / where if ":" not in where else tmp_path / "shown.yaml"
    if ":" in where:
        path.write_text(CONFIGURATIONS[where])
    config = load_config(path)

    # the config hash: stable, blind to execution-only settings, moved by output settings
    digest = config.config_sha256()
    assert load_config(path).config_sha256() == digest
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(config.to_yaml())
    assert load_config(dumped).config_sha256() == digest
    assert load_config(path, ["scorer.text_batch_size=7", "scorer.cache_bytes=0"]).config_sha256() == digest
    assert load_config(path, [f"optimize.top_k={config.optimize.top_k + 1}"]).config_sha256() != digest

    words = config.optimize.max_caption_words
    findings = [f"{where}: config {digest[:12]}, {config.modality}, max_caption_words {words}"]
    scorers = [(config.scorer, config.modality), *((extra, extra.media) for extra in config.extra_scorers)]
    contexts = []
    for number, (scorer, media) in enumerate(scorers):
        if scorer.device == "cuda":  # a GPU worker's setting: on this CPU it must fail clearly, not fall back
            with pytest.raises(ConfigError, match=r"scorer\.device"):
                resolve_device_and_precision(scorer.device, scorer.precision)
            scorer = scorer.model_copy(update={"device": "cpu"})
        device, precision = resolve_device_and_precision(scorer.device, scorer.precision)
        assert (device, precision) == ("cpu", "fp32") or scorer.precision != "auto"
        local = _with_local_checkpoint(scorer, tmp_path / f"checkpoint-{number}")
        if local.architecture is not None:
            context = _check_built(local, media, findings)
        elif local.backend == "open_clip":
            context = _check_open_clip_named(local, precision, findings)
        else:
            context = _check_transformers_named(local, findings)
        expected = configured_text_context(local)
        assert expected in (None, context), f"{where}: the config expects {expected} tokens, the model reads {context}"
        contexts.append(context)

    # every caption the run may accept is read whole by every scorer
    assert words <= caption_words_within(min(contexts)), (where, contexts)
    print("\n  ".join(findings))


def test_a_checkpoint_without_a_tag_or_preprocessing_for_a_model_whose_tags_disagree_is_refused(tmp_path):
    """What the conformance check relies on: a documented checkpoint cannot silently take OpenAI defaults."""
    from mils_pipeline.score.open_clip_image import resolve_preprocess

    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"")
    config = RunConfig.model_validate({"scorer": {"model": "ViT-L-14", "pretrained": None, "checkpoint": str(weights)}})
    with pytest.raises(ConfigError, match=r"scorer\.pretrained"):
        resolve_preprocess(config.scorer)
