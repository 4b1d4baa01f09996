"""Procedural scenes with exact captions: 1-3 shapes (shape, colour, size, position) on a plain
background. A scene is a pure function of (split, index), so any number can be regenerated.

Three uses: training data for the toy scorer (with paraphrases and hard negatives), held-out
scenes with reference captions for `mils demo` and the quality benchmark, and the attribute
parser that reads free text back into objects to measure attribute accuracy.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, replace

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("black", "white", "gray")

RGB = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
# Anchor of each position on a unit square (x, y), y downwards.
ANCHORS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
RADIUS = {"small": 0.08, "large": 0.14}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

POSITION_PHRASES = {
    "left": ("on the left", "at the left", "to the left"),
    "right": ("on the right", "at the right", "to the right"),
    "top": ("at the top", "near the top", "on top"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom"),
    "center": ("in the center", "in the middle", "at the center"),
}


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    key: str
    objects: tuple[ToyObject, ...]
    background: str
    jitter: tuple[tuple[float, float], ...]  # per object offset, as a fraction of the image side

    @property
    def count(self) -> int:
        return len(self.objects)


def random_scene(rng: random.Random, key: str) -> Scene:
    n = rng.choice((1, 1, 2, 2, 3))
    positions = rng.sample(POSITIONS, n)
    objects = tuple(
        ToyObject(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), position) for position in positions
    )
    jitter = tuple((rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)) for _ in objects)
    return Scene(key=key, objects=objects, background=rng.choice(BACKGROUNDS), jitter=jitter)


def make_scene(split: str, index: int) -> Scene:
    """Scene ``index`` of a split ("train", "test", ...): the same every time, on every machine."""
    return random_scene(random.Random(f"toyworld:{split}:{index}"), key=f"{split}_{index:06d}")


def make_scenes(split: str, count: int, start: int = 0) -> list[Scene]:
    return [make_scene(split, i) for i in range(start, start + count)]


def render(scene: Scene, size: int = 64, supersample: int = 4):
    """The scene as an RGB PIL image of ``size`` pixels (drawn larger, then downsampled)."""
    from PIL import Image, ImageDraw

    side = size * supersample
    image = Image.new("RGB", (side, side), RGB[scene.background])
    draw = ImageDraw.Draw(image)
    for obj, (dx, dy) in zip(scene.objects, scene.jitter, strict=True):
        ax, ay = ANCHORS[obj.position]
        cx, cy, r = (ax + dx) * side, (ay + dy) * side, RADIUS[obj.size] * side
        colour = RGB[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif obj.shape == "square":
            s = r * 0.88
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
        elif obj.shape == "triangle":
            draw.polygon(((cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)), fill=colour)
        else:  # cross
            w = r * 0.36
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def render_png(scene: Scene, size: int = 64) -> bytes:
    import io

    buffer = io.BytesIO()
    render(scene, size).save(buffer, format="PNG")
    return buffer.getvalue()


# --- captions -------------------------------------------------------------------------------


TEMPLATES = (
    "{objs} on a {bg} background",
    "{objs}, {bg} background",
    "a {bg} background with {objs}",
    "{count} {plural} on {bg}: {objs}",
    "{objs}",
    "an image of {objs} on a {bg} background",
    "{count} {plural}: {objs}, on a {bg} background",
    "on a {bg} background, {objs}",
    "a picture of {objs} on a {bg} background",
    "a simple drawing of {objs}, on a {bg} background",
    "this image shows {objs} on a {bg} background",
    "there is {objs} on a {bg} background",
    "{count} {plural}, {objs}, on a plain {bg} background",
)
# Words that name what a scene shows: blanking one of them loses information.
ATTRIBUTE_WORDS = frozenset(
    [*SHAPES, *COLOURS, *SIZES, *BACKGROUNDS, *COUNT_WORDS.values()]
    + [phrase.split()[-1] for phrases in POSITION_PHRASES.values() for phrase in phrases]
)


def grammar_words() -> frozenset[str]:
    """Every word (and punctuation mark) a caption, paraphrase or hard negative can contain."""
    words = set(ATTRIBUTE_WORDS) | {"a", "an", "and", "shape", "shapes", ",", ":"}
    words |= {w for phrases in POSITION_PHRASES.values() for p in phrases for w in p.split()}
    for template in TEMPLATES:
        words |= set(re.sub(r"\{\w+\}", " ", template).replace(",", " , ").replace(":", " : ").split())
    return frozenset(words)


def blank_attribute(text: str, rng: random.Random, filler: str) -> str:
    """``text`` with one of its attribute words (a shape, colour, size, position, background or
    count word) replaced by ``filler``: the same caption with one thing left unsaid."""
    words = text.split(" ")
    slots = [i for i, w in enumerate(words) if w.strip(",:") in ATTRIBUTE_WORDS]
    if not slots:
        raise ValueError(f"no attribute word to blank in {text!r}")
    i = rng.choice(slots)
    words[i] = filler + words[i][len(words[i].rstrip(",:")) :]
    return " ".join(words)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: ToyObject, rng: random.Random | None, with_size: bool = True) -> str:
    adjectives = [obj.size, obj.colour] if with_size else [obj.colour]
    if with_size and rng is not None and rng.random() < 0.2:  # word-order variant
        adjectives.reverse()
    position = POSITION_PHRASES[obj.position][0] if rng is None else rng.choice(POSITION_PHRASES[obj.position])
    noun = " ".join([*adjectives, obj.shape])
    return f"{_article(noun)} {noun} {position}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """The canonical reference caption, e.g. 'a large red circle on the left and a small blue
    square at the top on a black background'."""
    objects = _join([_object_phrase(o, None) for o in scene.objects])
    return f"{objects} on a {scene.background} background"


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """A random correct description: other words, other object order, optional count and
    background, size sometimes left out."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    with_size = rng.random() > 0.15
    phrase = _join([_object_phrase(o, rng, with_size) for o in objects])
    count = COUNT_WORDS[scene.count]
    plural = "shape" if scene.count == 1 else "shapes"
    bg = scene.background
    return rng.choice(TEMPLATES).format(objs=phrase, bg=bg, count=count, plural=plural)


def references(scene: Scene, n: int = 5) -> list[str]:
    """Reference captions for evaluation: the canonical caption, then ``n - 1`` paraphrases
    (deterministic per scene)."""
    rng = random.Random(f"references:{scene.key}")
    out = [caption(scene)]
    while len(out) < n:
        text = paraphrase(scene, rng)
        if text not in out:
            out.append(text)
    return out


# --- hard negatives ---------------------------------------------------------------------------


def _other(values: tuple[str, ...], current: str, rng: random.Random) -> str:
    return rng.choice([v for v in values if v != current])


NEGATIVE_KINDS = (
    "shape",
    "colour",
    "size",
    "position",
    "background",
    "count",
    "swap_colour",
    "swap_shape",
    "swap_position",
    "hedge",
)


def negative_kinds(scene: Scene) -> list[str]:
    """The hard-negative kinds a scene allows (swaps need two objects; a hedge adds one, so it
    needs a count word for one more)."""
    kinds = [k for k in NEGATIVE_KINDS if scene.count > 1 or not k.startswith("swap_")]
    return kinds if scene.count < max(COUNT_WORDS) else [k for k in kinds if k != "hedge"]


def hard_negative(scene: Scene, rng: random.Random, kind: str | None = None) -> Scene:
    """A scene that differs from ``scene`` in one way (``kind``, else a random one): one attribute
    of one object changed, attributes swapped between two objects, the background changed, an
    object added or removed, or ("hedge") one object named twice in the same place, once with
    another shape or colour ("a blue circle at the bottom and a blue square at the bottom"): a
    caption that hedges between answers must lose to the one that commits to the right one. A
    hedge is never rendered (two objects share a position); only its caption is used."""
    objects = list(scene.objects)
    kinds = [kind] if kind else negative_kinds(scene)
    if not set(kinds) <= set(negative_kinds(scene)):
        raise ValueError(f"no {kind} negative exists for a scene of {scene.count} object(s)")
    for _ in range(50):
        kind = rng.choice(kinds)
        i = rng.randrange(len(objects))
        changed = list(objects)
        background = scene.background
        if kind == "shape":
            changed[i] = replace(objects[i], shape=_other(SHAPES, objects[i].shape, rng))
        elif kind == "colour":
            changed[i] = replace(objects[i], colour=_other(COLOURS, objects[i].colour, rng))
        elif kind == "size":
            changed[i] = replace(objects[i], size=_other(SIZES, objects[i].size, rng))
        elif kind == "position":
            free = [p for p in POSITIONS if p not in {o.position for o in objects}]
            changed[i] = replace(objects[i], position=rng.choice(free))
        elif kind == "background":
            background = _other(BACKGROUNDS, background, rng)
        elif kind == "count":
            if len(objects) > 1 and rng.random() < 0.5:
                del changed[i]
            elif len(objects) < 3:
                free = [p for p in POSITIONS if p not in {o.position for o in objects}]
                changed.append(ToyObject(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), rng.choice(free)))
            else:
                del changed[i]
        elif kind == "hedge":
            attr, values = ("shape", SHAPES) if rng.random() < 0.5 else ("colour", COLOURS)
            changed.insert(i + 1, replace(objects[i], **{attr: _other(values, getattr(objects[i], attr), rng)}))
        else:
            attr = kind.removeprefix("swap_")
            j = rng.choice([k for k in range(len(objects)) if k != i])
            if getattr(objects[i], attr) == getattr(objects[j], attr):
                continue
            a, b = getattr(objects[i], attr), getattr(objects[j], attr)
            changed[i], changed[j] = replace(objects[i], **{attr: b}), replace(objects[j], **{attr: a})
        candidate = Scene(scene.key, tuple(changed), background, scene.jitter[: len(changed)])
        if describe(candidate) != describe(scene):
            return candidate
    raise ValueError(f"no {kinds} negative exists for scene {scene.key}")


def describe(scene: Scene) -> tuple:
    """What a scene shows, independent of object order: two scenes with equal descriptions are
    the same for every caption."""
    return (scene.background, tuple(sorted((o.shape, o.colour, o.size, o.position) for o in scene.objects)))


# --- reading captions back into attributes ------------------------------------------------------

_SHAPE_WORDS = (
    {s: s for s in SHAPES}
    | {f"{s}s": s for s in SHAPES}
    | {
        "crosses": "cross",
        "plus": "cross",
        "ball": "circle",
        "balls": "circle",
        "dot": "circle",
        "dots": "circle",
        "box": "square",
        "boxes": "square",
        "rectangle": "square",
        "rectangles": "square",
    }
)
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_COLOUR_WORDS = {c: c for c in COLOURS} | {"violet": "purple", "grey": "gray"}
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "a": 1, "an": 1}
_POSITION_WORDS = {
    "left": "left",
    "right": "right",
    "top": "top",
    "upper": "top",
    "above": "top",
    "bottom": "bottom",
    "lower": "bottom",
    "below": "bottom",
    "center": "center",
    "centre": "center",
    "middle": "center",
}
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[ToyObject, ...]  # attributes the text did not give are ""
    background: str


def parse_caption(text: str) -> ParsedCaption:
    """Objects a free-text caption describes. Each shape word is one object (a number word before
    a plural makes several); colour and size come from the words since the previous object,
    position from the words up to the next shape word, or before the object when none follows."""
    words = _WORD.findall(text.lower())
    background = ""
    for i, w in enumerate(words):
        previous = _COLOUR_WORDS.get(words[i - 1], words[i - 1]) if i else ""
        following = words[i + 1] if i + 1 < len(words) else ""
        if w in ("background", "backdrop") and previous in BACKGROUNDS:
            background = previous
        elif w in BACKGROUNDS and previous == "on" and following != "background":
            background = w  # "on white: ..."
    shape_at = [i for i, w in enumerate(words) if w in _SHAPE_WORDS]
    objects: list[ToyObject] = []
    for n, i in enumerate(shape_at):
        start = shape_at[n - 1] + 1 if n else 0
        end = shape_at[n + 1] if n + 1 < len(shape_at) else len(words)
        before, after = words[start:i], words[i + 1 : end]
        colour = next((_COLOUR_WORDS[w] for w in reversed(before) if w in _COLOUR_WORDS), "")
        if colour in BACKGROUNDS:
            colour = ""
        size = next((_SIZE_WORDS[w] for w in reversed(before) if w in _SIZE_WORDS), "")
        position = next((_POSITION_WORDS[w] for w in after if w in _POSITION_WORDS), "")
        if not position:
            position = next((_POSITION_WORDS[w] for w in reversed(before) if w in _POSITION_WORDS), "")
        number = next((_NUMBER_WORDS[w] for w in reversed(before) if w in _NUMBER_WORDS), 1)
        objects.extend([ToyObject(_SHAPE_WORDS[words[i]], colour, size, position)] * max(1, min(number, 4)))
    return ParsedCaption(tuple(objects), background)


def _overlap(truth: list, predicted: list) -> float:
    if not truth and not predicted:
        return 1.0
    common = sum((Counter(truth) & Counter(predicted)).values())
    return common / max(len(truth), len(predicted))


def attribute_accuracy(scene: Scene, text: str) -> dict[str, float]:
    """Per attribute, how much of the scene a caption gets right (1.0 = all, extra objects count
    against it): count (exact), shape (multiset of shapes), colour ((colour, shape) pairs),
    position ((shape, position) pairs), size ((size, shape) pairs), background."""
    parsed = parse_caption(text)
    truth, pred = scene.objects, parsed.objects
    return {
        "count": float(len(pred) == len(truth)),
        "shape": _overlap([o.shape for o in truth], [o.shape for o in pred]),
        "colour": _overlap([(o.colour, o.shape) for o in truth], [(o.colour, o.shape) for o in pred]),
        "position": _overlap([(o.shape, o.position) for o in truth], [(o.shape, o.position) for o in pred]),
        "size": _overlap([(o.size, o.shape) for o in truth], [(o.size, o.shape) for o in pred]),
        "background": float(parsed.background == scene.background),
    }
