"""The packaged easy-VQA dataset (pip `easy-vqa`, MIT): 64x64 shapes, 13 single-word answers."""

from __future__ import annotations

import json

from vlm.config import ConfigError
from vlm.packaged import package_dir

SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def easy_vqa_questions(split: str) -> list[dict]:
    """Records {question_id, image_id, image (path), question, answer}, in the dataset's order."""
    if split not in SPLITS:
        raise ConfigError(f"easy-VQA has splits {SPLITS}, not {split!r}")
    root = package_dir("easy_vqa", "easy-vqa") / "data" / split
    rows = json.loads((root / "questions.json").read_text())
    return [
        {"question_id": i, "image_id": image_id, "image": str(root / "images" / f"{image_id}.png"),
         "question": question, "answer": answer}
        for i, (question, answer, image_id) in enumerate(rows)
    ]


def describe(records: list[dict]) -> dict[int, str]:
    """A caption per image built from its own annotations, e.g. "A blue rectangle." (stage-1 data).

    Every image holds one coloured shape. Open questions name it in their answer; a yes/no
    question names it in its text when the answer affirms it ("is there not a red shape?" - "no").
    """
    found: dict[int, dict[str, str]] = {}
    for r in records:
        words = r["question"].rstrip("?").split()
        if r["answer"] in ("yes", "no"):
            negated = "not" in words or "no" in words
            if (r["answer"] == "yes") == negated:
                continue
            named = [w for w in words if w in SHAPES or w in COLORS]
        else:
            named = [r["answer"]]
        for word in named:
            found.setdefault(r["image_id"], {})["shape" if word in SHAPES else "color"] = word
    return {
        image_id: f"A {parts['color']} {parts['shape']}." for image_id, parts in found.items()
        if "shape" in parts and "color" in parts
    }
