import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from vlm.config import ConfigError, DataSource
from vlm.data import batches
from vlm.data.batches import Collator, ConversationDataset, LengthGroupedBatchSampler, SkipCounter, TokenizedExamples
from vlm.data.feature_cache import FeatureCache, feature_spec
from vlm.data.sources import FileImages, Records, load_examples
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
    # A model trained to answer the question alone (model.lm.short_answer_prompt="") is asked it alone.
    assert load_examples(source, "instruct", "")[0].messages[0]["content"] == "<image>\nWhat colour?"
    assert examples[0].load().getpixel((0, 0)) == (255, 0, 0)
    assert examples[0].key != examples[1].key


def test_hf_source_names_a_missing_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"q": ["x"]}).to_json(str(tmp_path / "d.jsonl"))
    source = DataSource(kind="hf", path=str(tmp_path / "d.jsonl"), columns={"image": "picture", "caption": "q"})
    with pytest.raises(ConfigError, match="picture"):
        load_examples(source, "align")


def _cache(model, root, **kwargs):
    return FeatureCache(feature_spec(model), root, **kwargs)


def _build(cache, model, items, **kwargs):
    cache.build(items, model.image_features, model.vision.preprocess, show_progress=False, **kwargs)


def _items(images):
    return [(f"img{i}", (lambda im=im: im)) for i, im in enumerate(images)]


def test_feature_cache_stores_the_frozen_part_output_and_reuses_it(tiny_model, images, tmp_path):
    cache = _cache(tiny_model, tmp_path)
    _build(cache, tiny_model, _items(images), batch_size=3)
    expected = tiny_model.image_features(tiny_model.vision.preprocess(images))
    torch.testing.assert_close(cache.get(["img2", "img0"]).float(), expected[[2, 0]], atol=2e-3, rtol=2e-3)

    reopened = _cache(tiny_model, tmp_path)
    calls = []
    _build(reopened, tiny_model, [(key, lambda: calls.append(1)) for key, _ in _items(images)])
    assert calls == [] and "img3" in reopened


def test_feature_cache_stores_pooled_tokens_when_pooling_has_no_parameters(tiny_model_config, images, tmp_path):
    import dataclasses

    from vlm.config import ProjectorConfig
    from vlm.model import VisionLanguageModel

    config = dataclasses.replace(tiny_model_config, projector=ProjectorConfig(compress="pool", num_tokens=4))
    model = VisionLanguageModel.from_config(config)
    cache = _cache(model, tmp_path)
    _build(cache, model, _items(images))
    assert cache.get(["img0"]).shape == (1, 4, model.vision.hidden_size)  # 16 patches pooled to 4
    pixels = model.vision.preprocess(images[:1])
    # The projector reads the cached (pooled) features exactly as it reads pixels.
    torch.testing.assert_close(model.image_embeddings(image_features=cache.get(["img0"])),
                               model.image_embeddings(pixel_values=pixels), atol=2e-3, rtol=2e-3)
    assert cache.dir != _cache(VisionLanguageModel.from_config(tiny_model_config), tmp_path).dir


def test_feature_cache_opened_before_another_process_built_it_computes_nothing_again(tiny_model, images, tmp_path):
    # accelerate's other processes open the cache, then build after the main process wrote its shards.
    opened_early = _cache(tiny_model, tmp_path)
    _build(_cache(tiny_model, tmp_path), tiny_model, _items(images))
    calls = []
    _build(opened_early, tiny_model, [(key, lambda: calls.append(1)) for key, _ in _items(images)])
    assert calls == [] and all(key in opened_early for key, _ in _items(images))
    assert len(list(tmp_path.glob("*/shard-*.json"))) == 1


def _many_images(n):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    return [Image.fromarray(torch.randint(0, 255, (12, 12, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def test_a_build_writes_shards_as_it_goes_and_a_killed_one_resumes_without_recomputing(tiny_model, tmp_path):
    images = _many_images(23)
    items = _items(images)
    one_item = feature_spec(tiny_model).item_bytes
    encoded = []

    def dies_on_the_fourth_batch(pixels):
        if len(encoded) == 3:
            raise KeyboardInterrupt  # what a kill leaves: whatever was not written yet is gone
        encoded.append(len(pixels))
        return tiny_model.image_features(pixels)

    cache = _cache(tiny_model, tmp_path, shard_bytes=5 * one_item)  # 5 images a shard
    with pytest.raises(KeyboardInterrupt):
        cache.build(items, dies_on_the_fourth_batch, tiny_model.vision.preprocess, batch_size=4, show_progress=False)
    # 12 images were encoded; two full shards (10 images) reached the disk, the rest was in memory.
    shards = sorted(tmp_path.glob("*/shard-*.json"))
    assert len(shards) == 2 and not list(tmp_path.glob("*/.*.tmp"))
    for keys_file in shards:  # no half shard: every visible shard's array holds exactly its keys
        rows = np.load(keys_file.with_suffix(".npy"), mmap_mode="r").shape[0]
        assert rows == len(json.loads(keys_file.read_text())["keys"]) == 5

    resumed = _cache(tiny_model, tmp_path, shard_bytes=5 * one_item)
    seen = []

    def counting(pixels):
        seen.append(len(pixels))
        return tiny_model.image_features(pixels)

    resumed.build(items, counting, tiny_model.vision.preprocess, batch_size=4, show_progress=False)
    assert sum(seen) == 23 - 10  # nothing encoded twice
    stored = [k for f in tmp_path.glob("*/shard-*.json") for k in json.loads(f.read_text())["keys"]]
    assert sorted(stored) == sorted(key for key, _ in items)  # none missing, none twice
    expected = tiny_model.image_features(tiny_model.vision.preprocess(images))
    torch.testing.assert_close(_cache(tiny_model, tmp_path).get([k for k, _ in items]).float(), expected,
                               atol=2e-3, rtol=2e-3)


def test_each_rank_encodes_its_own_share(tiny_model, tmp_path):
    images = _many_images(9)
    opened = {0: [], 1: []}
    for rank in (0, 1):
        items = [
            (f"img{i}", (lambda im=im, i=i, rank=rank: opened[rank].append(i) or im)) for i, im in enumerate(images)
        ]
        _cache(tiny_model, tmp_path).build(items, tiny_model.image_features, tiny_model.vision.preprocess, rank=rank,
                                           world_size=2, show_progress=False)
    assert sorted(opened[0] + opened[1]) == list(range(9)) and opened[0] and opened[1]
    assert len(_cache(tiny_model, tmp_path)) == 9


def test_a_build_decoding_in_worker_processes_gives_the_same_features(tiny_model, tmp_path):
    images = _many_images(6)
    a, b = _cache(tiny_model, tmp_path / "a"), _cache(tiny_model, tmp_path / "b")
    _build(a, tiny_model, _items(images), batch_size=4)
    _build(b, tiny_model, _items(images), batch_size=4, num_workers=2)
    keys = [k for k, _ in _items(images)]
    assert torch.equal(a.get(keys), b.get(keys))


def test_a_cache_that_would_not_fit_stops_naming_the_ways_out(tiny_model, tmp_path):
    from vlm.data.feature_cache import ensure_fits

    cache = _cache(tiny_model, tmp_path)
    keys = [f"img{i}" for i in range(1000)]
    with pytest.raises(ConfigError, match=r"data.cache_max_gb=1e-06.*data.cache=off.*data.cache_dir"):
        ensure_fits(cache, keys, max_gb=1e-6, announce=lambda line: None)
    lines = []
    ensure_fits(cache, keys, max_gb=0, announce=lines.append)
    assert "1,000 images to encode" in lines[0]


def test_collator_skips_and_counts_unreadable_images(tiny_model, tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    messages = [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "yes"}]
    records = Records([(str(tmp_path / n), n, messages) for n in ("bad.png", "good.png")], FileImages(tmp_path))
    dataset = ConversationDataset(TokenizedExamples(records, [0, 1], tiny_model.processor, max_length=128))
    collator = Collator(tiny_model.processor, cache=None)
    counter = SkipCounter()
    batch = collator([dataset[0], dataset[1]])
    counter.add(batch.pop("skipped"))
    counter.add(collator([dataset[0]])["skipped"])  # the same bad record in a later epoch counts once
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
    assert counter.counts() == {"missing or unreadable image": 1}


def test_cached_batches_read_the_features_of_their_own_images(tiny_model, images, tmp_path):
    messages = [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "yes"}]
    records = Records([(f"img{i}", i, messages) for i in range(len(images))], images.__getitem__)
    cache = _cache(tiny_model, tmp_path)
    _build(cache, tiny_model, [(e.key, e.load) for e in records])
    dataset = ConversationDataset(TokenizedExamples(records, [3, 1], tiny_model.processor, max_length=128), cache)
    batch = Collator(tiny_model.processor, cache)([dataset[0], dataset[1]])
    torch.testing.assert_close(batch["image_features"], cache.get(["img3", "img1"]))


def test_encoding_in_worker_processes_matches_encoding_here(tiny_model, monkeypatch):
    monkeypatch.setattr(batches, "PARALLEL_FROM", 1)  # a pool for 40 records, which would otherwise encode here
    messages = [[{"role": "user", "content": f"<image>\nquestion {i}?"}, {"role": "assistant", "content": "a" * i}]
                for i in range(40)]
    records = Records([(f"k{i}", None, m) for i, m in enumerate(messages)])
    here = TokenizedExamples(records, range(40), tiny_model.processor, max_length=128, processes=1)
    pooled = TokenizedExamples(records, range(40), tiny_model.processor, max_length=128, processes=2)
    for i in range(40):
        assert pooled.encoded(i) == here.encoded(i) == tiny_model.processor.encode(messages[i], max_length=128)


def test_records_round_trip_and_count_what_they_could_not_use(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    good = {"image": "a.png", "conversations": turns}
    bad = [5, {"id": 1}, {"conversations": [{"from": "human", "value": None}]},
           {"image": 5, "conversations": good["conversations"]},
           {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                                 {"from": "gpt", "value": "x"}]},
           {"image": "a.png", "conversations": [{"from": ["human"], "value": "q"}, turns[1]]},
           {"image": "a.png", "conversations": [turns[1], turns[0]]},
           {"conversations": [{"from": "human", "value": "<ima<image>ge>"}, turns[1]]}]
    (tmp_path / "d.json").write_text(json.dumps([good] + bad))
    records = load_examples(DataSource(kind="llava", path=str(tmp_path / "d.json"), image_root=str(tmp_path)),
                            "instruct")
    assert len(records) == 1 and sum(records.skipped.values()) == len(bad)
    assert records[0].messages[0]["content"] == "<image>\nq" and records[0].load().size == (8, 8)


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


# ---- data.augment ---------------------------------------------------------------------------------

RED = (220, 30, 30)


def _shapes(n):
    """easy-VQA-like pictures: one red triangle or rectangle on white, somewhere in a 48 px frame."""
    from PIL import ImageDraw

    pictures = []
    for i in range(n):
        image = Image.new("RGB", (48, 48), "white")
        x, y = 6 + 5 * i % 20, 10 + 3 * i % 16
        if i % 2:
            ImageDraw.Draw(image).polygon([(x, y + 20), (x + 22, y + 20), (x + 8, y)], fill=RED)
        else:
            ImageDraw.Draw(image).rectangle([x, y, x + 24, y + 12], fill=RED)
        pictures.append(image)
    return pictures


def _augment(**settings):
    from vlm.config import AugmentConfig

    return AugmentConfig(**{"views": 3, **settings})


def test_views_differ_keep_the_shape_whole_and_red_and_are_drawn_again_the_same(tmp_path):
    from vlm.data.augment import augmented

    config = _augment()
    for key, image in zip("abcdef", _shapes(6), strict=True):
        views = [np.asarray(augmented(image, key, config, v), np.int16) for v in range(4)]
        original = np.asarray(image, np.int16)
        for i, view in enumerate(views):
            assert view.shape == original.shape and np.abs(view - original).mean() > 3
            assert all(np.abs(view - other).mean() > 3 for other in views[i + 1:])
            red = (view[..., 0] - view[..., 1] > 100) & (view[..., 0] - view[..., 2] > 100)
            # The whole shape is in the frame: no shape pixel on its edge, and about as many as before.
            assert not (red[0].any() or red[-1].any() or red[:, 0].any() or red[:, -1].any())
            before = (np.abs(original - RED).max(axis=-1) < 40).sum()
            assert 0.3 * before < red.sum() < 2.5 * before
            # Its colour is still the one named: no channel moves far from it.
            assert np.abs(np.median(view[red], axis=0) - RED).max() < 40
        assert np.array_equal(views[1], np.asarray(augmented(image, key, config, 1)))


def test_background_repaints_only_the_background_and_leaves_a_photo_as_it_is():
    from vlm.data.augment import augmented, flat_shape

    still = dict(rotate=0.0, flip=False, scale=0.0, aspect=0.0, shift=0.0, color=0.0, blur=0.0, noise=0.0)
    picture = _shapes(1)[0]
    shape = np.abs(np.asarray(picture, np.int16) - RED).max(axis=-1) < 12
    assert np.array_equal(np.asarray(augmented(picture, "a", _augment(**still), 1)), np.asarray(picture))
    spreads = []
    for key in "abcdef":
        view = np.asarray(augmented(picture, key, _augment(background=0.2, **still), 1), np.int16)
        inside = shape & ~(np.roll(shape, 1, 0) ^ shape) & ~(np.roll(shape, 1, 1) ^ shape)  # not on its edge
        assert np.abs(view[inside] - RED).max() <= 1  # the shape keeps its colour exactly
        far = ~shape & (np.abs(view - RED).max(axis=-1) > 100)  # background, away from the shape
        assert np.abs(view[far] - 255).max() <= 0.2 * 255 + 1  # moved by at most `background` of the range
        spreads.append(view[far].std(axis=0).max())
    assert np.median(spreads) > 3  # the background varies across the picture, not one flat tint
    assert len({round(float(s), 3) for s in spreads}) == len(spreads)  # each view its own

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    assert flat_shape(np.asarray(photo, np.float64)) is None
    assert np.array_equal(np.asarray(augmented(photo, "a", _augment(background=0.2, **still), 1)),
                          np.asarray(augmented(photo, "a", _augment(**still), 1)))


def test_with_original_on_view_0_is_the_picture_itself_and_the_others_still_change_it():
    from vlm.data.augment import augmented, view_key

    image = _shapes(1)[0]
    config = _augment(original=True)
    views = [np.asarray(augmented(image, "a", config, v), np.int16) for v in range(3)]
    assert np.array_equal(views[0], np.asarray(image, np.int16))
    assert all(np.abs(view - views[0]).mean() > 3 for view in views[1:])
    assert view_key("a", config, 0) != view_key("a", _augment(), 0)  # cached apart from the run without it


def test_upscale_redraws_a_flat_shape_larger_with_sharp_edges_and_enlarges_anything_else_as_it_is():
    from vlm.data.augment import augmented

    still = dict(rotate=0.0, flip=False, scale=0.0, aspect=0.0, shift=0.0, color=0.0, blur=0.0, noise=0.0)
    config = _augment(upscale=4.0, **still)
    sharp = _shapes(1)[0]
    picture = sharp.filter(ImageFilter.GaussianBlur(1.5))  # soft edges, as easy-VQA's look at 224 px
    drawn_share = (np.abs(np.asarray(sharp, np.int16) - RED).max(axis=-1) < 12).mean()

    def blended(view):  # pixels that are neither the background nor the shape's colour
        near = lambda colour: np.abs(view - colour).max(axis=-1) < 12  # noqa: E731
        return ~near((255, 255, 255)) & ~near(RED)

    sizes = set()
    for key in "abcdef":
        view = augmented(picture, key, config, 1)
        sizes.add(view.width)
        assert view.width == view.height >= picture.width
        soft = np.asarray(picture.resize(view.size, Image.Resampling.BICUBIC), np.int16)
        redrawn = np.asarray(view, np.int16)
        red = np.abs(redrawn - RED).max(axis=-1) < 12
        # The shape as it was drawn before the blur, in its colour: its share of the frame barely moves...
        assert abs(red.mean() - drawn_share) < 0.015
        # ...but its edge is one antialiased pixel wide at the new size, not the enlarged blur.
        if view.width >= 2 * picture.width:
            assert blended(redrawn).sum() < 0.5 * blended(soft).sum()
    assert len(sizes) > 3  # each view its own size, from 1 to 4 times the picture's

    # A redrawn picture holds only blends of two colours (at most 17); a photo keeps its own.
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    view = np.asarray(augmented(photo, "a", config, 1)).reshape(-1, 3)
    assert len(np.unique(view, axis=0)) > 200
    assert augmented(picture, "a", _augment(**still), 1).size == picture.size  # upscale 1: the picture's size


def test_augmented_views_are_cached_once_under_keys_naming_the_settings(tiny_model, tmp_path):
    from vlm.data.augment import view_key
    from vlm.data.batches import cache_items

    pictures = _shapes(5)
    messages = [{"role": "user", "content": "<image>\nwhat shape?"}, {"role": "assistant", "content": "triangle"}]
    records = Records([(f"img{i}", i, messages) for i in range(5)], pictures.__getitem__)
    train, val = np.arange(4), np.array([4])
    encoded = []

    def build(augment):
        def encode(pixels):
            encoded.append(len(pixels))
            return tiny_model.image_features(pixels)

        cache = _cache(tiny_model, tmp_path)
        cache.build(list(cache_items(records, train, val, augment).items()), encode, tiny_model.vision.preprocess,
                    show_progress=False)
        return cache

    augment = _augment()
    cache = build(augment)
    assert sum(encoded) == 4 * 3 + 1  # three views of each training image, the held-out image as it is
    assert "img4" in cache and "img0" not in cache
    views = cache.get([view_key("img0", augment, v) for v in range(3)]).float()
    original = tiny_model.image_features(tiny_model.vision.preprocess(pictures[:1]))
    for i in range(3):
        assert not torch.allclose(views[i], original[0], atol=1e-2)
        assert all(not torch.allclose(views[i], views[j], atol=1e-2) for j in range(i + 1, 3))

    encoded.clear()
    build(augment)
    assert encoded == []  # every view reused
    build(_augment(views=4))
    assert sum(encoded) == 4  # view 2 of four is view 2 of three: only the fourth views are new
    encoded.clear()
    build(_augment(rotate=30.0))
    assert sum(encoded) == 4 * 3  # other settings draw other views, under other keys
    assert view_key("img0", _augment(rotate=30.0), 0) != view_key("img0", augment, 0)


def test_each_epoch_reads_another_view_with_the_same_tokens_and_validation_reads_the_original(tiny_model, tmp_path):
    from vlm.data.batches import cache_items
    from vlm.processor import IGNORE_INDEX

    pictures = _shapes(6)
    messages = [{"role": "user", "content": "<image>\nwhat shape?"}, {"role": "assistant", "content": "rectangle"}]
    records = Records([(f"img{i}", i, messages) for i in range(6)], pictures.__getitem__)
    train, val = np.arange(5), np.array([5])
    augment = _augment()
    cache = _cache(tiny_model, tmp_path)
    _build(cache, tiny_model, list(cache_items(records, train, val, augment).items()))
    collator = Collator(tiny_model.processor, cache)
    plain = ConversationDataset(TokenizedExamples(records, train, tiny_model.processor, max_length=128))
    viewed = ConversationDataset(plain.examples, cache, augment)
    uncached = ConversationDataset(plain.examples, None, augment)
    sampler = LengthGroupedBatchSampler(viewed, 5, seed=0, views=augment.views)

    def epoch(e, dataset):
        sampler.set_position(e)
        (batch,) = list(sampler)
        assert [view for _, view in batch] == [e % 3] * 5
        return collator([dataset[item] for item in sorted(batch)])

    batches = [epoch(e, viewed) for e in range(4)]
    unaugmented = collator([plain[i] for i in range(5)])
    originals = tiny_model.image_features(unaugmented["pixel_values"])
    for batch in batches:
        assert torch.equal(batch["input_ids"], unaugmented["input_ids"])
        assert torch.equal(batch["labels"], unaugmented["labels"])
        assert not torch.allclose(batch["image_features"].float(), originals, atol=1e-2)
    answers = unaugmented["labels"][unaugmented["labels"] != IGNORE_INDEX]
    assert "rectangle" in tiny_model.processor.tokenizer.decode(answers)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(batches[a]["image_features"], batches[b]["image_features"])
    assert torch.equal(batches[3]["image_features"], batches[0]["image_features"])  # three views, then again
    # Without the cache the same view is drawn on the fly.
    pixels = epoch(1, uncached)["pixel_values"]
    torch.testing.assert_close(tiny_model.image_features(pixels).to(torch.float16), batches[1]["image_features"],
                               atol=2e-3, rtol=2e-3)
    validation = ConversationDataset(TokenizedExamples(records, val, tiny_model.processor, max_length=128), cache)
    torch.testing.assert_close(collator([validation[0]])["image_features"].float(),
                               tiny_model.image_features(tiny_model.vision.preprocess(pictures[5:])),
                               atol=2e-3, rtol=2e-3)


def test_a_stage_caches_only_the_views_its_epochs_read():
    from vlm.config import StageConfig
    from vlm.data.batches import stage_augment

    augment = _augment(views=4)
    assert stage_augment(_augment(views=0), StageConfig(epochs=3), 10) is None
    assert stage_augment(augment, StageConfig(epochs=2), 10).views == 2
    assert stage_augment(augment, StageConfig(epochs=1.5), 10).views == 2
    assert stage_augment(augment, StageConfig(epochs=9), 10).views == 4
    assert stage_augment(augment, StageConfig(max_steps=21, grad_accum=2), 10).views == 4  # 5 steps an epoch
    assert stage_augment(augment, StageConfig(max_steps=11, grad_accum=2), 10).views == 3


# ---- any JSON a LLaVA file can hold ---------------------------------------------------------------

# Markers, one that is left when the marker inside it is removed, control tokens, a lone surrogate
# (a truncated emoji escape), NUL, the processor's own stand-in characters.
_PIECES = ["<image>", "<ima<image>ge>", "\n", " ", "", "<|im_end|>", "\ud83d", "\x00", "\ue0000\ue001", "what?", "yes"]
_text = st.text(max_size=8) | st.lists(st.sampled_from(_PIECES), max_size=4).map("".join)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


def _mostly(usual, unusual):
    """`usual` seven times in eight: records of random JSON alone would seldom get past the first check."""
    return st.sampled_from([usual] * 7 + [unusual]).flatmap(lambda strategy: strategy)


_value = _mostly(_text, _json)
_role = st.sampled_from(["human", "gpt", "user", "assistant", "system", "bot", ""]) | _json
_exchange = st.tuples(*(st.fixed_dictionaries({"from": st.just(r), "value": _value}) for r in ("human", "gpt")))
_any_turn = st.fixed_dictionaries({}, optional={"from": _role, "value": _value}) | _json
_conversation = _mostly(st.lists(_exchange, min_size=1, max_size=3).map(lambda pairs: [t for p in pairs for t in p]),
                        st.lists(_any_turn, max_size=5) | _json)
_image = _mostly(st.sampled_from([None, "a.png", "missing.png"]),
                 st.sampled_from(["", ".", "/", "a.png\x00", "\ud800.png", "../a.png"]) | _json)
_fields = {"image": _image, "conversations": _conversation}
_record = _mostly(st.fixed_dictionaries(_fields, optional={"id": _json}),
                  st.fixed_dictionaries({}, optional=_fields) | _json)


@pytest.fixture(scope="module")
def processor(tiny_model_config):
    from vlm.model import VisionLanguageModel

    return VisionLanguageModel.from_config(tiny_model_config).processor


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("any_json")
    Image.new("RGB", (8, 8)).save(root / "a.png")
    return root


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=_mostly(st.lists(_record, max_size=6), _json))
def test_any_llava_json_becomes_examples_or_counted_skips(processor, image_root, data):
    from vlm.data.batches import REASONS
    from vlm.processor import IGNORE_INDEX

    path = image_root / "data.json"
    path.write_text(json.dumps(data))
    source = DataSource(kind="llava", path=str(path), image_root=str(image_root))
    if not isinstance(data, list):
        with pytest.raises(ConfigError, match="a list of records"):
            load_examples(source, "instruct")
        return
    records = load_examples(source, "instruct")
    assert len(records) + sum(records.skipped.values()) == len(data)
    assert all(reason and count > 0 for reason, count in records.skipped.items())
    max_length = 48  # below some records' image tokens' end, so that reason is met too
    encoded = TokenizedExamples(records, range(len(records)), processor, max_length=max_length)
    assert len(encoded) == len(records)
    image_tokens = processor.num_image_tokens
    for i, reason in enumerate(encoded.reasons):
        example, tokens = records[i], encoded.encoded(i)
        assert 0 <= reason < len(REASONS)
        if reason:
            assert tokens.input_ids == []
            continue
        assert 0 < len(tokens.input_ids) <= max_length
        assert any(label != IGNORE_INDEX for label in tokens.labels)
        # One image's tokens for a record with an image, none for a text-only one: never a stray slot.
        assert tokens.input_ids.count(processor.image_token_id) == (image_tokens if example.load else 0)
