"""The synthetic LLaVA dataset generator (benchmarks/make_llava_data.py): its files exist, follow the
LLaVA / mix665k / OneVision / VQAv2 layouts, say true things about the pictures, are a pure function
of the seed, and load through this project's own readers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import make_llava_data as gen

N, QUESTIONS, SEED = 40, 30, 7


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    gen.main(["--out", str(folder), "--images", str(N), "--vqa-questions", str(QUESTIONS), "--workers", "2",
              "--seed", str(SEED)])
    return folder


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it loads; keep these copies out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def read(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_every_image_named_in_the_jsons_opens_at_a_coco_size(out):
    records = read(out / "llava_pretrain.json") + read(out / "llava_instruct.json")
    named = {r["image"] for r in records if "image" in r}
    assert named == {gen.image_path(i) for i in range(N)}
    sizes = []
    for relative in named:
        with Image.open(out / "images" / relative) as image:
            image.load()
            assert image.format == "JPEG"
            assert 480 <= max(image.size) <= 640
            assert max(image.size) / min(image.size) <= 16 / 9 + 0.01
            sizes.append((out / "images" / relative).stat().st_size)
            # COCO's 640x480 JPEGs are ~100-200 KB; flat synthetic pictures would be ~30 KB.
            assert 50_000 < sizes[-1] * 640 * 480 / (image.width * image.height) < 200_000
    manifest = read(out / "manifest.json")
    assert manifest["counts"]["images"] == N and manifest["seed"] == SEED
    assert manifest["mean_jpeg_bytes"] == sum(sizes) / N


def test_caption_records_have_one_image_token_on_either_side_of_the_prompt(out):
    records = read(out / "llava_pretrain.json")
    assert len(records) == N and len({r["id"] for r in records}) == N
    placements = Counter()
    for record in records:
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].count("<image>") == 1 and "<image>" not in gpt["value"]
        assert human["value"].startswith("<image>\n") or human["value"].endswith("\n<image>")
        placements[human["value"].startswith("<image>")] += 1
        assert 5 <= len(gpt["value"].split()) <= 30
    assert placements[True] and placements[False]


COUNT = {"a": 1, "an": 1, **{word: n for n, word in enumerate(gen.NUMBER_WORDS)}}
PHRASE = re.compile(rf"\b({'|'.join(COUNT)}) ({'|'.join(gen.COLORS)}) ({'|'.join(gen.KINDS)})s?\b")


def test_captions_name_every_shape_of_the_picture(out):
    for index, record in enumerate(read(out / "llava_pretrain.json")):
        text = record["conversations"][1]["value"]
        picture = gen.scene(SEED, gen.TRAIN, index)
        named = Counter()
        for count, color, kind in PHRASE.findall(text):
            named[color, kind] += COUNT[count]
        assert named == Counter((s.color, s.kind) for s in picture.shapes), text
        assert f" {picture.background} " in f" {text} "


def test_pixels_show_the_shapes_the_text_describes(out):
    """The JPEG at each shape's centre has that shape's colour (nearest named colour), so the writer and the
    caption/question writers really share one scene."""
    names, palette = list(gen.COLORS), np.array(list(gen.COLORS.values()), dtype=float)
    for index in range(N):
        picture = gen.scene(SEED, gen.TRAIN, index)
        pixels = np.asarray(Image.open(out / "images" / gen.image_path(index)), dtype=float)
        assert pixels.shape[:2] == (picture.height, picture.width)
        for shape in picture.shapes:
            x, y = (round(c) for c in shape.center)
            mean = pixels[y - 2: y + 3, x - 2: x + 3].reshape(-1, 3).mean(axis=0)
            assert names[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))] == shape.color, (index, shape)


def test_instruct_records_alternate_turns_and_text_only_ones_have_no_image(out):
    records = read(out / "llava_instruct.json")
    text_only = [r for r in records if "image" not in r]
    assert 1.0 * N <= len(records) <= 1.6 * N and text_only
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and 1 <= len(turns) // 2 <= 10
        tokens = [t["value"].count("<image>") for t in turns]
        assert tokens == ([1] + [0] * (len(turns) - 1) if "image" in record else [0] * len(turns)), record["id"]
    first_questions = [r["conversations"][0]["value"] for r in records]
    kinds = Counter(gen.SHORT_ANSWER in q or gen.MULTIPLE_CHOICE in q for q in first_questions)
    assert kinds[True] and kinds[False]  # short-answer and free-form conversations both present


def test_vqav2_answers_are_true_of_the_held_out_images(out):
    rows = [json.loads(line) for line in (out / "vqav2" / "validation" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == QUESTIONS and len({r["question_id"] for r in rows}) == QUESTIONS
    checked = 0
    for row in rows:
        picture = gen.scene(SEED, gen.EVAL, row["image_id"])
        answers = [a["answer"] for a in row["answers"]]
        assert len(answers) == 10 and Counter(answers).most_common(1)[0][0] == row["multiple_choice_answer"]
        question, truth = row["question"], row["multiple_choice_answer"]
        if question.startswith("How many") and question.split()[2] in ("shapes", "objects"):
            expected = str(len(picture.shapes))
        elif question == "What color is the background?":
            expected = picture.background
        elif m := re.fullmatch(r"Is there an? (\w+) in the image\?", question):
            expected = "yes" if any(s.kind == m.group(1) for s in picture.shapes) else "no"
        elif m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
            expected = str(sum(s.color == m.group(1) for s in picture.shapes))
        else:
            continue
        assert truth == expected, question
        checked += 1
    assert checked >= 5


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(out, tmp_path):
    again = tmp_path / "again"
    gen.main(["--out", str(again), "--images", str(N), "--vqa-questions", str(QUESTIONS), "--workers", "1",
              "--seed", str(SEED), "--no-parquet"])  # one worker instead of two: output must not depend on it
    for name in ("llava_pretrain.json", "llava_instruct.json", "vqav2/validation/metadata.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    for index in (0, 17, N - 1):
        path = gen.image_path(index)
        assert (again / "images" / path).read_bytes() == (out / "images" / path).read_bytes()

    other = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "benchmarks.make_llava_data", "--out", str(other), "--images", str(N),
                    "--vqa-questions", "5", "--workers", "2", "--seed", str(SEED + 1), "--no-parquet"],
                   check=True, cwd=Path(__file__).parents[1], capture_output=True)
    assert (other / "llava_pretrain.json").read_bytes() != (out / "llava_pretrain.json").read_bytes()
    assert (other / "images" / gen.image_path(0)).read_bytes() != (out / "images" / gen.image_path(0)).read_bytes()
    with pytest.raises(SystemExit, match="--overwrite"):
        gen.main(["--out", str(other), "--images", "2", "--vqa-questions", "1", "--workers", "1"])


def test_parquet_shards_load_with_datasets_as_an_image_feature(out):
    import datasets

    records = read(out / "llava_instruct.json")
    loaded = datasets.load_dataset(str(out / "llava_instruct.parquet"), split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded.column_names == ["id", "image", "conversations"]
    assert loaded.num_rows == len(records) and loaded["id"] == [r["id"] for r in records]
    for row, record in zip(loaded, records, strict=True):
        assert row["conversations"] == record["conversations"]
        if "image" in record:
            with Image.open(out / "images" / record["image"]) as file:
                assert row["image"].size == file.size
        else:
            assert row["image"] is None


def test_vqav2_folder_reads_through_vlm_eval_loader(out):
    from vlm.vqa_benchmarks import get_benchmark, select

    selection = select(get_benchmark("vqav2"), data=str(out / "vqav2"), limit=0)
    records = list(selection)
    assert len(records) == QUESTIONS
    assert not [r for r in records if "error" in r]
    for record in records:
        assert len(record["answers"]) == 10 and record["question"].endswith("?")
        assert 480 <= max(record["image"].size) <= 640


def test_jsons_read_through_the_llava_training_loader(out):
    from vlm.config import DataSource
    from vlm.data.sources import load_examples

    for stage, name in (("align", "llava_pretrain.json"), ("instruct", "llava_instruct.json")):
        records = read(out / name)
        examples = load_examples(DataSource(kind="llava", path=str(out / name), image_root=str(out / "images")), stage)
        assert len(examples) == len(records)
        for record, example in zip(records, examples, strict=True):
            if "image" not in record:
                assert example.load is None
                continue
            with Image.open(out / "images" / record["image"]) as file:
                assert example.load().size == file.size


def test_parquet_shards_read_through_the_hf_training_loader_as_the_json_does(out):
    from vlm.config import DataSource
    from vlm.data.sources import load_examples

    shards = load_examples(DataSource(kind="hf", path=str(out / "llava_instruct.parquet")), "instruct")
    records = load_examples(
        DataSource(kind="llava", path=str(out / "llava_instruct.json"), image_root=str(out / "images")), "instruct"
    )
    assert len(shards) == len(records) and not shards.skipped
    for from_shards, from_json in zip(shards, records, strict=True):
        assert from_shards.messages == from_json.messages
        assert (from_shards.load is None) == (from_json.load is None)
        if from_json.load is not None:
            assert from_shards.load().size == from_json.load().size
