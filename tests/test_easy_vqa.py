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
