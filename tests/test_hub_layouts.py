"""Hugging Face datasets read as published (data kind hf): LLaVA-style conversations, the_cauldron's turn pairs,
column-mapped captions, from one file, a folder of shards or an image folder, and trained on."""

import io
import json

import pytest
import yaml
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from vlm.config import ConfigError, DataSource
from vlm.data.sources import load_examples
from vlm.train.trainer import run_training

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it loads; keep these copies out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def png(color: str) -> dict:
    buffer = io.BytesIO()
    PILImage.new("RGB", (40, 40), COLORS[color]).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def turns(*texts: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(texts)]


# lmms-lab/LLaVA-OneVision-Data (each subset's card): id, image (null in text-only rows), conversations, data_source.
ONEVISION = Features({"id": Value("string"), "image": Image(),
                      "conversations": List({"from": Value("string"), "value": Value("string")}),
                      "data_source": Value("string")})
ONEVISION_ROWS = [
    {"id": "0", "image": png("red"), "data_source": "vqa",
     "conversations": turns("<image>\nWhat colour is the square?", "Red.", "Is it big?", "Yes.")},
    {"id": "1", "image": png("blue"), "data_source": "vqa",  # no placeholder: it goes first, as in LLaVA JSON
     "conversations": turns("What colour is the square?", "Blue.")},
    {"id": "2", "image": None, "data_source": "text",
     "conversations": turns("What is the capital of France?", "Paris.")},
    {"id": "3", "image": png("green"), "data_source": "vqa", "conversations": turns("<image> and <image>?", "Two.")},
    {"id": "4", "image": png("green"), "data_source": "vqa", "conversations": turns("Nobody answers this.")},
]
# HuggingFaceM4/the_cauldron (each config's card): images (a list), texts (a list of {user, assistant, source}).
CAULDRON = Features({"images": List(Image()),
                     "texts": List({"user": Value("string"), "assistant": Value("string"), "source": Value("string")})})
CAULDRON_ROWS = [
    {"images": [png("red")], "texts": [{"user": "What colour?", "assistant": "Red.", "source": "vqav2"},
                                       {"user": "What shape?", "assistant": "A square.", "source": "vqav2"}]},
    {"images": [png("blue")], "texts": [{"user": "What colour?", "assistant": "Blue.", "source": "vqav2"}]},
    {"images": [png("red"), png("blue")], "texts": [{"user": "Same colour?", "assistant": "No.", "source": "nlvr2"}]},
    {"images": [png("green")], "texts": [{"user": "What colour?", "assistant": "Green.", "source": "vqav2"}]},
]


@pytest.fixture(scope="module")
def hub_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    onevision = Dataset.from_list(ONEVISION_ROWS, features=ONEVISION)
    onevision.to_parquet(root / "onevision.parquet")
    # Shards in a folder named like a file, as benchmarks/make_llava_data.py writes them.
    (root / "onevision_shards.parquet").mkdir()
    for shard, rows in enumerate((range(0, 3), range(3, 5))):
        onevision.select(rows).to_parquet(root / "onevision_shards.parquet" / f"train-{shard:05d}-of-00002.parquet")
    Dataset.from_list(CAULDRON_ROWS, features=CAULDRON).to_parquet(root / "cauldron.parquet")
    folder = root / "captions"  # an image folder with its metadata: one split, which `datasets` calls train
    folder.mkdir()
    for color in COLORS:
        PILImage.new("RGB", (40, 40), COLORS[color]).save(folder / f"{color}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{c}.png", "text": f"A {c} square."}) + "\n" for c in COLORS))
    return root


def test_llava_style_conversations_are_found_by_their_columns_and_follow_the_llava_json_rules(hub_data):
    records = load_examples(DataSource(kind="hf", path=str(hub_data / "onevision.parquet")), "instruct")
    assert [e.messages for e in records] == [
        [{"role": "user", "content": "<image>\nWhat colour is the square?"}, {"role": "assistant", "content": "Red."},
         {"role": "user", "content": "Is it big?"}, {"role": "assistant", "content": "Yes."}],
        [{"role": "user", "content": "<image>\nWhat colour is the square?"}, {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    ]
    assert records[0].load().getpixel((0, 0)) == COLORS["red"] and records[1].load().getpixel((0, 0)) == COLORS["blue"]
    assert records[2].load is None and records.key(2) == ""  # text only: nothing for the feature cache
    assert records.key(0) != records.key(1)
    assert records.skipped == {"several images": 1, "no answer turn": 1}


def test_a_folder_of_parquet_shards_reads_as_its_rows(hub_data):
    whole = load_examples(DataSource(kind="hf", path=str(hub_data / "onevision.parquet")), "instruct")
    shards = load_examples(DataSource(kind="hf", path=str(hub_data / "onevision_shards.parquet")), "instruct")
    assert [e.messages for e in shards] == [e.messages for e in whole] and shards.skipped == whole.skipped
    assert shards[1].load().getpixel((0, 0)) == COLORS["blue"]


def test_cauldron_turn_pairs_become_a_conversation_with_the_image_first(hub_data):
    records = load_examples(DataSource(kind="hf", path=str(hub_data / "cauldron.parquet")), "align")
    assert records[0].messages == [
        {"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "What shape?"}, {"role": "assistant", "content": "A square."}]
    assert [e.load().getpixel((0, 0)) for e in records] == [COLORS["red"], COLORS["blue"], COLORS["green"]]
    assert records.skipped == {"several images": 1}


def test_columns_override_the_layout_the_names_suggest(tmp_path):
    renamed = Dataset.from_list(ONEVISION_ROWS[:1], features=ONEVISION).rename_columns(
        {"conversations": "chat", "image": "picture"})
    renamed.to_parquet(tmp_path / "renamed.parquet")
    source = DataSource(kind="hf", path=str(tmp_path / "renamed.parquet"),
                        columns={"conversations": "chat", "image": "picture"})
    (example,) = load_examples(source, "instruct")
    assert example.messages[1] == {"role": "assistant", "content": "Red."}
    assert example.load().getpixel((0, 0)) == COLORS["red"]
    needs_mapping = r"data.instruct.columns needs image, question, answer.*has id, picture, data_source, chat;"
    with pytest.raises(ConfigError, match=needs_mapping):
        load_examples(DataSource(kind="hf", path=str(tmp_path / "renamed.parquet")), "instruct")


def test_a_local_image_folder_is_read_whatever_split_is_named(hub_data):
    for split in ("train", "validation"):
        source = DataSource(kind="hf", path=str(hub_data / "captions"), split=split,
                            columns={"image": "image", "caption": "text"})
        records = load_examples(source, "align")
        assert sorted(e.messages[1]["content"] for e in records) == sorted(f"A {c} square." for c in COLORS)


def test_two_steps_of_training_on_both_conversation_layouts(tmp_path, tiny_model_config, hub_data):
    stage = {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_ratio": 0.0}
    config = {
        "model": {"vision": {"backend": "hf", "name": tiny_model_config.vision.name},
                  "lm": {"name": tiny_model_config.lm.name}},
        "data": {"align": {"kind": "hf", "path": str(hub_data / "cauldron.parquet")},
                 "instruct": {"kind": "hf", "path": str(hub_data / "onevision_shards.parquet")},
                 "val_fraction": 0.0, "cache": "off"},
        "train": {"output_dir": str(tmp_path / "run"), "log_every": 1, "eval_every": 100, "save_every": 100,
                  "align": dict(stage), "instruct": dict(stage)},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert run_training(str(tmp_path / "config.yaml"), []) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {name: s["steps"] for name, s in report["stages"].items()} == {"align": 2, "instruct": 2}
    assert report["stages"]["align"]["skipped"] == {"several images": 1}
    assert report["stages"]["instruct"]["skipped"] == {"several images": 1, "no answer turn": 1}


def test_a_snapshot_of_several_configs_reads_the_one_named(tmp_path):
    # the_cauldron's repo layout: one folder of shards per config, declared in the card.
    card = "".join(f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train-*\n"
                   for name in ("ai2d", "vqav2"))
    (tmp_path / "README.md").write_text(f"---\nconfigs:\n{card}---\n")
    for name, rows in (("ai2d", CAULDRON_ROWS[:1]), ("vqav2", CAULDRON_ROWS[1:2])):
        (tmp_path / name).mkdir()
        Dataset.from_list(rows, features=CAULDRON).to_parquet(tmp_path / name / "train-00000-of-00001.parquet")
    (example,) = load_examples(DataSource(kind="hf", path=str(tmp_path), config="vqav2"), "align")
    assert example.messages[1] == {"role": "assistant", "content": "Blue."}
    with pytest.raises(ConfigError, match=r"Config name is missing.*'ai2d', 'vqav2'.*set data.align.config=NAME"):
        load_examples(DataSource(kind="hf", path=str(tmp_path)), "align")
