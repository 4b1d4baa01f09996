"""Train a small open_clip model on toy-world scenes, on the CPU, to serve as a scorer.

The aim is a fair judge of free text, not of one caption grammar: every positive text is a random
paraphrase (other words, other object order, optional parts), and every image also meets hard
negatives: texts of a scene that differs in one attribute, or with attributes swapped between
objects (the mix weighted by ``--negative-weights``), or the image's own description with one
attribute word replaced by an unknown word. Loss: the CLIP contrastive loss, with the
hard-negative texts as extra columns of the image-to-text side.

Words outside the toy grammar share one learned "unknown" embedding: training maps every token
the grammar never writes to the token of ``UNKNOWN_WORD`` (and inserts unknown words into some
positives, so an extra word is harmless but a missing attribute is not); the saved checkpoint
gives every such token that row, so an unseen word ("rectangle", "zorblat") never reads as a
blank. Training keeps only the grammar's rows in its embedding table; the full table is rebuilt
before evaluation and saving.

    python -m mils_pipeline.toyworld.train --out toy-scorer --seed 0 --width 128 --max-minutes 30

writes ``toy-scorer.safetensors`` (fp16), ``toy-scorer.json`` (recipe, architecture, held-out
metrics) and ``toy-scorer.md``. The unseen tokens' rows are all the same, so the file compresses
to a few MB.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mils_pipeline.toyworld.scenes import (
    COLOURS,
    NEGATIVE_KINDS,
    POSITIONS,
    SHAPES,
    Scene,
    blank_attribute,
    caption,
    grammar_words,
    hard_negative,
    make_scene,
    make_scenes,
    negative_kinds,
    paraphrase,
    render,
)

TRAIN_SPLIT = "train"
HELD_OUT_SPLIT = "heldout"
VOCAB_SIZE = 49408  # the classic CLIP tokenizer's
UNKNOWN_WORD = "unknown"  # one token; its row is the embedding of every word outside the grammar
# Words no training text contains, for the held-out "unknown_word" check.
UNSEEN_WORDS = ("zorblat", "rectangle", "star", "above", "shiny", "oval")

# Text towers by name. "causal" is the classic CLIP text transformer (causal mask, pooled at the
# end-of-text token). "bidirectional" sees the text another way: no causal mask, pooled at the
# start token, fewer layers, a shorter context, and a tokenizer that drops punctuation and
# case before BPE (open_clip's "canonicalize" cleaning).
TEXT_TOWERS: dict[str, dict[str, Any]] = {
    "causal": {"context_length": 48},
    # The audit's: the causal tower, shallower, over text cleaned the other way (no punctuation or
    # case before BPE), so it reads word order and binds attributes to objects as the scorer does.
    "canonical": {
        "context_length": 40,
        "layers": 3,
        "tokenizer_kwargs": {"clean": "canonicalize"},
    },
    "bidirectional": {
        "context_length": 40,
        "layers": 3,
        "no_causal_mask": True,
        "pool_type": "first",
        "tokenizer_kwargs": {"clean": "canonicalize"},
    },
}


def architecture(
    width: int = 128, layers: int = 4, text_tower: str = "causal", image_size: int = 64, patch_size: int = 8
) -> dict[str, Any]:
    """An open_clip model config: ViT on 64 px images, a text transformer from ``TEXT_TOWERS``,
    the classic CLIP tokenizer (which works offline)."""
    if text_tower not in TEXT_TOWERS:
        raise ValueError(f"unknown text tower {text_tower!r}; choose one of {sorted(TEXT_TOWERS)}")
    heads = max(1, width // 32)
    text = {"vocab_size": VOCAB_SIZE, "width": width, "heads": heads, "layers": layers, **TEXT_TOWERS[text_tower]}
    return {
        "embed_dim": width,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": 32,
            "patch_size": patch_size,
        },
        "text_cfg": text,
    }


@dataclass
class Recipe:
    name: str = "toy-scorer"
    seed: int = 0
    width: int = 128
    layers: int = 4
    # The ViT's input size and patch: 64 px renders at patch 8 are an 8 x 8 grid of patches; patch
    # 4 is a 16 x 16 grid (finer edges: a small shape is ~10 px across), at about four times the cost.
    image_size: int = 64
    patch_size: int = 8
    steps: int = 2000
    max_minutes: float = 30.0
    text_tower: str = "causal"
    batch_size: int = 128
    hard_negatives: int = 1  # per image, per step
    # Relative weight of each hard-negative kind (kinds not named weigh 1).
    negative_weights: str = "position=3,swap_position=3,shape=2,swap_shape=2"
    # Share of negatives with an attribute word made unknown, and of positives with an unknown word added.
    unknown_rate: float = 0.2
    # From scratch, the ViT's position table starts as this times a 2-D sine-cosine grid (plus
    # open_clip's noise), so patches near each other start alike; 0 keeps open_clip's noise alone.
    position_init: float = 0.3
    # Weight of the layout loss: a linear head (dropped at save) reads, from the image embedding,
    # the colour and shape at each of the five positions.
    layout_weight: float = 1.0
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


class _Vocabulary:
    """The tokens the grammar writes, plus the unknown token: the rows training learns.

    ``compact(tokens)`` maps tokenizer ids to rows of the training table (every token outside the
    grammar to the unknown row); the order of the ids is kept, so the end-of-text token is still
    the largest (argmax pooling finds it)."""

    def __init__(self, tokenizer) -> None:
        import torch

        words = sorted(grammar_words() | {UNKNOWN_WORD})
        self.ids = tokenizer(words).unique()  # with padding and the start and end tokens
        (unknown,) = tokenizer.encode(UNKNOWN_WORD)
        self.unknown_row = int((self.ids == unknown).nonzero())
        self._rows = torch.full((VOCAB_SIZE,), self.unknown_row, dtype=torch.long)
        self._rows[self.ids] = torch.arange(len(self.ids))

    def compact(self, tokens):
        return self._rows[tokens]

    def compact_embedding(self, model) -> None:
        """Swap the model's token table for one with only the rows training learns."""
        import torch

        model.token_embedding = torch.nn.Embedding.from_pretrained(
            model.token_embedding.weight.detach()[self.ids].clone(), freeze=False
        )

    def full_embedding(self, model) -> None:
        """Swap the training table back for a full one: every token outside the grammar gets the
        learned unknown row."""
        import torch

        compact = model.token_embedding.weight.detach()
        full = compact[self.unknown_row].repeat(VOCAB_SIZE, 1)
        full[self.ids] = compact
        model.token_embedding = torch.nn.Embedding.from_pretrained(full, freeze=False)


def _with_unknown_word(text: str, rng: random.Random) -> str:
    """``text`` with an unknown word (1-3 tokens, like an unseen word's BPE pieces) inserted."""
    words = text.split(" ")
    words.insert(rng.randrange(len(words) + 1), " ".join([UNKNOWN_WORD] * rng.randint(1, 3)))
    return " ".join(words)


def _negative(scene: Scene, rng: random.Random, recipe: Recipe, weights: dict[str, float]) -> str:
    """A text the image must outscore, worded like a paraphrase (so wording never tells it apart)."""
    if rng.random() < recipe.unknown_rate:
        return blank_attribute(paraphrase(scene, rng), rng, " ".join([UNKNOWN_WORD] * rng.randint(1, 3)))
    kinds = negative_kinds(scene)
    kind = rng.choices(kinds, weights=[weights.get(k, 1.0) for k in kinds])[0]
    try:
        return paraphrase(hard_negative(scene, rng, kind), rng)
    except ValueError:  # e.g. no colour swap when both objects share a colour
        return paraphrase(hard_negative(scene, rng), rng)


def negative_weights(spec: str) -> dict[str, float]:
    """``"position=3,shape=2"`` as a dict of hard-negative kind -> weight."""
    weights = {}
    for item in filter(None, spec.split(",")):
        kind, _, value = item.partition("=")
        if kind not in NEGATIVE_KINDS:
            raise ValueError(f"--negative-weights: unknown kind {kind!r}; kinds are {', '.join(NEGATIVE_KINDS)}")
        weights[kind] = float(value)
    return weights


def _batch(rng: random.Random, recipe: Recipe, weights: dict[str, float], net: _Model, vocabulary: _Vocabulary):
    """One step's images, compact tokens (positives, then hard negatives) and layout targets."""
    scenes = [make_scene(TRAIN_SPLIT, rng.randrange(10**8)) for _ in range(recipe.batch_size)]
    positives = [paraphrase(s, rng) for s in scenes]
    positives = [_with_unknown_word(t, rng) if rng.random() < recipe.unknown_rate else t for t in positives]
    negatives = [_negative(s, rng, recipe, weights) for _ in range(recipe.hard_negatives) for s in scenes]
    return net.images(scenes), vocabulary.compact(net.tokenizer(positives + negatives)), _layout(scenes)


# What the layout head reads at each position: the object's colour and its shape (last class: none).
LAYOUT = (COLOURS, SHAPES)


def _layout(scenes: Sequence[Scene]):
    """Per scene, per position and per layout attribute, the class index (``len(values)``: empty)."""
    import torch

    rows = []
    for scene in scenes:
        at = {o.position: o for o in scene.objects}
        rows.append(
            [
                values.index(getattr(at[p], attr)) if p in at else len(values)
                for p in POSITIONS
                for attr, values in zip(("colour", "shape"), LAYOUT, strict=True)
            ]
        )
    return torch.tensor(rows)


class _LayoutHead:
    """A linear read-out of the layout from the image embedding. Position is the attribute
    contrastive training alone never found (both towers stay blind to it, each because the other
    is); a loss that asks the image embedding where each colour and shape is breaks that tie."""

    def __init__(self, embed_dim: int) -> None:
        import torch

        self.sizes = [len(values) + 1 for _ in POSITIONS for values in LAYOUT]
        self.linear = torch.nn.Linear(embed_dim, sum(self.sizes))

    def loss(self, image_features, targets):
        import torch.nn.functional as F

        logits = self.linear(image_features).split(self.sizes, dim=1)
        return sum(F.cross_entropy(part, targets[:, i]) for i, part in enumerate(logits)) / len(logits)


def _start_positions_on_a_grid(model, scale: float) -> None:
    """Add ``scale`` times a 2-D sine-cosine grid to the ViT's (random) position table: models
    started from noise alone learned colour, shape and count but stayed at chance on position."""
    import torch
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    table = model.visual.positional_embedding
    grid = get_2d_sincos_pos_embed(table.shape[1], model.visual.grid_size[0], cls_token=True)
    with torch.no_grad():
        table += scale * torch.from_numpy(grid).float()


def _adapt_vision(state: dict[str, Any], model) -> dict[str, Any]:
    """A checkpoint's state made to fit ``model`` when the ViT's patch or grid differs (continuing
    a patch-8 judge at patch 4): the patch kernel is resized by summing (or repeating) blocks, so a
    flat patch embeds as before, and the position table is interpolated to the new grid. Text
    tower, transformer blocks and projections carry over unchanged."""
    import torch.nn.functional as F
    from open_clip.model import resize_pos_embed

    kernel = state.get("visual.conv1.weight")
    target = model.visual.conv1.weight
    if kernel is not None and kernel.shape != target.shape:
        old, new = kernel.shape[-1], target.shape[-1]
        if old % new == 0:  # e.g. 8 -> 4: each new tap is the sum of an (old/new)^2 block
            state["visual.conv1.weight"] = F.avg_pool2d(kernel, old // new) * (old // new) ** 2
        elif new % old == 0:  # e.g. 4 -> 8: each tap spread over a block
            state["visual.conv1.weight"] = F.interpolate(kernel, scale_factor=new // old) / (new // old) ** 2
        else:
            raise ValueError(f"--init has patch {old}; cannot continue it at patch {new} (use a multiple or divisor)")
    resize_pos_embed(state, model)
    return state


def train(recipe: Recipe, out: Path, log=print) -> dict[str, Any]:
    """Train, evaluate on held-out scenes, save checkpoint + recipe + metrics. Returns the metrics."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    rng = random.Random(recipe.seed)
    arch = architecture(recipe.width, recipe.layers, recipe.text_tower, recipe.image_size, recipe.patch_size)
    net = _Model(recipe.name, arch)
    model = net.model
    if recipe.init:
        from safetensors.torch import load_file

        model.load_state_dict(_adapt_vision({k: v.float() for k, v in load_file(recipe.init).items()}, model))
    else:
        _start_positions_on_a_grid(model, recipe.position_init)
    vocabulary = _Vocabulary(net.tokenizer)
    vocabulary.compact_embedding(model)
    next_batch = partial(_batch, rng, recipe, negative_weights(recipe.negative_weights), net, vocabulary)
    # Embedding tables are not decayed: a position row that decays away takes where-things-are with it.
    embedding = ("token_embedding", "positional_embedding")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not any(e in n for e in embedding)]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or any(e in n for e in embedding)]
    layout = _LayoutHead(arch["embed_dim"])
    optimizer = torch.optim.AdamW(
        [
            {"params": [*decay, layout.linear.weight], "weight_decay": recipe.weight_decay},
            {"params": [*no_decay, layout.linear.bias], "weight_decay": 0.0},
        ],
        lr=recipe.learning_rate,
    )
    started = time.monotonic()
    step = 0
    model.train()
    # The next batch is rendered and tokenized in a thread while the model trains on this one.
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        upcoming = prefetch.submit(next_batch)
        while _progress(step, started, recipe) < 1.0:
            images, tokens, layout_targets = upcoming.result()
            upcoming = prefetch.submit(next_batch)
            lr = _learning_rate(step, _progress(step, started, recipe), recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            image_embedding = model.encode_image(images)
            image_features = F.normalize(image_embedding, dim=-1)
            text_features = model.encode_text(tokens, normalize=True)
            scale = model.logit_scale.exp().clamp(max=100)
            n = len(images)
            targets = torch.arange(n)
            logits_image = scale * image_features @ text_features.T  # positives, then hard negatives
            logits_text = scale * text_features[:n] @ image_features.T
            loss = (F.cross_entropy(logits_image, targets) + F.cross_entropy(logits_text, targets)) / 2
            if recipe.layout_weight:
                loss = loss + recipe.layout_weight * layout.loss(image_embedding, layout_targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 25 == 0:
                per_step = (time.monotonic() - started) / step
                log(f"step {step} loss {loss.item():.4f} lr {lr:.2e} scale {scale.item():.1f} {per_step:.2f} s/step")
    seconds = time.monotonic() - started
    model.eval()
    vocabulary.full_embedding(model)
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
        "tokens_learned": len(vocabulary.ids),
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
    same caption with one thing changed ("unknown_word": one attribute word replaced by a word
    no training text contains)."""
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
        blanked = net.encode_texts([blank_attribute(caption(s), rng, rng.choice(UNSEEN_WORDS)) for s in scenes])
        wins = (images * canonical).sum(1) > (images * blanked).sum(1)
        sensitivity["unknown_word"] = round(float(wins.float().mean()), 4)
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
    text = report["architecture"]["text_cfg"]
    cleaning = text.get("tokenizer_kwargs", {}).get("clean", "lower")
    lines = [
        f"# {r['name']}: toy-world scorer",
        "",
        f"open_clip, {report['parameters'] / 1e6:.1f}M parameters (ViT {vision['image_size']} px, "
        f"patch {vision['patch_size']}, width {vision['width']}, {vision['layers']} layers; "
        f"text tower `{r['text_tower']}`: width {text['width']}, {text['layers']} layers, context "
        f"{text['context_length']}, {'no causal mask' if text.get('no_causal_mask') else 'causal mask'}, "
        f"pooled at the {'start' if text.get('pool_type') == 'first' else 'end-of-text'} token; "
        f"classic CLIP tokenizer, `{cleaning}` cleaning), fp16 weights. Tokens outside the toy grammar "
        f"share the learned row of `{UNKNOWN_WORD}`.",
        "",
        f"Trained {report['steps_done']} steps in {report['train_seconds'] / 60:.1f} min on the CPU"
        + (f" (continuing a {report['steps_before']}-step checkpoint)" if report.get("steps_before") else "")
        + f": seed {r['seed']}, "
        f"batch {r['batch_size']}, {r['hard_negatives']} hard negatives per image (kind weights "
        f"`{r['negative_weights'] or 'uniform'}`, {r['unknown_rate']:.0%} with an attribute word made unknown), "
        f"AdamW lr {r['learning_rate']} (cosine), weight decay {r['weight_decay']}.",
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
    """One line per earlier stage; a setting a stage's recipe lacks did not exist yet (0: off)."""
    if not lineage:
        return []
    lines = ["", "Continued from (oldest first; each stage's `--init` is the checkpoint the stage before wrote):", ""]
    for number, stage in enumerate(lineage, start=1):
        lines.append(
            f"{number}. {stage['steps_done']} steps: patch {stage.get('patch_size', 8)}, seed {stage['seed']}, "
            f"batch {stage['batch_size']}, "
            f"{stage['hard_negatives']} hard negatives (kind weights `{stage.get('negative_weights') or 'uniform'}`, "
            f"unknown rate {stage.get('unknown_rate', 0.0)}), layout weight {stage.get('layout_weight', 0.0)}, "
            f"lr {stage['learning_rate']}, {stage['max_minutes']} min cap"
            + (
                f", from `{stage['init']}`"
                if stage.get("init")
                else f", from scratch (position start {stage.get('position_init', 0.0)})"
            )
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
