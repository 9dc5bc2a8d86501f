import json

import pytest
import torch
from PIL import Image

from vlm.config import ConfigError, DataSource
from vlm.data.batches import Collator, ConversationDataset, LengthGroupedBatchSampler
from vlm.data.feature_cache import FeatureCache
from vlm.data.sources import load_examples
from vlm.prompts import SHORT_ANSWER


def test_llava_records_become_chat_messages_with_the_image_first(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [
        {"id": "1", "image": "a.png", "conversations": [
            {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    examples = load_examples(
        DataSource(kind="llava", path=str(tmp_path / "data.json"), image_root=str(tmp_path)), "instruct"
    )
    assert [m["role"] for m in examples[0].messages] == ["user", "assistant", "user", "assistant"]
    assert examples[0].messages[0]["content"] == "What is it?\n<image>"
    assert examples[0].load().size == (8, 8)
    assert examples[1].load is None and examples[1].messages[0]["content"] == "Hi"


def test_hf_source_maps_columns_and_picks_the_most_common_answer(tmp_path):
    import datasets

    image = Image.new("RGB", (8, 8), (255, 0, 0))
    rows = {
        "img": [image, image],
        "q": ["What colour?", "How many?"],
        "answers": [["red", "red", "pink"], ["2", "two", "2"]],
    }
    datasets.Dataset.from_dict(rows).cast_column("img", datasets.Image()).to_parquet(str(tmp_path / "vqa.parquet"))
    source = DataSource(
        kind="hf", path=str(tmp_path / "vqa.parquet"), columns={"image": "img", "question": "q", "answer": "answers"}
    )
    examples = load_examples(source, "instruct")
    assert examples[0].messages == [{"role": "user", "content": f"<image>\nWhat colour?\n{SHORT_ANSWER}"},
                                    {"role": "assistant", "content": "red"}]
    assert examples[1].messages[1]["content"] == "2"
    assert examples[0].load().getpixel((0, 0)) == (255, 0, 0)
    assert examples[0].key != examples[1].key


def test_hf_source_names_a_missing_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"q": ["x"]}).to_json(str(tmp_path / "d.jsonl"))
    source = DataSource(kind="hf", path=str(tmp_path / "d.jsonl"), columns={"image": "picture", "caption": "q"})
    with pytest.raises(ConfigError, match="picture"):
        load_examples(source, "align")


def test_feature_cache_stores_encoder_output_and_reuses_it(tiny_model, images, tmp_path):
    items = [(f"img{i}", (lambda im=im: im)) for i, im in enumerate(images)]
    cache = FeatureCache(tiny_model.vision, tmp_path)
    cache.build(items, batch_size=3, show_progress=False)
    expected = tiny_model.vision(tiny_model.vision.preprocess(images))
    torch.testing.assert_close(cache.get(["img2", "img0"]).float(), expected[[2, 0]], atol=2e-3, rtol=2e-3)

    reopened = FeatureCache(tiny_model.vision, tmp_path)
    calls = []
    reopened.build([(key, lambda: calls.append(1)) for key, _ in items], show_progress=False)
    assert calls == [] and "img3" in reopened


def test_feature_cache_opened_before_another_process_built_it_computes_nothing_again(tiny_model, images, tmp_path):
    # accelerate's other processes open the cache, then build after the main process wrote its shards.
    items = [(f"img{i}", (lambda im=im: im)) for i, im in enumerate(images)]
    opened_early = FeatureCache(tiny_model.vision, tmp_path)
    FeatureCache(tiny_model.vision, tmp_path).build(items, show_progress=False)
    calls = []
    opened_early.build([(key, lambda: calls.append(1)) for key, _ in items], show_progress=False)
    assert calls == [] and all(key in opened_early for key, _ in items)
    assert len(list(tmp_path.glob("*/shard-*.json"))) == 1


def test_collator_skips_and_counts_unreadable_images(tiny_model, tmp_path):
    from vlm.data.sources import Example
    from vlm.images import load_image

    (tmp_path / "bad.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    messages = [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "yes"}]
    examples = [
        Example(str(p), (lambda p=p: load_image(p)), messages) for p in (tmp_path / "bad.png", tmp_path / "good.png")
    ]
    dataset = ConversationDataset(examples, tiny_model.processor, max_length=128)
    collator = Collator(tiny_model.processor, cache=None)
    batch = collator([dataset[0], dataset[1]])
    collator([dataset[0]])  # the same bad record in a later epoch counts once
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
    assert collator.skipped == {"missing or unreadable image": 1}


def test_length_grouped_batches_cover_each_index_once_and_shard_and_resume():
    class Lengths:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def length(self, i):
            return (i * 7919) % 101

    data = Lengths(103)
    full = list(LengthGroupedBatchSampler(data, 4, seed=1))
    assert sorted(i for b in full for i in b) == list(range(103))
    assert full == list(LengthGroupedBatchSampler(data, 4, seed=1))
    other_epoch = LengthGroupedBatchSampler(data, 4, seed=1)
    other_epoch.set_position(1)
    assert list(other_epoch) != full
    # Within a batch lengths are close: batches are cut from length-sorted runs.
    spread = sum(max(map(data.length, b)) - min(map(data.length, b)) for b in full) / len(full)
    assert spread < 15
    ranks = [LengthGroupedBatchSampler(data, 4, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(list(ranks[0])) == len(list(ranks[1])) == len(ranks[0])
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    resumed = LengthGroupedBatchSampler(data, 4, seed=1)
    resumed.set_position(0, skip_batches=5)
    assert list(resumed) == full[5:]
