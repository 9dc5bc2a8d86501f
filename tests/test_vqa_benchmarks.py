"""Benchmark registry and loaders, on tiny offline copies laid out like the Hub datasets."""

import datasets
import pytest

from vlm.config import ConfigError
from vlm.vqa_benchmarks import (
    BENCHMARKS,
    build_prompt,
    get_benchmark,
    mmstar_options,
    select,
    subset_indices,
)


def _load(name, data, split=None, limit=0, seed=0):
    selection = select(get_benchmark(name), data=str(data) if data else None, split=split, limit=limit, seed=seed)
    records = list(selection)
    return selection, [r for r in records if "error" not in r], [r for r in records if "error" in r]


# benchmark, fixture folder, rows in split, well-formed, the malformed row's problem
FIXTURES = [
    ("vqav2", "vqav2", 8, 7, "no ground-truth answers"),
    ("gqa", "gqa", 5, 4, "no image"),
    ("textvqa", "textvqa", 5, 4, "unreadable image"),
    ("pope_random", "pope", 4, 3, "'yes' or 'no'"),
    ("pope_popular", "pope", 2, 2, None),
    ("pope_adversarial", "pope", 2, 2, None),
    ("scienceqa_img", "scienceqa_img", 4, 3, "not one of the 2 options"),
    ("mmstar", "mmstar", 4, 3, "not one of the 4 options"),
]


@pytest.mark.parametrize("name, folder, total, good, problem", FIXTURES)
def test_hub_layout_folder_loads_every_row_and_flags_the_malformed_one(
    benchmark_data, name, folder, total, good, problem
):
    selection, records, errors = _load(name, benchmark_data[folder])
    assert selection.total == total and len(selection) == total
    assert len(records) == good and len(errors) == total - good
    if problem:
        assert problem in errors[0]["error"]
    for record in records:
        assert record["question"] and record["answers"] and record["image"].size == (24, 24)


def test_records_are_normalised_from_each_schema(benchmark_data):
    _, vqa, _ = _load("vqav2", benchmark_data["vqav2"])
    assert vqa[1]["answers"] == ["2"] * 3 + ["two"] * 2 + ["3"] * 5  # the 10 human answers, not the dicts
    assert vqa[0]["question_id"] == 1000 * 1000 + 1

    _, gqa, _ = _load("gqa", benchmark_data["gqa"])
    assert [r["answers"] for r in gqa] == [["yes"], ["green"], ["no"], ["yellow"]]
    # The image is joined from the images config by imageId: n102 is the second (green) PNG.
    assert gqa[1]["image"].getpixel((0, 0)) == (0, 128, 0)

    _, textvqa, _ = _load("textvqa", benchmark_data["textvqa"])
    assert textvqa[0]["ocr_tokens"] == ["nokia", "connecting"] and len(textvqa[0]["answers"]) == 10

    _, pope, _ = _load("pope_popular", benchmark_data["pope"])
    assert [(r["question"], r["label"]) for r in pope] == [
        ("Is there a person in the image?", "yes"), ("Is there a chair in the image?", "no")]

    _, sqa, _ = _load("scienceqa_img", benchmark_data["scienceqa_img"])
    assert [(r["label"], r["choices"]) for r in sqa] == [
        ("A", ["red", "blue"]), ("A", ["fish", "dog", "cat"]), ("B", ["water", "ice", "steam"])]
    assert sqa[0]["context"] == "The square is painted."

    _, mmstar, _ = _load("mmstar", benchmark_data["mmstar"])
    assert mmstar[2]["choices"] == ["A dark room", "A plain colored square", "A crowd", "A map"]
    assert mmstar[2]["label"] == "B"


def test_single_parquet_file_override_reads_the_same_records(benchmark_data):
    _, from_folder, _ = _load("vqav2", benchmark_data["vqav2"])
    _, from_file, _ = _load("vqav2", benchmark_data["vqav2"] / "data" / "validation-00000-of-00001.parquet")
    assert [(r["question_id"], r["answers"]) for r in from_file] == [
        (r["question_id"], r["answers"]) for r in from_folder
    ]


def test_image_folder_with_metadata_is_read_whatever_split_is_asked(benchmark_data):
    # Its one split is the "train" `datasets` names every card-less folder's; POPE's own split is "test".
    for split in (None, "train", "test"):
        selection, records, _ = _load("pope_adversarial", benchmark_data["pope_imagefolder"], split=split)
        assert selection.total == 2
        assert [r["label"] for r in records] == ["no", "yes"]


def test_json_lines_file_with_relative_image_paths(benchmark_data):
    _, records, errors = _load("mmstar", benchmark_data["mmstar_json"] / "mmstar.jsonl")
    assert len(records) == 3 and len(errors) == 1
    assert records[0]["image"].getpixel((0, 0)) == (255, 0, 0)  # images/0.png, resolved next to the file


def test_gqa_file_without_images_asks_for_the_folder(benchmark_data):
    questions = benchmark_data["gqa"] / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet"
    with pytest.raises(ConfigError, match="testdev_balanced_images"):
        _load("gqa", questions)


def test_wrong_dataset_names_the_missing_columns(benchmark_data):
    with pytest.raises(ConfigError, match=r"lacks the column\(s\) answers.*lmms-lab/VQAv2"):
        _load("vqav2", benchmark_data["pope"], split="test")


def test_missing_split_and_missing_path_are_clear(benchmark_data, tmp_path):
    with pytest.raises(ConfigError, match=r"split 'train'.*validation"):
        _load("vqav2", benchmark_data["vqav2"], split="train")
    with pytest.raises(ConfigError, match="no such file or folder"):
        _load("vqav2", tmp_path / "nowhere")


def test_hub_failure_suggests_a_local_copy(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'lmms-lab/VQAv2' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"could not load lmms-lab/VQAv2 .*--data PATH") as e:
        _load("vqav2", None)
    assert "\n" not in str(e.value)


def test_unknown_benchmark_suggests_the_close_name():
    with pytest.raises(ConfigError, match=r"unknown benchmark 'vqa2'; did you mean 'vqav2'\?"):
        get_benchmark("vqa2")


def test_every_benchmark_names_a_source_split_and_metric():
    for benchmark in BENCHMARKS.values():
        assert benchmark.split and benchmark.metric in ("vqa", "exact", "pope", "choice")
    assert {b.category for b in BENCHMARKS.values() if b.metric == "pope"} == {"random", "popular", "adversarial"}


def test_subset_is_fixed_by_the_seed():
    first = subset_indices(1000, 20, seed=0)
    assert first == subset_indices(1000, 20, seed=0)
    assert first != subset_indices(1000, 20, seed=1)
    assert first == sorted(set(first)) and len(first) == 20 and all(0 <= i < 1000 for i in first)
    assert subset_indices(5, 0, seed=3) == subset_indices(5, 9, seed=3) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="--limit"):
        subset_indices(5, -1, seed=0)


def test_easy_vqa_subset_is_deterministic_and_seed_dependent():
    def ids(seed):
        selection = select(get_benchmark("easy_vqa"), limit=8, seed=seed)
        return [r["question_id"] for r in selection]

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)
    selection = select(get_benchmark("easy_vqa"), limit=3, seed=0)
    assert selection.total == 9673  # the packaged test split
    record = next(iter(selection))
    assert len(record["answers"]) == 1 and record["image"].size == (64, 64)


def test_prompts_follow_llava_1_5():
    sqa = get_benchmark("scienceqa_img")
    record = {"question": "Which is a solid?", "choices": ["water", "ice"], "context": "States of matter."}
    assert build_prompt(record, sqa) == (
        "Context: States of matter.\nWhich is a solid?\nA. water\nB. ice\n"
        "Answer with the option's letter from the given choices directly."
    )
    textvqa = get_benchmark("textvqa")
    record = {"question": "what brand is it?", "ocr_tokens": ["nokia", "3310"]}
    assert build_prompt(record, textvqa) == "what brand is it?\nAnswer the question using a single word or phrase."
    assert build_prompt(record, textvqa, ocr=True) == (
        "what brand is it?\nReference OCR token: nokia, 3310\nAnswer the question using a single word or phrase."
    )
    cot = build_prompt(record, textvqa, cot=True)
    assert cot.startswith("what brand is it?\nThink step by step") and "Answer: <answer>" in cot


def test_mmstar_options_ignore_letters_inside_option_text():
    question = "Which one?\nOptions: A: the sign says B: stop, B: a tree, C: C: nothing"
    assert mmstar_options(question) == ["the sign says B: stop", "a tree", "C: nothing"]
    assert mmstar_options("No options here") == []

