import pytest

from mils_pipeline.generate.parsing import parse_candidates


def parse(reply: str, max_words: int = 10, exclude=None) -> list[str]:
    return parse_candidates(reply, max_words=max_words, exclude=exclude).candidates


def test_numbered_list_with_preamble_is_reduced_to_captions():
    reply = "Sure! Here are 3 new captions:\n1. A dog on a beach\n2) A brown dog running\n(3) A puppy in the sand"
    assert parse(reply) == ["A dog on a beach", "A brown dog running", "A puppy in the sand"]


def test_bullets_quotes_and_markdown_are_stripped():
    reply = '- "A red car on a street."\n* **A parked red car**\n• A car by the curb'
    assert parse(reply) == ["A red car on a street", "A parked red car", "A car by the curb"]


def test_json_list_of_strings_or_objects():
    assert parse('Here you go: ["a cat on a mat", "a cat asleep"]') == ["a cat on a mat", "a cat asleep"]
    assert parse('[{"caption": "a cup of tea"}, {"text": "tea on a table"}]') == ["a cup of tea", "tea on a table"]


def test_echoed_scores_and_labels_are_removed():
    reply = "0.312: a man with a camera\n1. 0.28: a photographer outdoors\nCaption 3: a man in a coat (0.25)"
    assert parse(reply) == ["a man with a camera", "a photographer outdoors", "a man in a coat"]


def test_repeats_within_a_reply_and_known_texts_are_dropped():
    reply = "1. A bowl of fruit\n2. a bowl of fruit.\n3. A BOWL OF FRUIT\n4. Fruit on a table"
    result = parse_candidates(reply, max_words=10, exclude={"fruit on a table"})
    assert result.candidates == ["A bowl of fruit"]
    assert result.rejected["repeat"] == 3


def test_junk_lines_are_rejected_and_counted():
    reply = "1.\n2. ---\n3. 42\n4. ...\n5. A horse in a field\n6. How many captions can you write?\n\n\n"
    result = parse_candidates(reply, max_words=10)
    assert result.candidates == ["A horse in a field"]
    assert result.rejected["junk"] >= 4


def test_overlong_line_keeps_its_first_sentence_or_is_rejected():
    long_tail = "A rocket on a launch pad. It is surrounded by towers and smoke and clouds and people watching"
    assert parse(long_tail, max_words=8) == ["A rocket on a launch pad"]
    result = parse_candidates("one two three four five six seven eight nine ten eleven twelve", max_words=5)
    assert result.empty and result.rejected["too_long"] == 1


def test_reply_with_nothing_usable_is_empty_not_an_error():
    result = parse_candidates("Sure, I can help with that:\n\n", max_words=10)
    assert result.empty
    assert parse_candidates("", max_words=10).empty


def test_continuation_without_leading_marker_keeps_first_line():
    # completion prompts end with "1." so the reply starts mid-item
    assert parse(" A cat on a sofa\n2. A grey cat\n3.") == ["A cat on a sofa", "A grey cat"]


def test_reply_cut_off_by_the_token_cap_loses_its_unfinished_last_line():
    result = parse_candidates("A dog on a beach\n2. A woman wearing a long", max_words=10, cut_off=True)
    assert result.candidates == ["A dog on a beach"]
    assert result.rejected["cut_off"] == 1


def test_bracketed_score_after_a_caption_is_not_taken_for_json():
    assert parse("A dog running on a sandy beach [0.31]") == ["A dog running on a sandy beach"]


def test_useful_share_counts_the_reply_lines_that_became_new_candidates():
    reply = " a red circle\n2. a blue square\n3. a red circle\n4. Here you go:\n5. a green star"
    result = parse_candidates(reply, max_words=10, exclude={"a blue square"})
    assert result.candidates == ["a red circle", "a green star"]
    useful = len(" a red circle\n") + len("5. a green star\n")
    assert result.useful_share(10) == pytest.approx(min(1.0, useful / len(reply)))
    assert result.useful_share(1) == pytest.approx(len(" a red circle\n") / len(reply))  # past N is waste
    assert parse_candidates("", max_words=10).useful_share(10) == 0.0
