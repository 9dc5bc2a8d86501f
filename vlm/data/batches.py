"""Examples -> padded training batches: chat template, expanded image tokens, assistant-only labels.

Every example is encoded once, before training, in parallel processes, into flat token arrays:
later epochs and DataLoader workers only slice them. Batches draw image features from the feature
cache when there is one, else load and preprocess the images (in the DataLoader's workers).
A record whose image is missing or unreadable, or whose answer does not fit max_length, is
dropped from its batch and reported in the batch's "skipped" list, never a crash.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import multiprocessing
import os
import random
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vlm.config import AugmentConfig, StageConfig
from vlm.data.augment import view_key, view_loader
from vlm.data.feature_cache import FeatureCache
from vlm.data.sources import Records
from vlm.images import ImageError
from vlm.processor import IGNORE_INDEX, Encoded, PromptError, VLMProcessor

MISSING_IMAGE = "missing or unreadable image"
REASONS = ("", "image tokens past max_length", "no answer tokens within max_length")
# Below this many examples, starting processes costs more than encoding in this one.
PARALLEL_FROM = 2000


class TokenizedExamples:
    """`records[indices]` encoded once: ids and labels in flat int32 arrays, a reason code where an
    example cannot train (REASONS), exact lengths for batching by length."""

    def __init__(self, records: Records, indices, processor: VLMProcessor, max_length: int,
                 processes: int | None = None):
        self.records = records
        self.indices = np.asarray(indices, dtype=np.int64)
        processes = processes or _usable_cpus()
        chunks = np.array_split(self.indices, max(1, min(len(self.indices) // 500, processes * 8)))
        if processes > 1 and len(self.indices) >= PARALLEL_FROM:
            # fork: the workers inherit the tokenizer and the records instead of pickling them.
            context = multiprocessing.get_context("fork")
            with context.Pool(processes, initializer=_set_job, initargs=(records, processor, max_length)) as pool:
                parts = pool.map(_encode_chunk, chunks)
        else:
            _set_job(records, processor, max_length)
            parts = [_encode_chunk(chunk) for chunk in chunks]
        lengths = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        self.ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
        self.labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
        self.reasons = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int8)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def encoded(self, i: int) -> Encoded:
        span = slice(self.offsets[i], self.offsets[i + 1])
        return Encoded(self.ids[span].tolist(), self.labels[span].tolist())


_JOB: tuple = ()


def _set_job(records: Records, processor: VLMProcessor, max_length: int) -> None:
    global _JOB
    _JOB = (records, processor, max_length)


def _encode_chunk(indices: np.ndarray):
    records, processor, max_length = _JOB
    ids, labels, lengths, reasons = [], [], [], []
    for index in indices:
        reason = 0
        try:
            encoded = processor.encode(records[int(index)].messages, max_length=max_length)
            if all(label == IGNORE_INDEX for label in encoded.labels):
                reason, encoded = 2, Encoded([], [])
        except PromptError:
            reason, encoded = 1, Encoded([], [])
        ids += encoded.input_ids
        labels += encoded.labels
        lengths.append(len(encoded.input_ids))
        reasons.append(reason)
    return (np.array(ids, np.int32), np.array(labels, np.int32), np.array(lengths, np.int64),
            np.array(reasons, np.int8))


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(device, processes: int = 1) -> int:
    """DataLoader workers where none are asked for: on a GPU up to 8 per process, from the CPUs the
    process may use; on a CPU none, since the cores that would decode images are the ones computing."""
    if torch.device(device).type != "cuda":
        return 0
    return max(0, min(8, _usable_cpus() // processes - 1))


class ConversationDataset(Dataset):
    """Items for the Collator: encoded tokens, and where the image comes from (cache row or file).

    Under `augment` an item is asked for as (index, view), as LengthGroupedBatchSampler gives it, and
    brings that view of its image; without, as a plain index, with the image as it is.
    """

    def __init__(self, examples: TokenizedExamples, cache: FeatureCache | None = None,
                 augment: AugmentConfig | None = None):
        self.examples = examples
        self.cache = cache
        self.augment = augment
        keys = [examples.records.key(int(i)) for i in examples.indices]
        # (shard, row) per example (and view) in plain arrays: workers read them without touching Python objects.
        self.locations = None
        if cache and augment:
            self.locations = np.stack([cache.locate([view_key(k, augment, v) for k in keys])
                                       for v in range(augment.views)], axis=1)
        elif cache:
            self.locations = cache.locate(keys)

    def __len__(self) -> int:
        return len(self.examples)

    def length(self, index: int) -> int:
        return self.examples.length(index)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        index, view = index if self.augment else (index, None)
        reason = REASONS[self.examples.reasons[index]]
        item = {"index": index, "reason": reason or None, "encoded": None, "image": None, "location": None}
        if reason:
            return item
        item["encoded"] = self.examples.encoded(index)
        record = int(self.examples.indices[index])
        key = self.examples.records.key(record)
        if key:  # has an image
            if self.locations is not None:
                item["location"] = self.locations[index] if view is None else self.locations[index, view]
            elif view is None:
                item["image"] = self.examples.records[record].load
            else:
                item["image"] = view_loader(self.examples.records[record].load, key, self.augment, view)
        return item


class Collator:
    """Pads a batch, or packs it into `pack` = (rows, length) rows (PackedBatchSampler's batches); reads its
    cached features in one go per shard, or opens and preprocesses its images.

    Runs in the DataLoader's workers, so what it skips travels back in the batch ("skipped": a list
    of (reason, index)) for the main process to count, with the number of examples it holds ("examples").
    """

    def __init__(self, processor: VLMProcessor, cache: FeatureCache | None, pad_to_multiple_of: int | None = None,
                 pack: tuple[int, int] | None = None):
        self.processor = processor
        self.cache = cache
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack = pack

    def __call__(self, items: list[dict]) -> dict:
        kept, images, locations, skipped = [], [], [], []
        for item in items:
            if item["encoded"] is None:
                skipped.append((item["reason"], item["index"]))
                continue
            if item["location"] is not None:
                if item["location"][0] < 0:  # the cache build found the image unreadable
                    skipped.append((MISSING_IMAGE, item["index"]))
                    continue
                locations.append(item["location"])
            elif item["image"] is not None:
                try:
                    images.append(item["image"]())
                except ImageError:
                    skipped.append((MISSING_IMAGE, item["index"]))
                    continue
            kept.append(item["encoded"])
        if not kept:
            return {"skipped": skipped}
        if self.pack:
            batch = self.processor.pack(kept, *self.pack)
        else:
            batch = self.processor.pad(kept, pad_to_multiple_of=self.pad_to_multiple_of)
            del batch["attention_mask"]  # right padding: causal attention never lets a token see the pads after it
        batch.update(self.processor.training_positions(batch))
        if locations:
            batch["image_features"] = self.cache.read(np.stack(locations))
        elif images:
            batch["pixel_values"] = self.processor.image_transform(images)
        batch["skipped"] = skipped
        batch["examples"] = len(kept)
        return batch


class SkipCounter:
    """Records skipped, by reason, each counted once however many epochs meet it."""

    def __init__(self):
        self._seen: dict[str, set[int]] = defaultdict(set)

    def add(self, skipped: list[tuple[str, int]]) -> None:
        for reason, index in skipped:
            self._seen[reason].add(index)

    def counts(self) -> dict[str, int]:
        return {reason: len(indices) for reason, indices in self._seen.items()}


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar length (less padding), fixed by seed and epoch, sharded by rank.

    The order is a pure function of (seed, epoch), and `set_position` starts an epoch part-way,
    so a resumed run sees exactly the batches the interrupted one had left. Sharding here, not
    in accelerate's dataloader wrapper, keeps that position under our control on every process.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, megabatch: int = 50,
                 views: int = 0):
        self.dataset, self.batch_size, self.seed, self.megabatch = dataset, batch_size, seed, megabatch
        self.rank, self.world_size = rank, world_size
        self.views = views  # > 0: each index comes as (index, view), epoch e reading view e mod views
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        """Batches per process in a whole epoch (every process gets the same number)."""
        return -(-len(self.dataset) // self.batch_size) // self.world_size

    def __iter__(self):
        batches = self.batches(self.epoch)
        mine = batches[self.rank: len(self) * self.world_size: self.world_size][self.skip:]
        if self.views:
            mine = [[(i, self.epoch % self.views) for i in batch] for batch in mine]
        return iter(mine)

    def batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of the epoch, before sharding."""
        rng, order = self._shuffled(epoch)
        span = self.batch_size * self.megabatch
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start: start + span], key=self.dataset.length, reverse=True)
            batches += [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def _shuffled(self, epoch: int) -> tuple[random.Random, list[int]]:
        """The epoch's RNG, and the dataset's indices in the order it shuffles them first."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.dataset)))
        rng.shuffle(order)
        return rng, order


class PackedBatchSampler(LengthGroupedBatchSampler):
    """Batches of `batch_size` rows of `length` tokens, each row as many whole examples as fit; shuffled,
    fixed by seed and epoch, sharded and resumed as LengthGroupedBatchSampler's.

    A batch lists its examples row by row. The Collator lays them out in that order, starting a row
    wherever the next does not fit, which never takes more rows than listed: each listed row fits a
    fresh one. The rows are packed best-fit, longest first, from pools of POOL shuffled examples.
    """

    POOL = 10_000  # examples: enough for rows ~full, few enough for a fast Python packer

    def __init__(self, dataset, batch_size: int, length: int, seed: int, rank: int = 0, world_size: int = 1,
                 views: int = 0):
        super().__init__(dataset, batch_size, seed, rank, world_size, views=views)
        self.length = length
        self._cached: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Batches per process in the current epoch (every process gets the same number)."""
        return len(self.batches(self.epoch)) // self.world_size

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            rng, order = self._shuffled(epoch)
            rows = []
            for start in range(0, len(order), self.POOL):
                rows += pack_rows(order[start: start + self.POOL], self.dataset.length, self.length)
            rng.shuffle(rows)
            batches = [sum(rows[i: i + self.batch_size], []) for i in range(0, len(rows), self.batch_size)]
            self._cached = (epoch, batches)
        return self._cached[1]


def pack_rows(indices: list[int], length_of, length: int) -> list[list[int]]:
    """`indices` in rows of at most `length` tokens: best fit, longest first (each into the fullest row
    it fits, else a new row). Ties keep their order, so the rows are a pure function of `indices`."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for index in sorted(indices, key=length_of, reverse=True):
        n = length_of(index)
        if n > length:
            raise ValueError(f"example {index} has {n} tokens, more than a row's {length}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            left, row = free.pop(at)
        else:
            left, row = length, len(rows)
            rows.append([])
        rows[row].append(index)
        bisect.insort(free, (left - n, row))
    return rows


def split_holdout(records: Records, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and validation records; whole images are held out, so no validation image
    was seen in training (a text-only record is its own group)."""
    groups = [records.key(i) or f"text:{i}" for i in range(len(records))]
    keys = sorted(set(groups))
    random.Random(seed).shuffle(keys)
    held = set(keys[: int(len(keys) * fraction)])
    is_held = np.array([g in held for g in groups], dtype=bool)
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def cache_items(records: Records, train_indices, val_indices, augment: AugmentConfig | None
                ) -> dict[str, Callable[[], Image.Image]]:
    """What a stage reads from the feature cache, cache key -> image loader: the held-out images as they
    are, and the training images as they are or, under `augment`, as their first `augment.views` views."""
    items = {}
    for index in map(int, val_indices):
        key = records.key(index)
        if key:
            items.setdefault(key, functools.partial(_record_image, records, index))
    for index in map(int, train_indices):
        key = records.key(index)
        if not key:
            continue
        load = functools.partial(_record_image, records, index)  # the record is parsed only when its image opens
        if augment is None:
            items.setdefault(key, load)
        else:
            for view in range(augment.views):
                items.setdefault(view_key(key, augment, view), view_loader(load, key, augment, view))
    return items


def _record_image(records: Records, index: int) -> Image.Image:
    return records[index].load()


def stage_augment(augment: AugmentConfig, stage: StageConfig, batches_per_epoch: int) -> AugmentConfig | None:
    """A stage's augmentation: data.augment with its views cut to the epochs the stage starts, since
    epoch e reads view e mod views and a stage of fewer epochs never reads the rest; None when off."""
    if not augment.views:
        return None
    epochs = math.ceil(optimizer_steps(stage, batches_per_epoch) / _steps_per_epoch(stage, batches_per_epoch))
    return dataclasses.replace(augment, views=min(augment.views, epochs))


def optimizer_steps(stage: StageConfig, batches_per_epoch: int) -> int:
    """A stage's optimizer steps: train.<stage>.max_steps, or its epochs of batches taken grad_accum at a time."""
    return stage.max_steps or math.ceil(stage.epochs * _steps_per_epoch(stage, batches_per_epoch))


def _steps_per_epoch(stage: StageConfig, batches_per_epoch: int) -> int:
    return max(1, math.ceil(batches_per_epoch / stage.grad_accum))
