"""Feature-cache build speed and memory: images/s of `FeatureCache.build` on real JPEG files against the
tower alone on pre-decoded tensors, and the build's peak memory at several dataset sizes.

    python -m benchmarks.scale_setup --out runs/scale --images 100000 --tokenizer DIR
    python -m benchmarks.cache_build --preset runs/scale/llava-scale.yaml --images 10000 100000 \\
        --override model.projector.compress=pool model.projector.num_tokens=64

The build opens and preprocesses images in DataLoader workers (data.num_workers, default sized from
the machine) while the tower runs in bf16 on the GPU, and writes a shard at a time. Memory is the
peak over the process and its workers, sampled every half second (RSS, and PSS, which counts pages
shared between them once). Each size builds into a fresh cache folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import describe_device, print_table, synchronize
from benchmarks.train_end_to_end import Sampler


def tower_alone(model, pixels: torch.Tensor, device: str, batches: int) -> float:
    """Images/s of model.image_features on tensors already on the GPU (no decoding, no copying)."""
    for _ in range(3):
        model.image_features(pixels)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        model.image_features(pixels)
    synchronize(device)
    return batches * len(pixels) / (time.perf_counter() - start)


def main(argv=None) -> None:
    import os

    from vlm.config import load_config
    from vlm.data.batches import default_workers
    from vlm.data.feature_cache import FeatureCache, feature_spec
    from vlm.data.sources import load_examples
    from vlm.model import VisionLanguageModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--images", type=int, nargs="+", default=[10_000])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    config = load_config(args.preset, args.override)
    model = VisionLanguageModel.from_config(config.model).to(args.device)
    if args.device.startswith("cuda"):
        model.vision.to(torch.bfloat16)  # as the trainer does under bf16 mixed precision
    records = load_examples(config.data.align, "align")

    workers = config.data.num_workers if config.data.num_workers is not None else default_workers(args.device)
    pixels = model.vision.preprocess([records[i].load() for i in range(args.batch)]).to(args.device)
    alone = tower_alone(model, pixels, args.device, batches=20)
    print(describe_device(args.device), flush=True)
    print(f"{workers} loader workers, batch {args.batch}, {feature_spec(model).tokens} tokens x "
          f"{feature_spec(model).dim} stored per image; tower alone {alone:.0f} images/s", flush=True)
    rows = []
    for n in args.images:
        Path(config.data.cache_dir or tempfile.gettempdir()).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=config.data.cache_dir) as root:
            cache = FeatureCache(feature_spec(model), root)
            sampler = Sampler(os.getpid(), period=0.5)
            sampler.start()
            start = time.perf_counter()
            items = [(e.key, e.load) for e in (records[i] for i in range(min(n, len(records))))]  # as the trainer
            cache.build(items, model.image_features, model.vision.preprocess,
                        device=args.device, batch_size=args.batch, num_workers=workers, show_progress=False)
            synchronize(args.device)
            seconds = time.perf_counter() - start
            sampler.stop.set()
            sampler.join()
            built = len(cache)
        rows.append({"images": n, "cached": built, "build s": seconds, "build images/s": n / seconds,
                     "tower alone images/s": alone, "build / tower": n / seconds / alone,
                     "peak RSS GiB": max(s["rss"] for s in sampler.samples) / 2**30,
                     "peak PSS GiB": max(s["pss"] for s in sampler.samples) / 2**30,
                     "peak private GiB": max(s["uss"] for s in sampler.samples) / 2**30})
        print(rows[-1], flush=True)
    print()
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
