"""Frozen-part outputs computed once and kept on disk, reused across epochs, stages and runs.

What is stored is what the trainable part first reads: the frozen tower's features after the
projector's parameter-free token compression (with `compress: pool`, 64 pooled tokens instead of
ViT-L/336's 577). A cached image's features never change, so computing them once turns every later
epoch into LM-only work; under data.augment each view of an image is an image of its own, cached
under a key naming the augmentation settings and the view (vlm/data/augment.py).

Layout under `<root>/<digest of the identity>/`:
  identity.txt               what the features are (tower, weights, layer, preprocessing, compression, dtype)
  shard-RANK-ID.npy          features [rows, tokens, dim]: float16, or bfloat16 bits as uint16
  shard-RANK-ID.json        the shard's keys and the keys whose image failed to open

A build writes a shard every `shard_bytes`, so its memory does not grow with the dataset, and a
killed build keeps every finished shard: the next build starts where it stopped. The key list is
written last and a shard without one is never read, so no reader sees half a shard. Under several
processes each rank encodes its own share of the missing images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlm.config import ConfigError
from vlm.files import cache_dir
from vlm.images import ImageError

SHARD_BYTES = 512 * 2**20  # a kill loses at most this much encoding work (~450 ViT-L/336 images, a second on a GPU)
FREE_SPACE_MARGIN = 2 * 2**30  # leave room for checkpoints and logs beside the cache


@dataclass(frozen=True)
class FeatureSpec:
    """What one cached item is: its identity (the cache folder's name) and its array shape and dtype."""

    identity: str
    tokens: int
    dim: int
    dtype: torch.dtype  # float16 or bfloat16

    @property
    def item_bytes(self) -> int:
        return self.tokens * self.dim * 2


class FeatureCache:
    def __init__(self, spec: FeatureSpec, root: str | Path | None = None, shard_bytes: int = SHARD_BYTES):
        if spec.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the feature cache stores float16 or bfloat16, not {spec.dtype}")
        self.spec = spec
        self.shard_bytes = shard_bytes
        digest = hashlib.sha256(spec.identity.encode()).hexdigest()[:16]
        self.dir = Path(root or cache_dir() / "features") / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "identity.txt").write_text(spec.identity)
        self._index: dict[str, tuple[int, int]] = {}  # key -> (shard number, row)
        self._shard_names: list[str] = []
        self._arrays: dict[int, np.ndarray] = {}  # opened lazily, per process (memory maps survive a fork)
        self.failed: set[str] = set()
        self.refresh()

    # ---- reading ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Index the shards written since the last look, by this process or another."""
        known = set(self._shard_names)
        for keys_file in sorted(self.dir.glob("shard-*.json")):
            if keys_file.name in known:
                continue
            entry = json.loads(keys_file.read_text())
            number = len(self._shard_names)
            self._shard_names.append(keys_file.name)
            self.failed.update(entry["failed"])
            for row, key in enumerate(entry["keys"]):
                self._index[key] = (number, row)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def locate(self, keys: Sequence[str]) -> np.ndarray:
        """[len(keys), 2] int64 (shard, row) per key, -1 where it is not cached: compact enough to hand
        every DataLoader worker without copying a Python object per example."""
        found = np.full((len(keys), 2), -1, dtype=np.int64)
        for i, key in enumerate(keys):
            where = self._index.get(key)
            if where is not None:
                found[i] = where
        return found

    def read(self, locations: np.ndarray) -> torch.Tensor:
        """Features [len(locations), tokens, dim] for (shard, row) pairs from `locate`, one read per shard."""
        out = np.empty((len(locations), self.spec.tokens, self.spec.dim), dtype=np.uint16)
        for shard in np.unique(locations[:, 0]):
            picked = np.flatnonzero(locations[:, 0] == shard)
            out[picked] = self._array(int(shard))[locations[picked, 1]]
        return torch.from_numpy(out).view(self.spec.dtype)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        locations = self.locate(keys)
        missing = [k for k, (shard, _) in zip(keys, locations, strict=True) if shard < 0]
        if missing:
            raise KeyError(f"not in the feature cache: {missing[:3]}")
        return self.read(locations)

    def _array(self, shard: int) -> np.ndarray:
        if shard not in self._arrays:
            npy = (self.dir / self._shard_names[shard]).with_suffix(".npy")
            self._arrays[shard] = np.load(npy, mmap_mode="r")
        return self._arrays[shard]

    # ---- building --------------------------------------------------------------------------

    def missing(self, keys: Sequence[str]) -> list[str]:
        """Keys with neither features nor a recorded failure, each once, in a fixed order."""
        return sorted({k for k in keys if k not in self._index and k not in self.failed})

    def size_report(self, keys: Sequence[str], max_gb: float = 0.0) -> tuple[int, str, str | None]:
        """(bytes still to write, a line saying so, a reason it would not fit or None)."""
        todo = len(self.missing(keys))
        need = todo * self.spec.item_bytes
        have = len(self._index) * self.spec.item_bytes
        free = shutil.disk_usage(self.dir).free
        line = (f"feature cache {self.dir}: {todo:,} images to encode, {need / 1e9:.1f} GB to write "
                f"({have / 1e9:.1f} GB already cached), {free / 1e9:.1f} GB free")
        problem = None
        if need + FREE_SPACE_MARGIN > free:
            problem = f"it needs {need / 1e9:.1f} GB and the disk has {free / 1e9:.1f} GB free"
        elif max_gb and have + need > max_gb * 1e9:
            problem = f"it would hold {(have + need) / 1e9:.1f} GB, over data.cache_max_gb={max_gb:g}"
        return need, line, problem

    def build(self, items: Sequence[tuple[str, Callable]], encode: Callable[[torch.Tensor], torch.Tensor],
              preprocess: Callable, *, device: torch.device | str = "cpu", batch_size: int = 64,
              num_workers: int = 0, rank: int = 0, world_size: int = 1, show_progress: bool = True) -> None:
        """Encode this rank's share of the (key, load_image) items not cached yet.

        Images are opened and preprocessed in `num_workers` DataLoader processes while `encode` runs
        on `device`; features go to disk a shard at a time. Unreadable images are recorded as failed.
        """
        self.refresh()  # another process may have written some of them meanwhile
        loaders = dict(items)
        # A rank's share is a function of the key alone, not of what each rank happened to see cached
        # when it started, so the shares never overlap and never leave a gap.
        todo = [k for k in self.missing(list(loaders)) if zlib.crc32(k.encode()) % world_size == rank]
        if not todo:
            return
        loader = DataLoader(_Images([(k, loaders[k]) for k in todo], preprocess), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=_stack_readable,
                            pin_memory=torch.device(device).type == "cuda")
        writer = _ShardWriter(self, rank)
        with tqdm(total=len(todo), desc="caching image features", unit="img", disable=not show_progress) as bar:
            for keys, pixels, failed in loader:
                if keys:
                    features = encode(pixels.to(device, non_blocking=True))
                    writer.add(keys, features)
                writer.fail(failed)
                bar.update(len(keys) + len(failed))
        writer.close()

    def _add_shard(self, name: str, keys: list[str], failed: list[str]) -> None:
        number = len(self._shard_names)
        self._shard_names.append(f"{name}.json")
        for row, key in enumerate(keys):
            self._index[key] = (number, row)
        self.failed.update(failed)


class _ShardWriter:
    """Fills a preallocated shard in memory and writes it when full: memory stays one shard's worth."""

    def __init__(self, cache: FeatureCache, rank: int):
        self.cache = cache
        self.rank = rank
        self.rows = max(1, cache.shard_bytes // cache.spec.item_bytes)
        self.buffer = np.empty((self.rows, cache.spec.tokens, cache.spec.dim), dtype=np.uint16)
        self.keys: list[str] = []
        self.failed: list[str] = []

    def add(self, keys: list[str], features: torch.Tensor) -> None:
        bits = features.to(self.cache.spec.dtype).view(torch.uint16).cpu().numpy()
        start = 0
        while start < len(keys):
            take = min(self.rows - len(self.keys), len(keys) - start)
            self.buffer[len(self.keys): len(self.keys) + take] = bits[start: start + take]
            self.keys += keys[start: start + take]
            start += take
            if len(self.keys) == self.rows:
                self.flush()

    def fail(self, keys: list[str]) -> None:
        self.failed += keys

    def close(self) -> None:
        if self.keys or self.failed:
            self.flush()

    def flush(self) -> None:
        directory = self.cache.dir
        # Unique across processes and builds: a later stage, or a resumed run, never overwrites a shard.
        name = f"shard-{self.rank:03d}-{uuid.uuid4().hex}"
        tmp = directory / f".{name}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, self.buffer[: len(self.keys)])
        os.replace(tmp, directory / f"{name}.npy")
        # The key list makes the shard visible, so it goes last.
        tmp = directory / f".{name}.json.tmp"
        tmp.write_text(json.dumps({"keys": self.keys, "failed": self.failed}))
        os.replace(tmp, directory / f"{name}.json")
        self.cache._add_shard(name, self.keys, self.failed)
        self.keys, self.failed = [], []


class _Images(Dataset):
    def __init__(self, items: list[tuple[str, Callable]], preprocess: Callable):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        key, load = self.items[index]
        try:
            return key, self.preprocess([load()])[0]
        except ImageError:
            return key, None


def _stack_readable(batch):
    readable = [(key, pixels) for key, pixels in batch if pixels is not None]
    failed = [key for key, pixels in batch if pixels is None]
    pixels = torch.stack([p for _, p in readable]) if readable else None
    return [key for key, _ in readable], pixels, failed


def ensure_fits(cache: FeatureCache, keys: Sequence[str], max_gb: float, announce=print) -> None:
    """Print what the build will write and stop, with the ways out, if it would not fit."""
    _, line, problem = cache.size_report(keys, max_gb)
    announce(line)
    if problem:
        raise ConfigError(
            f"the feature cache would not fit: {problem}. Ways out: data.cache=off (encode images every step), "
            "data.cache_dir=<a disk with room>, model.projector.compress=pool (fewer tokens to store), "
            "or data.cache_max_gb=<a larger limit>"
        )



def feature_spec(model) -> FeatureSpec:
    """What `model.image_features` produces: the cache's identity covers the tower (weights, layer,
    preprocessing), the token compression, and the dtype the tower computes in."""
    tower_dtype = next(model.vision.tower.parameters()).dtype
    dtype = torch.bfloat16 if tower_dtype == torch.bfloat16 else torch.float16
    p = model.projector.config
    compression = {"none": "none", "pool": f"pool{p.num_tokens}", "pixel_shuffle": f"shuffle{p.factor}"}[p.compress]
    identity = f"{model.vision.identity}|{compression}|{str(tower_dtype).removeprefix('torch.')}"
    return FeatureSpec(identity, model.projector.num_tokens, model.projector.in_dim, dtype)
