"""Which `data.augment` settings carry colour and shape to pictures drawn another way, measured on a CPU.

    python -m benchmarks.augment_probe --augment views=4 original=true color=0 --augment views=4 ... [--epochs 4]

A GPU run of the easy-VQA preset takes minutes of a scarce machine per setting; this probe takes minutes of a
CPU. The tower is frozen, so what a projector can learn from a setting is bounded by what its features hold:
the probe trains a small head on the tower's tokens (LayerNorm, linear, GELU as the preset's projector starts,
then mean-pooled, then a linear read-out of the shape and colour) for --epochs epochs, epoch e on view e mod K
of every easy-VQA training picture, and names the colour and shape of easy-VQA's test pictures and of the
drawn set (benchmarks/render_shapes.py, seed 1: not the seed-0 set the README scores). The probe is weaker
than the model, so read its figures against each other, not as the model's. Of the settings also trained on
the GPU it ranks no views below `views=4 original=true color=0` (66.5% and 69.7% drawn colour), as the GPU did
(87.3% and 94.0% of the drawn set's questions, README), and its commonest errors (brown called red, blue
yellow) are the model's.

Features of each view are kept under --cache (about 400 MB a view), so settings that share views reuse them.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.render_shapes import TEXTURE, render, rng_for, scene
from vlm.config import ConfigError, VisionConfig, load_config
from vlm.data.augment import CONTENT_THRESHOLD, augmented, distance_from_background, identity
from vlm.data.easy_vqa import COLORS, SHAPES, describe, easy_vqa_questions
from vlm.vision import build_vision_encoder

DRAWN_SEED = 1  # not the README's seed-0 set: settings chosen here are scored there on pictures never probed


def easy_vqa_pictures(split: str) -> tuple[list[str], torch.Tensor]:
    """Paths of the split's pictures with a known shape and colour, and (colour, shape) labels."""
    records = easy_vqa_questions(split)
    captions = describe(records)
    paths = {r["image_id"]: r["image"] for r in records}
    labelled = sorted(captions)
    words = [captions[i].rstrip(".").split()[1:] for i in labelled]  # "A blue rectangle." -> [blue, rectangle]
    return [paths[i] for i in labelled], torch.tensor([(COLORS.index(c), SHAPES.index(s)) for c, s in words])


class Features:
    """The tower's tokens for a list of pictures, computed once and kept on disk under a name."""

    def __init__(self, vision, cache: Path):
        self.vision, self.cache = vision, cache
        cache.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, count: int, pictures) -> torch.Tensor:
        path = self.cache / f"{name}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        parts = []
        for start in range(0, count, 64):
            images = pictures(range(start, min(count, start + 64)))
            with torch.no_grad():
                parts.append(self.vision(self.vision.preprocess(images)).to(torch.bfloat16))
        features = torch.cat(parts)
        torch.save(features, path)
        return features


def content_share(image: Image.Image) -> float:
    """The share of the picture's pixels that differ from its border's colour as augment.py tells content."""
    _, distance = distance_from_background(np.asarray(image.convert("RGB")))
    return float((distance > CONTENT_THRESHOLD).mean())


def viewed(paths: list[str], config, view: int, indices) -> list[Image.Image]:
    return [augmented(Image.open(paths[i]), paths[i], config, view) for i in indices]


def train_and_score(views: list[torch.Tensor], labels: torch.Tensor, held_out: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    width = views[0].shape[-1]
    head = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 256), torch.nn.GELU())
    read_out = torch.nn.Linear(256, len(COLORS) + len(SHAPES))
    optimizer = torch.optim.AdamW([*head.parameters(), *read_out.parameters()], lr=1e-3)

    def logits(features):
        return read_out(head(features.float()).mean(1))

    for features in views:  # one epoch each
        for batch in torch.randperm(len(features)).split(64):
            out, target = logits(features[batch]), labels[batch]
            loss = (torch.nn.functional.cross_entropy(out[:, :len(COLORS)], target[:, 0])
                    + torch.nn.functional.cross_entropy(out[:, len(COLORS):], target[:, 1]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    scores = {}
    with torch.no_grad():
        for name, (features, truth) in held_out.items():
            out = logits(features)
            colour, shape = out[:, :len(COLORS)].argmax(1), out[:, len(COLORS):].argmax(1)
            wrong = colour != truth[:, 0]
            scores[name] = {
                "colour": 100 * (~wrong).float().mean().item(),
                "shape": 100 * (shape == truth[:, 1]).float().mean().item(),
                "errors": Counter(f"{COLORS[t]}->{COLORS[p]}" for t, p in zip(truth[wrong, 0].tolist(),
                                                                               colour[wrong].tolist(), strict=True)),
            }
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--augment", nargs="+", action="append", default=[], metavar="key=value",
                        help="data.augment settings of one row; repeat for more rows (none: one row without views)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--drawn", type=int, default=1000, help="drawn pictures scored")
    parser.add_argument("--image-size", type=int, default=0,
                        help="the tower's input size, as model.vision.image_size (0: its own, 224 px)")
    parser.add_argument("--last-block-features", action="store_true",
                        help="the tower's tokens as model.vision.last_block_features=true gives them")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "vlm" / "augment-probe"))
    args = parser.parse_args(argv)
    rows = args.augment or [[]]
    # Every row's settings and the tower's size are checked before minutes of features; a row starts from the
    # defaults, not a preset's.
    try:
        configs = [load_config(None, [f"data.augment.{setting}" for setting in row]).data.augment
                   for row in rows]
        vision_config = VisionConfig(backend="efficientnet", name="efficientnet-lite0", image_size=args.image_size,
                                     last_block_features=args.last_block_features)
    except ConfigError as e:
        raise SystemExit(f"augment_probe: {e}") from None

    vision = build_vision_encoder(vision_config).eval()
    features = Features(vision, Path(args.cache) / vision.identity)
    train_paths, train_labels = easy_vqa_pictures("train")
    test_paths, test_labels = easy_vqa_pictures("test")
    drawn = [scene(DRAWN_SEED, i) for i in range(args.drawn)]
    held_out = {
        "easy-VQA test": (features("test", len(test_paths), lambda ix: [Image.open(test_paths[i]) for i in ix]),
                          test_labels),
        "drawn (seed 1)": (features(f"drawn-{DRAWN_SEED}-{args.drawn}", args.drawn,
                                    lambda ix: [render(drawn[i], rng_for(DRAWN_SEED, i, TEXTURE)) for i in ix]),
                           torch.tensor([(COLORS.index(p.color), SHAPES.index(p.shape)) for p in drawn])),
    }

    def originals(ix):
        return [Image.open(train_paths[i]) for i in ix]

    shares = {"easy-VQA train": [content_share(Image.open(p)) for p in train_paths[:1000]],
              "drawn (seed 1)": [content_share(render(p, rng_for(DRAWN_SEED, i, TEXTURE)))
                                 for i, p in enumerate(drawn[:1000])]}
    print("share of the picture the shape covers, median of 1,000:",
          ", ".join(f"{name} {100 * np.median(share):.1f}%" for name, share in shares.items()))

    for row, config in zip(rows, configs, strict=True):
        start = time.perf_counter()
        views = []
        for epoch in range(args.epochs):
            view = epoch % config.views if config.views else None
            if view is None or (config.original and view == 0):
                views.append(features("train", len(train_paths), originals))
            else:
                views.append(features(f"train-{identity(config)}-{view}", len(train_paths),
                                      functools.partial(viewed, train_paths, config, view)))
        scores = train_and_score(views, train_labels, held_out)
        print(f"{' '.join(row) or 'no views'} ({time.perf_counter() - start:.0f} s)")
        for name, score in scores.items():
            errors = ", ".join(f"{k} {n}" for k, n in score["errors"].most_common(4))
            print(f"  {name:15} colour {score['colour']:5.1f}%  shape {score['shape']:5.1f}%  commonest: {errors}")


if __name__ == "__main__":
    main()
