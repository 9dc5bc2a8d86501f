from pathlib import Path

import pytest

from vlm.data.easy_vqa import COLORS, SHAPES, describe, easy_vqa_questions


def test_captions_agree_with_every_open_answer_and_affirmed_yes_no_question():
    records = easy_vqa_questions("train")
    captions = describe(records)
    assert len(captions) > 3000
    for r in records:
        caption = captions.get(r["image_id"])
        if caption is None:
            continue
        words = r["question"].rstrip("?").split()
        if r["answer"] not in ("yes", "no"):
            assert r["answer"] in caption
        else:
            named = next(w for w in words if w in SHAPES or w in COLORS)
            negated = "not" in words or "no" in words
            # The caption's colour and shape decide every yes/no answer about the image.
            assert (named in caption.rstrip(".").split()) == ((r["answer"] == "yes") != negated)


def test_synthetic_records_give_expected_caption():
    records = [
        {"image_id": 7, "question": "is there not a teal shape?", "answer": "no"},
        {"image_id": 7, "question": "what shape is present?", "answer": "circle"},
        {"image_id": 8, "question": "is there a red shape?", "answer": "no"},
        {"image_id": 8, "question": "what shape is present?", "answer": "triangle"},
    ]
    assert describe(records) == {7: "A teal circle."}


def test_instruct_conversations_hold_the_configured_number_of_questions_each_asked_once():
    from vlm.config import DataSource
    from vlm.data.sources import load_examples

    asked = {(r["image_id"], r["question"]) for r in easy_vqa_questions("train")}
    for turns in (1, 4):
        records = load_examples(DataSource(kind="easy_vqa", turns=turns), "instruct")
        questions = []
        for i in range(len(records)):
            messages = records[i].messages
            users = [m["content"] for m in messages if m["role"] == "user"]
            assert 1 <= len(users) <= turns and len(messages) == 2 * len(users)
            questions += [(records.key(i), u) for u in users]
        assert len(questions) == len(set(questions)) == len(asked)
        if turns == 1:
            assert len(records) == len(asked)


def test_the_short_answer_prompt_follows_every_question_or_is_left_out():
    from vlm.config import DataSource
    from vlm.data.sources import load_examples
    from vlm.prompts import SHORT_ANSWER

    source = DataSource(kind="easy_vqa", turns=2, limit=20)
    llava, bare = load_examples(source, "instruct"), load_examples(source, "instruct", "")
    for i in range(20):
        for asked, alone in zip(llava[i].messages, bare[i].messages, strict=True):
            if asked["role"] == "user":
                assert asked["content"] == f"{alone['content']}\n{SHORT_ANSWER}"
                assert SHORT_ANSWER not in alone["content"]
            else:
                assert asked == alone


def test_described_conversations_put_their_pictures_caption_where_the_image_was_and_keep_every_answer():
    from vlm.config import DataSource
    from vlm.data.sources import load_examples
    from vlm.language_model import IMAGE_TOKEN

    captions = describe(easy_vqa_questions("train"))
    shown = load_examples(DataSource(kind="easy_vqa", turns=1, limit=2000), "instruct", "")
    worded = load_examples(DataSource(kind="easy_vqa", turns=1, limit=2000, described=0.6), "instruct", "")
    assert len(worded) == len(shown)
    in_words = with_caption = 0
    for i in range(len(shown)):
        image_id = int(Path(shown.key(i).split(":")[0]).stem)
        caption = captions.get(image_id)
        with_caption += caption is not None
        assert shown[i].load is not None and shown[i].messages[1] == worded[i].messages[1]
        if worded[i].load is None:
            in_words += 1
            assert worded.key(i) == ""  # no image, so nothing for the feature cache to key
            assert worded[i].messages[0]["content"] == shown[i].messages[0]["content"].replace(IMAGE_TOKEN, caption)
        else:
            assert (worded.key(i), worded[i].messages) == (shown.key(i), shown[i].messages)
    assert 0.55 < in_words / with_caption < 0.65


def test_described_is_refused_where_there_is_no_caption_to_use_or_no_picture_left():
    from vlm.config import ConfigError, DataSource
    from vlm.data.sources import check_source

    check_source(DataSource(kind="easy_vqa", described=0.6), "instruct")
    with pytest.raises(ConfigError, match="data.align.described is for easy_vqa questions"):
        check_source(DataSource(kind="easy_vqa", described=0.5), "align")
    with pytest.raises(ConfigError, match=r"data.instruct.described=1.0: .* up to, not including, 1"):
        check_source(DataSource(kind="easy_vqa", described=1.0), "instruct")
