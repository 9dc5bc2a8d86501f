"""The held-out shapes renderer (benchmarks/render_shapes.py): its folder reads through `vlm eval`'s own
VQAv2 loader, every answer is true of the pixels, every question is worded as easy-VQA words it, the
question kinds and answers are balanced, and the output is a pure function of the seed."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from benchmarks import render_shapes as render
from vlm.data.easy_vqa import COLORS, SHAPES, easy_vqa_questions

N, SEED = 48, 3  # two blocks of 24: every shape, colour, wording and yes/no polarity is balanced
# Shape area / its smallest enclosing rectangle: a triangle fills half the rectangle on its longest side.
FILL = {"circle": math.pi / 4, "rectangle": 1.0, "triangle": 0.5}
FILL_TOLERANCE = (FILL["rectangle"] - FILL["circle"]) / 2  # closer than any other shape's fill: unambiguous
PALETTE = np.array([render.CANONICAL_RGB[c] for c in COLORS], dtype=float)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    render.main(["--out", str(folder), "--images", str(N), "--seed", str(SEED)])
    return folder


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it loads; keep these copies out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def metadata(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "validation" / "metadata.jsonl").read_text().splitlines()]


def template(question: str) -> str:
    """A question with its shape and colour words abstracted away."""
    words = [("{shape}" if w in SHAPES else "{color}" if w in COLORS else w) for w in question[:-1].split()]
    return " ".join(words) + question[-1]


class Seen(NamedTuple):
    shape: str
    color: str
    fill: float  # area / the smallest enclosing rectangle's
    tilt: float  # degrees the smallest enclosing rectangle is turned from upright, 0-45
    thickness: float  # that rectangle's short side / long side


def seen(path: Path) -> Seen:
    """What the picture shows, read off its pixels alone, without the renderer's scene."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert border.min() >= 200, f"{path.name}: the background is not pale"
    # The shape: pixels nearer one of the 8 colours than the background (at least half covered).
    to_background = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    to_palette = np.linalg.norm(pixels[..., None, :] - PALETTE, axis=-1).min(axis=-1)
    ys, xs = np.nonzero(to_palette < to_background)
    centroid = pixels[int(round(ys.mean())), int(round(xs.mean()))]
    color = COLORS[int(np.linalg.norm(PALETTE - centroid, axis=-1).argmin())]
    points = np.stack([xs, ys], axis=1).astype(float)
    boxes = []
    for degrees in range(90):  # the smallest rectangle around the shape's pixels, turned 1 degree at a time
        a = math.radians(degrees)
        u, v = points @ [math.cos(a), math.sin(a)], points @ [-math.sin(a), math.cos(a)]
        sides = sorted((np.ptp(u) + 1, np.ptp(v) + 1))
        boxes.append((sides[0] * sides[1], degrees, sides[0] / sides[1]))
    box, tilt, thickness = min(boxes)
    fill = len(points) / box
    shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    return Seen(shape, color, fill, min(tilt, 90 - tilt), thickness)


def test_the_folder_reads_through_vlm_evals_vqav2_loader(out):
    from vlm.vqa_benchmarks import get_benchmark, select

    records = list(select(get_benchmark("vqav2"), data=str(out), limit=0))
    assert len(records) == 4 * N and not [r for r in records if "error" in r]
    sizes = set()
    for record in records:
        assert len(record["answers"]) == 10 and len(set(record["answers"])) == 1
        assert record["question"].endswith("?")
        assert 64 <= min(record["image"].size) and max(record["image"].size) <= 256
        sizes.add(record["image"].size)
    assert any(w != h for w, h in sizes) and any(w > 64 for w, _ in sizes)  # not easy-VQA's 64x64


def test_questions_are_all_of_easy_vqas_templates_and_nothing_else(out):
    packaged = {template(r["question"]) for split in ("train", "test") for r in easy_vqa_questions(split)}
    assert {template(row["question"]) for row in metadata(out)} == packaged


def test_every_answer_is_true_of_the_pixels(out):
    fills, tilts = {s: [] for s in SHAPES}, []
    for image_id, rows in group_by_image(metadata(out)).items():
        picture = seen(out / "validation" / rows[0]["file_name"])
        shape, color = picture.shape, picture.color
        fills[shape].append(picture.fill)
        # Rectangles of aspect <= 3 and triangles with no angle under 30 degrees: no slivers.
        assert picture.thickness > 0.25, (image_id, picture)
        if shape == "rectangle":
            tilts.append(picture.tilt)
        for row in rows:
            question, answer = row["question"], row["multiple_choice_answer"]
            named = [w for w in question[:-1].split() if w in SHAPES or w in COLORS]
            if row["question_type"] in ("shape", "color"):
                # "what is the red shape?" and "what color is the circle?" name the drawn shape's other half
                assert answer == {"shape": shape, "color": color}[row["question_type"]], (image_id, question)
                assert set(named) <= {shape, color}, (image_id, question)
            else:
                negated = bool(re.search(r"\b(not|no)\b", question))
                assert answer == ("yes" if (named[0] in (shape, color)) != negated else "no"), (image_id, question)
    for shape, values in fills.items():
        assert values and all(abs(v - FILL[shape]) < FILL_TOLERANCE for v in values), (shape, values)
    assert max(tilts) > 15  # rectangles are drawn turned, not only upright


def group_by_image(rows: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["image_id"], []).append(row)
    return grouped


def test_question_kinds_and_answers_are_balanced(out):
    rows = metadata(out)
    kinds = Counter(row["question_type"] for row in rows)
    assert kinds == {kind: N for kind in render.TEMPLATES}
    answers = Counter((row["question_type"], row["multiple_choice_answer"]) for row in rows)
    assert all(answers["shape", s] == N // len(SHAPES) for s in SHAPES)
    assert all(answers["color", c] == N // len(COLORS) for c in COLORS)
    for kind in ("shape_yes_no", "color_yes_no"):
        assert answers[kind, "yes"] == answers[kind, "no"] == N // 2
        negated = [row for row in rows if row["question_type"] == kind and re.search(r"\b(not|no)\b", row["question"])]
        assert len(negated) == N // 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == SEED and manifest["images"] == N and manifest["questions"] == 4 * N
    assert manifest["answers_per_kind"]["shape_yes_no=yes"] == N // 2
    assert all(manifest["scenes"].get(f"background={b}") for b in render.BACKGROUNDS)


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(out, tmp_path):
    render.main(["--out", str(tmp_path / "again"), "--images", str(N), "--seed", str(SEED)])
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name

    render.main(["--out", str(tmp_path / "other"), "--images", "4", "--seed", str(SEED + 1)])
    for index in range(4):
        name = Path("validation") / render.image_name(index)
        assert (tmp_path / "other" / name).read_bytes() != (out / name).read_bytes()
    with pytest.raises(SystemExit, match="--overwrite"):
        render.main(["--out", str(tmp_path / "other"), "--images", "1"])


def test_the_demo_examples_are_the_committed_pictures_and_show_what_they_are_named(tmp_path):
    render.write_examples(tmp_path)
    for name, shape, color, _ in render.EXAMPLES:
        committed = Path(render.__file__).parents[1] / "vlm" / "examples" / name
        assert committed.read_bytes() == (tmp_path / name).read_bytes(), name
        assert committed.stat().st_size < 20_000
        assert seen(committed)[:2] == (shape, color)


def test_each_colour_is_drawn_around_the_rgb_easy_vqa_draws_that_name_in():
    # The held-out set tests new drawing, not new meanings of the names a model learnt from easy-VQA.
    from vlm.data.easy_vqa import describe

    records = easy_vqa_questions("train")
    paths = {r["image_id"]: r["image"] for r in records}
    drawn: dict[str, set] = {}
    for image_id, caption in sorted(describe(records).items())[:400]:
        pixels = np.asarray(Image.open(paths[image_id]).convert("RGB")).reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        # the most common colour is the background's, the next the shape's one flat colour
        shape_rgb = tuple(int(v) for v in colours[np.argsort(-counts)[:2]][-1])
        drawn.setdefault(caption.split()[1], set()).add(shape_rgb)
    assert drawn == {color: {render.CANONICAL_RGB[color]} for color in COLORS}
