"""Examples -> padded training batches: chat template, expanded image tokens, assistant-only labels.

Batches draw images from the feature cache when there is one, else load and preprocess them.
A record whose image is missing or unreadable, or whose answer does not fit max_length, is
dropped from its batch and counted in `skipped`, never a crash.
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch
from torch.utils.data import Dataset, Sampler

from vlm.data.feature_cache import FeatureCache
from vlm.data.sources import Example
from vlm.images import ImageError
from vlm.processor import IGNORE_INDEX, PromptError, VLMProcessor

MISSING_IMAGE = "missing or unreadable image"


class ConversationDataset(Dataset):
    def __init__(self, examples: list[Example], processor: VLMProcessor, max_length: int):
        self.examples = examples
        self.processor = processor
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        item = {"index": index, "example": self.examples[index], "encoded": None, "reason": None}
        try:
            item["encoded"] = self.processor.encode(item["example"].messages, max_length=self.max_length)
        except PromptError:
            item["reason"] = "image tokens past max_length"
            return item
        if all(label == IGNORE_INDEX for label in item["encoded"].labels):
            item["encoded"], item["reason"] = None, "no answer tokens within max_length"
        return item

    def length(self, index: int) -> int:
        """Cheap length proxy for grouping: characters, not tokens, so no tokenising up front."""
        return sum(len(m["content"]) for m in self.examples[index].messages)


class Collator:
    def __init__(self, processor: VLMProcessor, cache: FeatureCache | None, pad_to_multiple_of: int | None = None):
        self.processor = processor
        self.cache = cache
        self.pad_to_multiple_of = pad_to_multiple_of
        self._skipped: dict[str, set[int]] = defaultdict(set)

    @property
    def skipped(self) -> dict[str, int]:
        """Records skipped, by reason; each counted once however many epochs meet it."""
        return {reason: len(indices) for reason, indices in self._skipped.items()}

    def __call__(self, items: list[dict]) -> dict:
        kept, images = [], []
        for item in items:
            if item["encoded"] is None:
                self._skipped[item["reason"]].add(item["index"])
                continue
            example = item["example"]
            if example.load is not None:
                try:
                    images.append(self.cache.get([example.key])[0] if self.cache else example.load())
                except (ImageError, KeyError):
                    self._skipped[MISSING_IMAGE].add(item["index"])
                    continue
            kept.append(item["encoded"])
        if not kept:
            return {}
        batch = self.processor.pad(kept, pad_to_multiple_of=self.pad_to_multiple_of)
        if images and self.cache:
            batch["image_features"] = torch.stack(images)
        elif images:
            batch["pixel_values"] = self.processor.image_transform(images)
        return batch


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar length (less padding), fixed by seed and epoch, sharded by rank.

    The order is a pure function of (seed, epoch), and `set_position` starts an epoch part-way,
    so a resumed run sees exactly the batches the interrupted one had left. Sharding here, not
    in accelerate's dataloader wrapper, keeps that position under our control on every process.
    """

    def __init__(self, dataset: ConversationDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 megabatch: int = 50):
        self.dataset, self.batch_size, self.seed, self.megabatch = dataset, batch_size, seed, megabatch
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        """Batches per process in a whole epoch (every process gets the same number)."""
        return -(-len(self.dataset) // self.batch_size) // self.world_size

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.dataset)))
        rng.shuffle(order)
        span = self.batch_size * self.megabatch
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start: start + span], key=self.dataset.length, reverse=True)
            batches += [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        mine = batches[self.rank: len(self) * self.world_size: self.world_size]
        return iter(mine[self.skip:])
