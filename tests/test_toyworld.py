"""The toy world: deterministic scenes with exact captions, hard negatives, the attribute parser,
the training script, and the bundled scorer checkpoint judged on held-out scenes."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from mils_pipeline.toyworld.scenes import (
    ATTRIBUTE_WORDS,
    NEGATIVE_KINDS,
    ToyObject,
    attribute_accuracy,
    blank_attribute,
    caption,
    describe,
    grammar_words,
    hard_negative,
    make_scene,
    make_scenes,
    negative_kinds,
    paraphrase,
    parse_caption,
    references,
    render,
)


def test_a_scene_is_a_function_of_split_and_index():
    assert make_scene("test", 7) == make_scene("test", 7)
    assert make_scene("test", 7) != make_scene("test", 8)
    assert make_scene("train", 7) != make_scene("test", 7)
    assert np.array_equal(np.asarray(render(make_scene("test", 7))), np.asarray(render(make_scene("test", 7))))


def test_rendered_scene_shows_its_background_and_object_colours():
    scene = make_scene("test", 3)
    pixels = np.asarray(render(scene)).reshape(-1, 3)
    assert render(scene).size == (64, 64)
    from mils_pipeline.toyworld.scenes import RGB

    for name in [scene.background, *(o.colour for o in scene.objects)]:
        distance = np.abs(pixels.astype(int) - np.array(RGB[name])).sum(axis=1)
        assert (distance < 30).sum() >= 10, name


def test_every_reference_and_paraphrase_reads_back_as_the_scene():
    rng = random.Random(0)
    for scene in make_scenes("test", 40):
        for text in [*references(scene), paraphrase(scene, rng)]:
            accuracy = attribute_accuracy(scene, text)
            assert accuracy["count"] == accuracy["shape"] == accuracy["colour"] == accuracy["position"] == 1.0, text


def test_a_hard_negative_changes_what_the_scene_shows_and_the_parser_sees_it():
    rng = random.Random(1)
    for scene in make_scenes("test", 40):
        negative = hard_negative(scene, rng)
        assert describe(negative) != describe(scene)
    scene = next(s for s in make_scenes("test", 40) if s.count == 2 and s.objects[0].colour != s.objects[1].colour)
    swapped = hard_negative(scene, rng, "swap_colour")
    assert attribute_accuracy(scene, caption(swapped))["colour"] == 0.0


def test_single_object_scenes_have_no_swap_negatives():
    scene = next(s for s in make_scenes("test", 40) if s.count == 1)
    with pytest.raises(ValueError):
        hard_negative(scene, random.Random(0), "swap_shape")
    assert all(hard_negative(scene, random.Random(0), k) for k in NEGATIVE_KINDS if not k.startswith("swap_"))


def test_a_hedge_names_one_object_twice_in_its_place_with_another_shape_or_colour():
    """The caption a search finds when a judge rewards covering alternatives: one object named
    again, in the same place, with another shape or colour; the parser counts an extra object."""
    rng = random.Random(4)
    for scene in make_scenes("test", 60):
        if scene.count == 3:
            assert "hedge" not in negative_kinds(scene)
            with pytest.raises(ValueError):
                hard_negative(scene, rng, "hedge")
            continue
        negative = hard_negative(scene, rng, "hedge")
        assert negative.count == scene.count + 1
        (extra,) = set(negative.objects) - set(scene.objects)
        twin = next(o for o in scene.objects if o.position == extra.position)
        assert (twin.shape != extra.shape) + (twin.colour != extra.colour) == 1
        assert twin.size == extra.size
        accuracy = attribute_accuracy(scene, caption(negative))
        assert accuracy["count"] == 0.0 and accuracy["colour"] < 1.0


def test_every_caption_paraphrase_and_hard_negative_is_written_in_the_grammar_words():
    rng = random.Random(3)
    words = grammar_words()
    for scene in make_scenes("test", 60):
        for text in [caption(scene), paraphrase(scene, rng), paraphrase(hard_negative(scene, rng), rng)]:
            assert set(text.replace(",", " , ").replace(":", " : ").split()) <= words, text


def test_blanking_replaces_one_attribute_word_and_keeps_the_punctuation():
    rng = random.Random(4)
    text = "two shapes: a large red circle on the left, a small blue square at the top"
    blanked = blank_attribute(text, rng, "zorblat")
    before, after = text.split(" "), blanked.split(" ")
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0].strip(",:") in ATTRIBUTE_WORDS
    assert changed[0][1] == "zorblat" + changed[0][0][len(changed[0][0].rstrip(",:")) :]
    with pytest.raises(ValueError):
        blank_attribute("a nice picture", rng, "zorblat")


def test_parser_reads_free_text_with_plurals_synonyms_and_missing_parts():
    parsed = parse_caption("Two red circles on the left and a big blue cross near the top, on a white backdrop.")
    assert parsed.objects == (
        ToyObject("circle", "red", "", "left"),
        ToyObject("circle", "red", "", "left"),
        ToyObject("cross", "blue", "large", "top"),
    )
    assert parsed.background == "white"
    assert parse_caption("a nice picture").objects == ()


def test_training_script_writes_a_checkpoint_the_scorer_loads(tmp_path):
    from mils_pipeline.config import ScorerConfig
    from mils_pipeline.score import build_scorer
    from mils_pipeline.toyworld.train import Recipe, train

    recipe = Recipe(name="toy-test", steps=2, batch_size=8, held_out_scenes=16, width=64, layers=1, threads=1)
    report = train(recipe, tmp_path / "toy-test", log=lambda _: None)
    assert report["steps_done"] == 2
    assert set(report["held_out"]["sensitivity"]) == {*NEGATIVE_KINDS, "unknown_word"}
    scorer = build_scorer(
        ScorerConfig(
            model="toy-test",
            pretrained=None,
            checkpoint=str(tmp_path / "toy-test.safetensors"),
            architecture=report["architecture"],
        ),
        "image",
    )
    assert not scorer.random_weights
    assert scorer.embed_texts(["a red circle"]).shape == (1, 64)


def test_continued_training_records_its_lineage_without_machine_paths(tmp_path):
    from mils_pipeline.toyworld.train import Recipe, train

    small = {"batch_size": 8, "held_out_scenes": 8, "width": 64, "layers": 1, "threads": 1}
    train(Recipe(name="toy-a", steps=2, **small), tmp_path / "one" / "toy-a", log=lambda _: None)
    init = str(tmp_path / "one" / "toy-a.safetensors")
    report = train(Recipe(name="toy-a", steps=1, seed=5, init=init, **small), tmp_path / "two" / "toy-a", log=print)
    assert report["steps_done"] == 1 and report["steps_before"] == 2
    assert report["recipe"]["init"] == "toy-a.safetensors"
    assert [(s["steps_done"], s["seed"], s["init"]) for s in report["lineage"]] == [(2, 0, "")]
    written = (tmp_path / "two" / "toy-a.json").read_text() + (tmp_path / "two" / "toy-a.md").read_text()
    assert str(tmp_path) not in written and "Continued from" in written


def test_a_patch_8_checkpoint_continues_at_patch_4_with_its_kernel_and_grid_resized(tmp_path):
    import torch
    from safetensors.torch import load_file

    from mils_pipeline.toyworld.train import Recipe, train

    small = {"batch_size": 8, "held_out_scenes": 8, "width": 64, "layers": 1, "threads": 1}
    train(Recipe(name="toy-p", steps=2, **small), tmp_path / "one" / "toy-p", log=lambda _: None)
    init = str(tmp_path / "one" / "toy-p.safetensors")
    report = train(
        Recipe(name="toy-p", steps=1, patch_size=4, init=init, **small), tmp_path / "two" / "toy-p", log=print
    )
    assert report["architecture"]["vision_cfg"]["patch_size"] == 4
    before, after = load_file(init), load_file(str(tmp_path / "two" / "toy-p.safetensors"))
    assert after["visual.conv1.weight"].shape[-2:] == (4, 4)
    assert after["visual.positional_embedding"].shape[0] == 16 * 16 + 1
    # each 4x4 tap is the sum of a 2x2 block of the 8x8 kernel: a flat patch embeds as before (one
    # warm-up step of training moves the weights by ~1e-5)
    summed = before["visual.conv1.weight"].float().sum(dim=(-1, -2))
    assert torch.allclose(after["visual.conv1.weight"].float().sum(dim=(-1, -2)), summed, atol=2e-2)
    # the text tower is carried over
    assert torch.allclose(after["token_embedding.weight"].float(), before["token_embedding.weight"].float(), atol=1e-3)
    with pytest.raises(ValueError, match="cannot continue it at patch 3"):
        train(Recipe(name="toy-p", steps=1, patch_size=3, image_size=63, init=init, **small), tmp_path / "x", log=print)


def test_training_gives_every_word_outside_the_grammar_the_learned_unknown_row(tmp_path):
    import open_clip
    from safetensors.torch import load_file

    from mils_pipeline.toyworld.train import UNKNOWN_WORD, Recipe, train

    recipe = Recipe(name="toy-unk", steps=2, batch_size=8, held_out_scenes=8, width=64, layers=1, threads=1)
    train(recipe, tmp_path / "toy-unk", log=lambda _: None)
    rows = load_file(str(tmp_path / "toy-unk.safetensors"))["token_embedding.weight"]
    tokenizer = open_clip.get_tokenizer("toy-unk")
    (unknown,) = tokenizer.encode(UNKNOWN_WORD)
    assert rows[unknown].abs().sum() > 0
    for word in ("star", "above", "oval"):
        (token,) = tokenizer.encode(word)
        assert rows[token].equal(rows[unknown]), word
    (red,) = tokenizer.encode("red")
    assert not rows[red].equal(rows[unknown])


def test_the_training_vocabulary_holds_every_token_of_the_grammar_and_maps_the_rest_to_unknown():
    import open_clip

    from mils_pipeline.score.open_clip_image import register_architecture
    from mils_pipeline.toyworld.train import TEXT_TOWERS, _Vocabulary, architecture

    rng = random.Random(5)
    texts = [paraphrase(s, rng) for s in make_scenes("test", 60)]
    for tower in TEXT_TOWERS:
        register_architecture(f"toy-vocab-{tower}", architecture(64, 1, tower))
        tokenizer = open_clip.get_tokenizer(f"toy-vocab-{tower}")
        vocabulary = _Vocabulary(tokenizer)
        assert set(tokenizer(texts).unique().tolist()) <= set(vocabulary.ids.tolist()), tower
        star = vocabulary.compact(tokenizer(["a star on the left"]))[0]
        assert star[2] == vocabulary.unknown_row and star[3] != vocabulary.unknown_row, tower


# Where a bundled judge misses the 90% bar today (docs/QUALITY.md): strict, so a judge that
# clears it fails the test until the mark is removed.
BLANKING_MISSES: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize(
    ("name", "attribute", "word"),
    [
        pytest.param(
            name,
            attribute,
            word,
            marks=[pytest.mark.xfail(strict=True, reason=BLANKING_MISSES[name, attribute])]
            if (name, attribute) in BLANKING_MISSES
            else [],
        )
        for name in ("toy-scorer", "toy-audit")
        for attribute, word in (("colour", "zorblat"), ("shape", "rectangle"), ("position", "above"))
    ],
)
def test_bundled_judges_score_a_caption_with_an_attribute_word_made_unknown_below_the_true_one(name, attribute, word):
    """An unseen word is not a blank: leaving an attribute unsaid loses score (scenes of split
    'test', which no judge saw in training)."""
    from mils_pipeline.toyworld.corpus import Judge

    judge = Judge(name)
    scenes = make_scenes("test", 50)
    blanked = [re.sub(rf"\b{getattr(s.objects[0], attribute)}\b", word, caption(s), count=1) for s in scenes]
    wins = judge.scores(scenes, [caption(s) for s in scenes]) > judge.scores(scenes, blanked)
    assert wins.mean() >= 0.9, f"{name}: the true caption wins on {wins.mean():.0%} of scenes"


def test_bundled_scorer_prefers_true_captions_over_hard_negatives_on_unseen_scenes():
    """A quality check of the committed checkpoint on scenes it never saw (split 'test')."""
    from mils_pipeline.toyworld.corpus import Judge

    judge = Judge("toy-scorer")
    scenes = make_scenes("test", 64)
    rng = random.Random(2)
    negatives = [caption(hard_negative(s, rng, "colour")) for s in scenes]
    true_scores = judge.scores(scenes, [caption(s) for s in scenes])
    false_scores = judge.scores(scenes, negatives)
    assert (true_scores > false_scores).mean() > 0.7
