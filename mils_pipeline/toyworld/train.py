"""Train a small open_clip model on toy-world scenes, on the CPU, to serve as a scorer.

The aim is a fair judge of free text, not of one caption grammar: every positive text is a random
paraphrase (other words, other object order, optional parts), and every image also meets hard
negatives: texts of a scene that differs in one attribute, or with attributes swapped between
objects. Loss: the CLIP contrastive loss, with the hard-negative texts as extra columns of the
image-to-text side.

    python -m mils_pipeline.toyworld.train --out toy-scorer --seed 0 --width 128 --max-minutes 30

writes ``toy-scorer.safetensors`` (fp16), ``toy-scorer.json`` (recipe, architecture, held-out
metrics) and ``toy-scorer.md``. Token-embedding rows of tokens never seen in training are zeroed
before saving: they carry no information, and zeros make the file compress to a few MB.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mils_pipeline.toyworld.scenes import (
    NEGATIVE_KINDS,
    Scene,
    caption,
    hard_negative,
    make_scene,
    make_scenes,
    paraphrase,
    render,
)

TRAIN_SPLIT = "train"
HELD_OUT_SPLIT = "heldout"


def architecture(width: int = 128, layers: int = 4, image_size: int = 64, patch_size: int = 8) -> dict[str, Any]:
    """An open_clip model config: ViT on 64 px images, a text transformer, the classic CLIP
    tokenizer (which works offline)."""
    heads = max(1, width // 32)
    return {
        "embed_dim": width,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": 32,
            "patch_size": patch_size,
        },
        "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers},
    }


@dataclass
class Recipe:
    name: str = "toy-scorer"
    seed: int = 0
    width: int = 128
    layers: int = 4
    steps: int = 2000
    max_minutes: float = 30.0
    batch_size: int = 128
    hard_negatives: int = 2  # per image, per step
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    threads: int = 2
    held_out_scenes: int = 500
    init: str = ""  # a checkpoint to continue from (a new warm-up and cosine cycle)


def _progress(step: int, started: float, recipe: Recipe) -> float:
    """Fraction of the budget used: steps or wall time, whichever runs out first."""
    return max(step / recipe.steps, (time.monotonic() - started) / (60 * recipe.max_minutes))


def _learning_rate(step: int, progress: float, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    return recipe.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _Model:
    """The open_clip model with its preprocess and tokenizer, built from the architecture."""

    def __init__(self, name: str, arch: dict[str, Any]) -> None:
        import open_clip

        from mils_pipeline.score.open_clip_image import register_architecture

        register_architecture(name, arch)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        self.tokenizer = open_clip.get_tokenizer(name)

    def images(self, scenes: Sequence[Scene]):
        import torch

        return torch.stack([self.preprocess(render(s)) for s in scenes])

    def encode_images(self, scenes: Sequence[Scene]):
        return self.model.encode_image(self.images(scenes), normalize=True)

    def encode_texts(self, texts: Sequence[str]):
        return self.model.encode_text(self.tokenizer(list(texts)), normalize=True)


def _batch(rng: random.Random, recipe: Recipe) -> tuple[list[Scene], list[str], list[str]]:
    scenes = [make_scene(TRAIN_SPLIT, rng.randrange(10**8)) for _ in range(recipe.batch_size)]
    positives = [paraphrase(s, rng) for s in scenes]
    # A negative is worded like a paraphrase too, so wording never tells it apart.
    negatives = [paraphrase(hard_negative(s, rng), rng) for _ in range(recipe.hard_negatives) for s in scenes]
    return scenes, positives, negatives


def train(recipe: Recipe, out: Path, log=print) -> dict[str, Any]:
    """Train, evaluate on held-out scenes, save checkpoint + recipe + metrics. Returns the metrics."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    rng = random.Random(recipe.seed)
    arch = architecture(recipe.width, recipe.layers)
    net = _Model(recipe.name, arch)
    model = net.model
    if recipe.init:
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(recipe.init).items()})
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token_embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "token_embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
    )
    seen_tokens: set[int] = set()
    started = time.monotonic()
    step = 0
    model.train()
    while _progress(step, started, recipe) < 1.0:
        scenes, positives, negatives = _batch(rng, recipe)
        tokens = net.tokenizer(positives + negatives)
        seen_tokens.update(int(t) for t in tokens.unique())
        lr = _learning_rate(step, _progress(step, started, recipe), recipe)
        for group in optimizer.param_groups:
            group["lr"] = lr
        image_features = model.encode_image(net.images(scenes), normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        scale = model.logit_scale.exp().clamp(max=100)
        n = len(scenes)
        targets = torch.arange(n)
        logits_image = scale * image_features @ text_features.T  # positives, then hard negatives
        logits_text = scale * text_features[:n] @ image_features.T
        loss = (F.cross_entropy(logits_image, targets) + F.cross_entropy(logits_text, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 25 == 0:
            elapsed = time.monotonic() - started
            log(f"step {step} loss {loss.item():.4f} lr {lr:.2e} scale {scale.item():.1f} {elapsed / step:.2f} s/step")
    seconds = time.monotonic() - started
    model.eval()
    with torch.no_grad():
        unused = torch.ones(model.token_embedding.weight.shape[0], dtype=torch.bool)
        unused[sorted(seen_tokens)] = False
        model.token_embedding.weight[unused] = 0.0
    metrics = evaluate_scorer(net, recipe.held_out_scenes)
    lineage = _lineage(recipe.init)
    report = {
        "recipe": {**asdict(recipe), "init": Path(recipe.init).name if recipe.init else ""},
        "lineage": lineage,
        "architecture": arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_done": step,
        "steps_before": sum(int(stage["steps_done"]) for stage in lineage),
        "train_seconds": round(seconds, 1),
        "tokens_seen": len(seen_tokens),
        "held_out": metrics,
    }
    _save(model, report, out)
    return report


def _lineage(init: str) -> list[dict[str, Any]]:
    """The recipes of the runs behind a checkpoint this run continues from, oldest first, each
    with the steps it did (so a continued checkpoint can be reproduced stage by stage)."""
    if not init:
        return []
    report = json.loads(Path(init).with_suffix(".json").read_text())
    return [*report.get("lineage", []), {**report["recipe"], "steps_done": report["steps_done"]}]


def evaluate_scorer(net: _Model, count: int) -> dict[str, Any]:
    """Held-out retrieval (image -> caption among ``count`` scenes, with canonical captions and
    with paraphrases) and per-attribute sensitivity: how often the true caption outscores the
    same caption with one thing changed."""
    import torch

    scenes = make_scenes(HELD_OUT_SPLIT, count)
    rng = random.Random("evaluate")
    with torch.no_grad():
        images = torch.cat([net.encode_images(scenes[i : i + 128]) for i in range(0, count, 128)])
        canonical = net.encode_texts([caption(s) for s in scenes])
        paraphrased = net.encode_texts([paraphrase(s, rng) for s in scenes])
        top1 = float((images @ canonical.T).argmax(1).eq(torch.arange(count)).float().mean())
        top1_para = float((images @ paraphrased.T).argmax(1).eq(torch.arange(count)).float().mean())
        sensitivity: dict[str, float] = {}
        for kind in NEGATIVE_KINDS:
            pairs = []
            for i, scene in enumerate(scenes):
                try:
                    pairs.append((i, caption(hard_negative(scene, rng, kind))))
                except ValueError:
                    continue  # e.g. no colour swap when both objects share a colour
            negative = net.encode_texts([text for _, text in pairs])
            index = torch.tensor([i for i, _ in pairs])
            true_scores = (images[index] * canonical[index]).sum(1)
            false_scores = (images[index] * negative).sum(1)
            sensitivity[kind] = round(float((true_scores > false_scores).float().mean()), 4)
    return {
        "scenes": count,
        "split": HELD_OUT_SPLIT,
        "top1_image_to_caption": round(top1, 4),
        "top1_image_to_paraphrase": round(top1_para, 4),
        "sensitivity": sensitivity,
    }


def _save(model, report: dict[str, Any], out: Path) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out.with_suffix(".safetensors")))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(report_markdown(report))


def report_markdown(report: dict[str, Any]) -> str:
    held = report["held_out"]
    r = report["recipe"]
    vision = report["architecture"]["vision_cfg"]
    lines = [
        f"# {r['name']}: toy-world scorer",
        "",
        f"open_clip, {report['parameters'] / 1e6:.1f}M parameters (ViT {vision['image_size']} px, "
        f"patch {vision['patch_size']}, width {r['width']}, {r['layers']} layers; "
        f"text width {r['width']}, {r['layers']} layers; classic CLIP tokenizer), fp16 weights.",
        "",
        f"Trained {report['steps_done']} steps in {report['train_seconds'] / 60:.1f} min on the CPU"
        + (f" (continuing a {report['steps_before']}-step checkpoint)" if report.get("steps_before") else "")
        + f": seed {r['seed']}, "
        f"batch {r['batch_size']}, {r['hard_negatives']} hard negatives per image, AdamW lr {r['learning_rate']} "
        f"(cosine), weight decay {r['weight_decay']}.",
        "",
        "Reproduce: `python -m mils_pipeline.toyworld.train "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r.items() if v != "")
        + " --out <dir>` "
        "(the wall-time cap makes the step count depend on the machine; it is recorded above).",
        *_lineage_lines(report.get("lineage", [])),
        "",
        f"## Held-out ({held['scenes']} `{held['split']}` scenes)",
        "",
        f"- image -> caption top-1 among {held['scenes']}: {held['top1_image_to_caption']:.1%}",
        f"- image -> paraphrase top-1 among {held['scenes']}: {held['top1_image_to_paraphrase']:.1%}",
        "",
        "Sensitivity: share of scenes whose true caption outscores the same caption with one change.",
        "",
        "| change | true caption wins |",
        "|---|---|",
        *(f"| {kind} | {value:.1%} |" for kind, value in held["sensitivity"].items()),
        "",
    ]
    return "\n".join(lines)


def _lineage_lines(lineage: list[dict[str, Any]]) -> list[str]:
    if not lineage:
        return []
    lines = ["", "Continued from (oldest first; each stage's `--init` is the checkpoint the stage before wrote):", ""]
    for number, stage in enumerate(lineage, start=1):
        lines.append(
            f"{number}. {stage['steps_done']} steps: seed {stage['seed']}, batch {stage['batch_size']}, "
            f"{stage['hard_negatives']} hard negatives, lr {stage['learning_rate']}, {stage['max_minutes']} min cap"
            + (f", from `{stage['init']}`" if stage.get("init") else ", from scratch")
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for <name>.safetensors/.json/.md")
    defaults = Recipe()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in asdict(defaults)})
    report = train(recipe, Path(args.out) / recipe.name, log=lambda m: print(m, flush=True))
    print(json.dumps(report["held_out"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
