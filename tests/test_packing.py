"""Packed rows (train.<stage>.packing=on): several whole examples per row, position ids restarting at each,
attention that never crosses from one to another, and labels and losses what they are unpacked."""

from __future__ import annotations

import random

import pytest
import torch

from vlm.data.batches import PackedBatchSampler, pack_rows
from vlm.processor import IGNORE_INDEX, Encoded

CONVERSATIONS = [
    ([{"role": "user", "content": "<image>\nwhat shape is in the image?"}, {"role": "assistant", "content": "circle"}],
     True),
    ([{"role": "user", "content": "what is the capital of france?"}, {"role": "assistant", "content": "paris"}], False),
    ([{"role": "user", "content": "<image>\nwhat is the color of the shape?"}, {"role": "assistant", "content": "red"},
      {"role": "user", "content": "is it a triangle?"}, {"role": "assistant", "content": "no"}], True),
    ([{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "blue, or green"}], False),
]


def encoded(model) -> tuple[list[Encoded], list[bool]]:
    return [model.processor.encode(c) for c, _ in CONVERSATIONS], [has for _, has in CONVERSATIONS]


def pixels(model, images, has_image: list[bool]) -> torch.Tensor:
    return model.processor.image_transform([im for im, has in zip(images, has_image, strict=True) if has])


def packed_batch(model, examples: list[Encoded], has_image: list[bool], images, rows: int, length: int) -> dict:
    batch = model.processor.pack(examples, rows, length)
    batch.update(model.processor.training_positions(batch))
    batch["pixel_values"] = pixels(model, images, has_image)
    return batch


def padded_batch(model, examples: list[Encoded], has_image: list[bool], images) -> dict:
    batch = model.processor.pad(examples)
    if any(has_image):
        batch["pixel_values"] = pixels(model, images, has_image)
    return batch


def only(example: int, batch: dict, starts: list[tuple[int, int, int]], model) -> dict:
    """The packed batch with every label but example `example`'s ignored: its loss is that example's."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    row, col, n = starts[example]
    labels[row, col: col + n] = batch["labels"][row, col: col + n]
    out = {**batch, "labels": labels}
    out.update(model.processor.training_positions(out))
    return out


def layout(examples: list[Encoded], length: int) -> list[tuple[int, int, int]]:
    """(row, column, tokens) of each example as VLMProcessor.pack lays them out."""
    starts, row, col = [], 0, 0
    for e in examples:
        if col + len(e.input_ids) > length:
            row, col = row + 1, 0
        starts.append((row, col, len(e.input_ids)))
        col += len(e.input_ids)
    return starts


@pytest.fixture
def setup(tiny_model, images):
    tiny_model.eval()
    examples, has_image = encoded(tiny_model)
    # Two rows, the first of three examples (with and without an image), the second of one, padding after.
    length = sum(len(e.input_ids) for e in examples[:3]) + 5
    return tiny_model, examples, has_image, images, length


def test_pack_restarts_positions_keeps_labels_and_never_splits_an_example(tiny_model):
    examples, _ = encoded(tiny_model)
    length = len(examples[0].input_ids) + len(examples[1].input_ids) + 3
    batch = tiny_model.processor.pack(examples, rows=3, length=length)
    assert batch["input_ids"].shape == (3, length)
    for e, (row, col, n) in zip(examples, layout(examples, length), strict=True):
        assert col + n <= length
        assert batch["input_ids"][row, col: col + n].tolist() == e.input_ids
        assert batch["position_ids"][row, col: col + n].tolist() == list(range(n))
        # Each label as encoded, but the first: never a target unpacked, so never one packed.
        assert batch["labels"][row, col: col + n].tolist() == [IGNORE_INDEX, *e.labels[1:]]
    assert [r for r, _, _ in layout(examples, length)] == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="do not fit in 2 rows"):
        tiny_model.processor.pack(examples, rows=2, length=length)


def test_a_packed_batch_gives_each_example_its_unpacked_loss(setup):
    model, examples, has_image, images, length = setup
    batch = packed_batch(model, examples, has_image, images, rows=2, length=length)
    starts = layout(examples, length)
    assert [r for r, _, _ in starts] == [0, 0, 0, 1]
    with torch.no_grad():
        for i, e in enumerate(examples):
            alone = model(**padded_batch(model, [e], [has_image[i]], images[i:i + 1]))["loss"]
            torch.testing.assert_close(model(**only(i, batch, starts, model))["loss"], alone, rtol=1e-5, atol=1e-6)
        # And the whole batch: the mean over every supervised token, as padded.
        torch.testing.assert_close(model(**batch)["loss"], model(**padded_batch(model, examples, has_image, images))
                                   ["loss"], rtol=1e-5, atol=1e-6)


def test_an_example_never_sees_the_one_before_it_in_its_row(setup):
    model, examples, has_image, images, length = setup
    batch = packed_batch(model, examples, has_image, images, rows=2, length=length)
    starts = layout(examples, length)
    changed = {**batch, "input_ids": batch["input_ids"].clone(), "pixel_values": batch["pixel_values"].clone()}
    row, col, n = starts[0]
    text = changed["input_ids"][row, col: col + n] != model.processor.image_token_id
    changed["input_ids"][row, col: col + n][text] = 7  # example 0: other text, and another image
    changed["pixel_values"][0] = torch.rand_like(changed["pixel_values"][0])
    with torch.no_grad():
        for later in (1, 2):  # the text-only and the image example after it, in the same row
            torch.testing.assert_close(model(**only(later, changed, starts, model))["loss"],
                                       model(**only(later, batch, starts, model))["loss"], rtol=0, atol=0)
        assert model(**only(0, changed, starts, model))["loss"] != model(**only(0, batch, starts, model))["loss"]


def test_flex_attention_gives_the_losses_of_the_boolean_mask(setup):
    """flex_attention runs packed rows on a GPU; on this CPU its forward (compiled by transformers) still runs."""
    model, examples, has_image, images, length = setup
    batch = packed_batch(model, examples, has_image, images, rows=2, length=length)
    starts = layout(examples, length)
    losses = {}
    with torch.no_grad():
        for kind in ("sdpa", "flex"):
            model.packed_attention = kind
            losses[kind] = [model(**only(i, batch, starts, model))["loss"] for i in range(len(examples))]
    torch.testing.assert_close(losses["flex"], losses["sdpa"], rtol=1e-5, atol=1e-6)
    assert model.lm.config._attn_implementation == "sdpa"  # flex only for the packed forward


def test_packed_gradients_are_the_padded_ones(setup):
    model, examples, has_image, images, length = setup
    model.train()
    grads = []
    for batch in (packed_batch(model, examples, has_image, images, rows=2, length=length),
                  padded_batch(model, examples, has_image, images)):
        model.zero_grad()
        model(**batch)["loss"].backward()
        grads.append([p.grad.clone() for p in model.projector.parameters()])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


class Lengths:
    def __init__(self, n, longest):
        self.lengths = [random.Random(i).randint(0, longest) for i in range(n)]

    def __len__(self):
        return len(self.lengths)

    def length(self, i):
        return self.lengths[i]


def test_best_fit_rows_hold_whole_examples_within_the_row_length():
    data = Lengths(500, 90)
    rows = pack_rows(list(range(500)), data.length, 100)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(map(data.length, row)) <= 100 for row in rows)
    assert sum(data.lengths) / (100 * len(rows)) > 0.95  # rows are nearly full
    with pytest.raises(ValueError, match="more than a row's"):
        pack_rows([0], lambda i: 101, 100)


def test_packed_batches_fit_their_rows_cover_each_example_once_and_shard_and_resume(tiny_model):
    data = Lengths(403, 60)
    full = list(PackedBatchSampler(data, 3, 64, seed=1))
    assert sorted(i for b in full for i in b) == list(range(403))
    assert full == list(PackedBatchSampler(data, 3, 64, seed=1))
    for batch in full:  # laid out as the collator does (which drops unusable, empty examples), each fits its rows
        lengths = [data.length(i) for i in batch if data.length(i)]
        tiny_model.processor.pack([Encoded([1] * n, [1] * n) for n in lengths], 3, 64)
    other_epoch = PackedBatchSampler(data, 3, 64, seed=1)
    other_epoch.set_position(1)
    assert list(other_epoch) != full
    ranks = [PackedBatchSampler(data, 3, 64, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(list(ranks[0])) == len(list(ranks[1])) == len(ranks[0]) == len(full) // 2
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    resumed = PackedBatchSampler(data, 3, 64, seed=1)
    resumed.set_position(0, skip_batches=5)
    assert list(resumed) == full[5:]
