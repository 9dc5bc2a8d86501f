"""easy-VQA's questions about shapes drawn another way: a held-out check that answers hold beyond
easy-VQA's own pictures.

    python -m benchmarks.render_shapes --out DIR [--images 1000] [--seed 0] [--overwrite]
    vlm eval --benchmark vqav2 --data DIR --limit 0
    python -m benchmarks.render_shapes --examples vlm/examples   # the demo's drawn examples

A checkpoint that scores 99.75% on easy-VQA's test split fell to ~85% on shapes drawn another way,
so this renderer (PIL + numpy, none of easy-VQA's code) keeps easy-VQA's concepts and question
wording and changes everything that leaves every answer true: one circle, rectangle or triangle in
one of the 8 colours, rotated by any angle, of any size and position, rectangles of aspect 1-3,
triangles of any proportions with no angle under 30 degrees, the colour's shade slightly jittered
around the RGB easy-VQA draws that colour in, on a pale plain, gradient or noise-textured background, antialiased (drawn
at 4x and box-filtered down), sometimes slightly blurred, at 64-256 px, often not square.

Outputs under --out, laid out like a VQAv2 image folder (`datasets` imagefolder, split
"validation") so `vlm eval --benchmark vqav2 --data DIR` scores it with VQA accuracy:
  validation/NNNNN.png        one picture per image index
  validation/metadata.jsonl   4 questions per picture, one per kind (open shape, open colour,
                              shape yes/no, colour yes/no), in easy-VQA's exact templates, each with
                              VQAv2's 10 human answers, all the true one
  manifest.json               seed, counts per question kind and answer, the render settings

Shapes, colours, templates, yes/no answers and negations are balanced by permuting them within
small blocks of image indices; everything else comes from an RNG seeded with (seed, index,
purpose), so the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlm.data.easy_vqa import COLORS, SHAPES

VERSION = 2  # 1 drew its own darker palette (see CANONICAL_RGB)
SPLIT = "validation"  # the split `vlm eval --benchmark vqav2` reads by default

# What the 8 names mean to a model trained on easy-VQA: the CSS colours its pictures are drawn in, read off
# its images (every "green" shape there is (0, 255, 0), every "brown" one (165, 42, 42)). Version 1 drew a
# darker palette of its own, whose red lay nearer easy-VQA's brown than its red and whose green nearer
# easy-VQA's teal than its green, so a model naming easy-VQA's colours exactly had to miss those; the held-out
# set tests new drawing, not new meanings of the names. Pairwise >= 107 apart in RGB; a shade stays within 35
# of its colour, so the nearest of the 8 to any shape pixel is still the named one.
CANONICAL_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}
SHADE_JITTER = 14  # one brightness shift for all channels: gray stays neutral, never teal or black
TINT_JITTER = 6  # per channel, on top
# Backgrounds: every channel stays >= 210, so no background reads as gray, yellow or any shape colour.
BACKGROUNDS = ("plain", "gradient", "noise")
PALE_TINT = 28  # a background tint is 255 minus up to this much per channel
NOISE_AMPLITUDE = 10
SIZE_RANGE = (64, 256)  # the longer side, px
NON_SQUARE = 0.5  # share of pictures whose shorter side is 60-95% of the longer
AREA_RANGE = (0.08, 0.30)  # shape area / shorter side squared, before shrinking to fit
ASPECT_RANGE = (1.0, 3.0)  # rectangle long side / short side
MIN_TRIANGLE_ANGLE = 30.0  # degrees: no sliver triangles
BLUR_SHARE, BLUR_RADIUS = 0.35, (0.4, 1.1)
SUPERSAMPLE = 4

# easy-VQA's question wording, per kind; "{color}" or "{shape}" is filled in. Negated yes/no forms
# come second in each yes/no kind.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("what shape is in the image?", "what shape does the image contain?", "what shape is present?",
              "what is the {color} shape?"),
    "color": ("what color is the shape?", "what is the color of the shape?", "what color is the {shape}?",
              "what is the color of the {shape}?"),
    "shape_yes_no": ("is there a {shape}?", "is there a {shape} in the image?", "does the image contain a {shape}?",
                     "is a {shape} present?", "is there not a {shape}?", "is there not a {shape} in the image?",
                     "does the image not contain a {shape}?", "is no {shape} present?"),
    "color_yes_no": ("is there a {color} shape?", "is there a {color} shape in the image?",
                     "does the image contain a {color} shape?", "is a {color} shape present?",
                     "is there not a {color} shape?", "is there not a {color} shape in the image?",
                     "does the image not contain a {color} shape?", "is no {color} shape present?"),
}
WORDINGS = 4  # per kind, and per polarity of a yes/no kind

# RNG purposes: each random draw and each balanced factor has its own stream, so changing one
# never changes the others.
GEOMETRY, TEXTURE, OTHER_WORD, EXAMPLE = range(4)
SHAPE_SLOT, COLOR_SLOT = 4, 5
WORDING_SLOT = {"shape": 6, "color": 7, "shape_yes_no": 8, "color_yes_no": 9}
YES_NO_SLOT = {"shape_yes_no": 10, "color_yes_no": 11}


@dataclass(frozen=True)
class Scene:
    """What one picture shows, in output pixel coordinates (x right, y down)."""

    width: int
    height: int
    shape: str
    color: str
    rgb: tuple[int, int, int]  # the drawn shade of `color`
    points: tuple[tuple[float, float], ...]  # polygon corners; a circle's one point is its centre
    radius: float  # circles only
    background: str  # one of BACKGROUNDS
    tints: tuple[tuple[int, int, int], tuple[int, int, int]]  # gradient end colours (plain: the first)
    gradient_angle: float  # radians
    blur: float  # Gaussian blur radius in px; 0: none


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


def rng_for(seed: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, purpose])


def balanced(seed: int, index: int, values: int, purpose: int) -> int:
    """One of `values` choices, each taken exactly once by every block of `values` consecutive indices."""
    block = np.random.default_rng([seed, index // values, purpose, values]).permutation(values)
    return int(block[index % values])


# ---------------------------------------------------------------------------------------------
# Geometry: a pure function of (seed, index)
# ---------------------------------------------------------------------------------------------

def image_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    if rng.random() >= NON_SQUARE:
        return long_side, long_side
    short_side = max(SIZE_RANGE[0], round(long_side * rng.uniform(0.6, 0.95)))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def unit_outline(shape: str, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Corners (n, 2) of a polygon of area 1 centred on its centroid, or a circle's (centre, radius)."""
    if shape == "circle":
        return np.zeros((1, 2)), math.sqrt(1 / math.pi)
    if shape == "rectangle":
        aspect = math.exp(rng.uniform(*np.log(ASPECT_RANGE)))
        w, h = math.sqrt(aspect) / 2, 1 / math.sqrt(aspect) / 2
        corners = np.array([(-w, -h), (w, -h), (w, h), (-w, h)])
    else:
        corners = triangle_corners(rng)
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return corners @ rotation.T, 0.0


def triangle_corners(rng: np.random.Generator) -> np.ndarray:
    """A triangle with every angle >= MIN_TRIANGLE_ANGLE, area 1, centroid at the origin."""
    low = MIN_TRIANGLE_ANGLE
    a = rng.uniform(low, 180 - 2 * low)
    b = rng.uniform(low, 180 - low - a)
    c = 180 - a - b
    a, b, c = np.radians([a, b, c])
    side = math.sin(b) / math.sin(c)  # law of sines, with the side between the first two corners 1
    corners = np.array([(0.0, 0.0), (1.0, 0.0), (side * math.cos(a), side * math.sin(a))])
    corners -= corners.mean(axis=0)
    return corners / math.sqrt(0.5 * math.sin(a) * side)


def place(outline: np.ndarray, radius: float, width: int, height: int, rng) -> tuple[np.ndarray, float]:
    """Scale the unit outline to a drawn size and move it somewhere fully inside the picture."""
    short_side = min(width, height)
    scale = math.sqrt(rng.uniform(*AREA_RANGE)) * short_side
    # A few px of margin keep the border pure background (blur included) and the shape whole.
    margin = 0.04 * short_side + 2
    low, high = (outline.min(axis=0) - radius), (outline.max(axis=0) + radius)
    extent = high - low
    scale = min(scale, (width - 2 * margin) / extent[0], (height - 2 * margin) / extent[1])
    free = np.array([width, height]) - 2 * margin - extent * scale
    offset = margin + free * rng.random(2) - low * scale
    return outline * scale + offset, radius * scale


def shade(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    shift = rng.uniform(-SHADE_JITTER, SHADE_JITTER) + rng.uniform(-TINT_JITTER, TINT_JITTER, 3)
    return tuple(int(v) for v in np.clip(np.round(np.array(CANONICAL_RGB[color]) + shift), 0, 255))


def pale_tint(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in 255 - rng.integers(0, PALE_TINT + 1, 3))


def compose(shape: str, color: str, rng: np.random.Generator) -> Scene:
    """A picture of one `color` `shape`, everything else drawn from `rng`."""
    width, height = image_size(rng)
    outline, radius = unit_outline(shape, rng)
    points, radius = place(outline, radius, width, height, rng)
    rgb = shade(color, rng)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    tints = (pale_tint(rng), pale_tint(rng))
    angle = rng.uniform(0, 2 * math.pi)
    blur = rng.uniform(*BLUR_RADIUS) if rng.random() < BLUR_SHARE else 0.0
    return Scene(width, height, shape, color, rgb, tuple((float(x), float(y)) for x, y in points), float(radius),
                 background, tints, float(angle), float(blur))


def scene(seed: int, index: int) -> Scene:
    """What picture `index` shows; its shape and colour are balanced over blocks of indices."""
    shape = SHAPES[balanced(seed, index, len(SHAPES), SHAPE_SLOT)]
    color = COLORS[balanced(seed, index, len(COLORS), COLOR_SLOT)]
    return compose(shape, color, rng_for(seed, index, GEOMETRY))


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------

def coverage(picture: Scene) -> np.ndarray:
    """The fraction of each output pixel the shape covers, (height, width) in [0, 1]."""
    big = Image.new("L", (picture.width * SUPERSAMPLE, picture.height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)

    # PIL puts integer coordinates on pixel centres; output coordinate x spans supersampled
    # pixels whose centres sit at (k + 0.5) / SUPERSAMPLE.
    def big_xy(x: float, y: float) -> tuple[float, float]:
        return x * SUPERSAMPLE - 0.5, y * SUPERSAMPLE - 0.5

    if picture.shape == "circle":
        (cx, cy), r = picture.points[0], picture.radius
        draw.ellipse([big_xy(cx - r, cy - r), big_xy(cx + r, cy + r)], fill=255)
    else:
        draw.polygon([big_xy(x, y) for x, y in picture.points], fill=255)
    return np.asarray(big.reduce(SUPERSAMPLE), dtype=np.float32) / 255


def backdrop(picture: Scene, rng: np.random.Generator) -> np.ndarray:
    """The background, (height, width, 3) floats, every channel in [210, 255]."""
    h, w = picture.height, picture.width
    first, second = (np.array(t, dtype=np.float32) for t in picture.tints)
    if picture.background == "plain":
        return np.broadcast_to(first, (h, w, 3)).copy()
    if picture.background == "gradient":
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        along = xs * math.cos(picture.gradient_angle) + ys * math.sin(picture.gradient_angle)
        t = ((along - along.min()) / max(float(np.ptp(along)), 1.0))[..., None]
        return first * (1 - t) + second * t
    # Noise: blotches at a coarse and a finer scale, mostly in lightness with a faint tint; darkened
    # by the amplitude so that pale tints are not clipped flat at white.
    texture = sum(weight * (blotches(rng, cells, w, h, "L")[..., None] + 0.3 * blotches(rng, cells, w, h, "RGB"))
                  for cells, weight in ((4, 0.6), (16, 0.4)))
    return np.clip(first + NOISE_AMPLITUDE * (texture - 1), 210, 255)


def blotches(rng: np.random.Generator, cells: int, width: int, height: int, mode: str) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a random cells x cells grid, bicubically enlarged."""
    grid = rng.integers(0, 256, (cells, cells) if mode == "L" else (cells, cells, 3), dtype=np.uint8)
    enlarged = Image.fromarray(grid, mode).resize((width, height), Image.BICUBIC)
    return np.asarray(enlarged, dtype=np.float32) / 127.5 - 1


def render(picture: Scene, texture_rng: np.random.Generator) -> Image.Image:
    alpha = coverage(picture)[..., None]
    pixels = backdrop(picture, texture_rng) * (1 - alpha) + np.array(picture.rgb) * alpha
    image = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")
    return image.filter(ImageFilter.GaussianBlur(picture.blur)) if picture.blur else image


def save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", optimize=True)


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------

def questions(picture: Scene, seed: int, index: int) -> list[Question]:
    """One question of each kind, in easy-VQA's wording, answered from the scene."""
    truth = {"shape": picture.shape, "color": picture.color}
    out = []
    for kind in ("shape", "color"):
        template = TEMPLATES[kind][balanced(seed, index, WORDINGS, WORDING_SLOT[kind])]
        out.append(Question(kind, template.format(**truth), truth[kind]))
    rng = rng_for(seed, index, OTHER_WORD)
    for kind, words in (("shape_yes_no", SHAPES), ("color_yes_no", COLORS)):
        slot = kind.split("_")[0]
        # The four (named thing present, negated wording) pairs are balanced, so are "yes" and "no".
        present, negated = divmod(balanced(seed, index, 4, YES_NO_SLOT[kind]), 2)
        named = truth[slot] if present else str(rng.choice([w for w in words if w != truth[slot]]))
        wording = balanced(seed, index, WORDINGS, WORDING_SLOT[kind])
        template = TEMPLATES[kind][wording + WORDINGS * negated]
        out.append(Question(kind, template.format(**{slot: named}), "yes" if present != negated else "no"))
    return out


def vqa_rows(picture: Scene, seed: int, index: int) -> list[dict]:
    """metadata.jsonl lines for picture `index`, in VQAv2's columns."""
    return [{"file_name": image_name(index), "question_id": index * 10 + j, "image_id": index,
             "question": q.text, "question_type": q.kind,
             "answer_type": "yes/no" if q.answer in ("yes", "no") else "other",
             "multiple_choice_answer": q.answer,
             "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}
            for j, q in enumerate(questions(picture, seed, index))]


def image_name(index: int) -> str:
    return f"{index:05d}.png"


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def render_settings() -> dict:
    return {"canonical_rgb": CANONICAL_RGB, "shade_jitter": SHADE_JITTER, "tint_jitter": TINT_JITTER,
            "backgrounds": BACKGROUNDS, "pale_tint": PALE_TINT, "noise_amplitude": NOISE_AMPLITUDE,
            "size_range_px": SIZE_RANGE, "non_square_share": NON_SQUARE, "area_range": AREA_RANGE,
            "rectangle_aspect_range": ASPECT_RANGE, "min_triangle_angle_deg": MIN_TRIANGLE_ANGLE,
            "blur_share": BLUR_SHARE, "blur_radius_px": BLUR_RADIUS, "supersample": SUPERSAMPLE}


def generate(out: Path, images: int = 1000, *, seed: int = 0, overwrite: bool = False) -> dict:
    """Write the pictures, metadata.jsonl and manifest.json under `out`; returns the manifest."""
    folder = out / SPLIT
    existing = [p for p in (folder, out / "manifest.json") if p.exists()]
    if existing and not overwrite:
        raise SystemExit(f"{out} already holds {', '.join(p.name for p in existing)}; pass --overwrite to replace it")
    if folder.exists():  # a larger earlier run's pictures would otherwise be read with this one's
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    kinds, answers, scenes = Counter(), Counter(), Counter()
    with open(folder / "metadata.jsonl", "w") as f:
        for index in range(images):
            picture = scene(seed, index)
            save_png(render(picture, rng_for(seed, index, TEXTURE)), folder / image_name(index))
            scenes.update([f"shape={picture.shape}", f"color={picture.color}", f"background={picture.background}",
                           f"blurred={bool(picture.blur)}", f"square={picture.width == picture.height}"])
            for row in vqa_rows(picture, seed, index):
                f.write(json.dumps(row) + "\n")
                kinds[row["question_type"]] += 1
                answers[f"{row['question_type']}={row['multiple_choice_answer']}"] += 1
    manifest = {"script": "benchmarks/render_shapes.py", "version": VERSION, "seed": seed, "images": images,
                "questions": sum(kinds.values()), "questions_per_kind": dict(sorted(kinds.items())),
                "answers_per_kind": dict(sorted(answers.items())), "scenes": dict(sorted(scenes.items())),
                "render": render_settings()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# The demo's examples: (file, shape, colour, index of its RNG stream), the indices picked by eye for
# rotated shapes on noise-textured, non-square pictures and a large circle on a gradient, each under 20 KB.
EXAMPLES = (("drawn_rotated_triangle.png", "triangle", "green", 0),
            ("drawn_gray_circle.png", "circle", "gray", 4),
            ("drawn_blue_rectangle.png", "rectangle", "blue", 0))
EXAMPLE_SEED = 0


def write_examples(folder: Path) -> list[Path]:
    """The demo's drawn examples, always the same pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, shape, color, index in EXAMPLES:
        rng = rng_for(EXAMPLE_SEED, index, EXAMPLE)
        save_png(render(compose(shape, color, rng), rng), folder / name)
        paths.append(folder / name)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="output folder: pass it to `vlm eval --benchmark vqav2 --data`")
    target.add_argument("--examples", type=Path, help="write the demo's drawn example pictures into this folder")
    parser.add_argument("--images", type=int, default=1000, help="pictures to draw (4 questions each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's output in --out")
    args = parser.parse_args(argv)
    if args.examples:
        for path in write_examples(args.examples):
            print(f"{path} ({path.stat().st_size} bytes)")
        return
    if args.images < 1:
        parser.error("--images must be at least 1")
    started = time.perf_counter()
    manifest = generate(args.out, args.images, seed=args.seed, overwrite=args.overwrite)
    print(f"{manifest['images']} pictures, {manifest['questions']} questions "
          f"({', '.join(f'{k} {v}' for k, v in manifest['questions_per_kind'].items())}) "
          f"in {time.perf_counter() - started:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
