"""Frozen-encoder features computed once and kept on disk, reused across epochs, stages and runs.

The encoder is frozen and training applies no image augmentation, so an image's features never
change: computing them once turns every later epoch into LM-only work. Features live in shards
of float16 `.npy` arrays opened as memory maps, so a cache larger than RAM still works, under
a folder named by the encoder's identity (model, weights, layer, preprocessing).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm.files import cache_dir
from vlm.images import ImageError


class FeatureCache:
    def __init__(self, encoder, root: str | Path | None = None):
        self.encoder = encoder
        digest = hashlib.sha256(encoder.identity.encode()).hexdigest()[:16]
        self.dir = Path(root or cache_dir() / "features") / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "encoder.txt").write_text(encoder.identity)
        self._index: dict[str, tuple[np.ndarray, int]] = {}
        self._shards: set[str] = set()
        self.failed: set[str] = set()
        self._load_shards()

    def _load_shards(self) -> None:
        """Index the shards written since the last look, by this process or another."""
        for keys_file in sorted(self.dir.glob("shard-*.json")):
            if keys_file.name in self._shards:
                continue
            self._shards.add(keys_file.name)
            array = np.load(keys_file.with_suffix(".npy"), mmap_mode="r")
            entry = json.loads(keys_file.read_text())
            self.failed.update(entry["failed"])
            for row, key in enumerate(entry["keys"]):
                self._index[key] = (array, row)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def get(self, keys: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._index[k][0][self._index[k][1]] for k in keys]))

    def build(
        self, items: Iterable[tuple[str, Callable]], batch_size: int = 64, device=None, show_progress=True
    ) -> None:
        """Compute features for every (key, load_image) not cached yet; unreadable images are recorded in `failed`."""
        self._load_shards()  # in a multi-process run, the main process has just written them
        todo = {key: load for key, load in items if key not in self._index and key not in self.failed}
        if not todo:
            return
        keys, rows, failed = [], [], []
        batch_keys, batch_images = [], []

        def flush():
            pixels = self.encoder.preprocess(batch_images).to(device or "cpu")
            rows.append(self.encoder(pixels).to(torch.float16).cpu().numpy())
            keys.extend(batch_keys)
            batch_keys.clear()
            batch_images.clear()

        for key, load in tqdm(todo.items(), desc="caching image features", disable=not show_progress):
            try:
                batch_images.append(load())
                batch_keys.append(key)
            except ImageError:
                failed.append(key)
            if len(batch_images) == batch_size:
                flush()
        if batch_images:
            flush()
        self._write_shard(keys, np.concatenate(rows) if rows else None, failed)

    def _write_shard(self, keys: list[str], features: np.ndarray | None, failed: list[str]) -> None:
        name = f"shard-{len(list(self.dir.glob('shard-*.json'))):05d}-{os.getpid()}"
        npy = self.dir / f"{name}.npy"
        if features is None:
            features = np.zeros((0, self.encoder.num_patches, self.encoder.hidden_size), np.float16)
        # Arrays first, then the key list that makes the shard visible: a killed run leaves no half shard.
        with open(self.dir / f".{name}.npy.tmp", "wb") as f:
            np.save(f, features)
        os.replace(self.dir / f".{name}.npy.tmp", npy)
        tmp = self.dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps({"keys": keys, "failed": failed}))
        os.replace(tmp, self.dir / f"{name}.json")
        self._shards.add(f"{name}.json")
        array = np.load(npy, mmap_mode="r")
        for row, key in enumerate(keys):
            self._index[key] = (array, row)
        self.failed.update(failed)
