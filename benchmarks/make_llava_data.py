"""A synthetic LLaVA-format dataset at real scale, to measure the data path (feature cache build,
data loading, evaluation) at the size of LLaVA-1.5's data without downloading it.

    python -m benchmarks.make_llava_data --out /data/synth --images 100000            # all cores
    python -m benchmarks.make_llava_data --out /tmp/synth --images 2000 --workers 2 --no-parquet
    python -m benchmarks.make_llava_data --out /data/synth --images 100000 --overwrite  # replace a previous run

Outputs under --out:
  images/XXXXX/YYYYYYYYY.jpg   N JPEGs at COCO-like sizes (longer side 480-640 px, quality 90), 1,000 per
                               folder: a smooth gradient, non-overlapping coloured shapes and photo-like
                               grain, so file sizes and decode cost are close to COCO's.
  llava_pretrain.json          one caption record per image in LLaVA-Pretrain's schema (blip_laion_cc_sbu_558k):
                               stage-1 (align) data.
  llava_instruct.json          about 1.2 multi-turn records per image plus ~6% text-only records in the
                               LLaVA-1.5 mix665k schema: stage-2 (instruct) data.
  llava_instruct.parquet/      the same instruct records with the images embedded, as parquet shards laid out
                               like lmms-lab/LLaVA-OneVision-Data (id, image, conversations), for
                               `datasets.load_dataset`. Skipped with --no-parquet.
  vqav2/validation/            a VQAv2-format evaluation set (image folder + metadata.jsonl) about held-out
                               images: `vlm eval --benchmark vqav2 --data OUT/vqav2`.
  manifest.json                the arguments, counts, sizes, timings and text-length percentiles.

At --images 100000 that is about 9 GB of JPEGs and 10 GB of parquet (each instruct record carries its image).

Everything is a pure function of --seed: each image's content comes from an RNG seeded with
(seed, stream, index), so the image writers, captions and questions agree without passing images
between processes, and the output does not depend on --workers.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw

# LLaVA-1.5's instructions, as its 665k mix writes them after VQA questions
from vlm.prompts import MULTIPLE_CHOICE, SHORT_ANSWER

VERSION = 1

# Independent RNG streams per image, so that changing how text is written never changes the pictures.
TRAIN, EVAL = 0, 1  # training images and the held-out evaluation images
GEOMETRY, GRAIN, CAPTION, CONVERSATIONS, TEXT_ONLY, EVAL_QUESTIONS = range(6)

FOLDER_SIZE = 1000  # images per subfolder
MAX_CHUNK = 100  # images per worker task
SHARD_ROWS = 1000  # parquet rows per shard: ~110 MB of JPEG bytes
ROW_GROUP = 100  # rows per parquet row group, as `datasets` writes image datasets
JPEG_QUALITY = 90
QUESTIONS_PER_EVAL_IMAGE = 5  # VQAv2 val has ~5.4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (30, 70, 210), "yellow": (240, 220, 40),
    "orange": (245, 140, 20), "purple": (130, 50, 170), "pink": (245, 130, 180), "brown": (130, 80, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "cyan": (40, 200, 220),
}
KINDS = ("circle", "ellipse", "square", "rectangle", "triangle", "pentagon", "star")
SHAPE_COUNT_WEIGHTS = (10, 16, 18, 16, 13, 11, 9, 7)  # 1..8 shapes
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Long side / short side, weighted roughly as COCO's sizes are.
ASPECTS = ((4 / 3, 0.55), (3 / 2, 0.15), (16 / 9, 0.12), (5 / 4, 0.08), (1.0, 0.10))

# LLaVA's brief-description instructions (LLaVA-Pretrain draws from these).
BRIEF_PROMPTS = (
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.", "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.", "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
# LLaVA's detailed-description instructions (detail_23k).
DETAIL_PROMPTS = (
    "Describe the following image.", "What do you see happening in this image?",
    "Can you elaborate on the elements of the picture provided?", "What's happening in the scene?",
    "Explain the visual content of the image in great detail.",
    "Analyze the image in a comprehensive and detailed manner.",
    "What are the key elements in this picture?", "Write a detailed description of the given image.",
)


# ---------------------------------------------------------------------------------------------
# Image content: a pure function of (seed, stream, index)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    rgb: tuple[int, int, int]  # the named colour, slightly jittered
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the drawn pixels
    center: tuple[float, float]  # inside the shape (a star's box is not centred on it)
    points: tuple[tuple[float, float], ...] | None  # polygon kinds only
    area: float


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    angle: float  # direction of the background gradient, radians; it lightens along it
    shapes: tuple[Shape, ...]  # largest first, which is also the drawing order


def rng_for(seed: int, stream: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index, purpose])


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.integers(480, 641))
    ratios, weights = zip(*ASPECTS, strict=True)
    ratio = ratios[rng.choice(len(ratios), p=weights)]
    short_side = round(long_side / ratio)
    return (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)  # COCO is mostly landscape


def _polygon(cx: float, cy: float, radius: float, corners: int, rotation: float, inner: float = 1.0):
    """A regular polygon, or a star when `inner` < 1 (every other vertex pulled in to inner * radius)."""
    steps = corners * (2 if inner < 1 else 1)
    points = []
    for k in range(steps):
        r = radius * inner if k % 2 else radius
        angle = rotation + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return tuple(points)


def _shoelace(points) -> float:
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True)))


def _outline(kind: str, size: float, rng: np.random.Generator):
    """Width, height, polygon points relative to the box's top-left corner (or None) and area of one shape."""
    if kind in ("circle", "square"):
        w = h = size
    elif kind in ("ellipse", "rectangle"):  # clearly elongated, so they are never mistaken for circles/squares
        w, h = size, size * rng.uniform(0.4, 0.7)
        if rng.random() < 0.5:
            w, h = h, w
    else:
        corners = {"triangle": 3, "pentagon": 5, "star": 5}[kind]
        points = _polygon(0, 0, size / 2, corners, rng.uniform(0, 2 * math.pi), 0.45 if kind == "star" else 1.0)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        shifted = tuple((x - min(xs), y - min(ys)) for x, y in points)
        return max(xs) - min(xs), max(ys) - min(ys), shifted, _shoelace(list(points))
    area = w * h * (math.pi / 4 if kind in ("circle", "ellipse") else 1)
    return w, h, None, area


def _touch(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    """Whether two boxes overlap or come closer than `gap`."""
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def scene(seed: int, stream: int, index: int) -> Scene:
    """What image `index` shows. The writers, captions and questions all call this."""
    rng = rng_for(seed, stream, index, GEOMETRY)
    width, height = image_size(rng)
    background = str(rng.choice(list(COLORS)))
    wanted = 1 + int(rng.choice(len(SHAPE_COUNT_WEIGHTS), p=np.array(SHAPE_COUNT_WEIGHTS) / sum(SHAPE_COUNT_WEIGHTS)))
    shape_colors = [c for c in COLORS if c != background]
    short_side, gap = min(width, height), 6
    placed: list[Shape] = []
    for _ in range(wanted):
        # Some shapes repeat an earlier colour and kind, so captions have "two blue squares".
        if placed and rng.random() < 0.3:
            earlier = placed[int(rng.integers(len(placed)))]
            kind, color = earlier.kind, earlier.color
        else:
            kind, color = str(rng.choice(KINDS)), str(rng.choice(shape_colors))
        size = short_side * rng.uniform(0.12, 0.42 - 0.025 * (wanted - 1))
        # Boxes never overlap, so every shape is fully visible and every count is true of the picture.
        for attempt in range(60):
            if attempt and attempt % 20 == 0:
                size *= 0.8
            w, h, points, area = _outline(kind, size, rng)
            x0, y0 = rng.uniform(gap, width - w - gap), rng.uniform(gap, height - h - gap)
            box = (x0, y0, x0 + w, y0 + h)
            if all(not _touch(box, s.box, gap) for s in placed):
                break
        else:
            continue  # no room left: the scene has fewer shapes than wanted
        if points is not None:
            points = tuple((x0 + x, y0 + y) for x, y in points)
            center = (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))
        else:
            center = (x0 + w / 2, y0 + h / 2)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, 3), 0, 255))
        placed.append(Shape(kind, color, rgb, box, center, points, area))
    return Scene(width, height, background, float(rng.uniform(0, 2 * math.pi)),
                 tuple(sorted(placed, key=lambda s: -s.area)))


# Gaussian noise through a table: a random byte picks one of 256 quantiles of N(0, 1), ten times
# faster than drawing normal floats, and the grain is what dominates the time per image.
GAUSSIAN_QUANTILES = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], dtype=np.float32)
GRAIN_SIGMA = 10  # per pixel and channel
TEXTURE_SIGMA, TEXTURE_CELL = 14, 3  # a blurred luminance noise on 3-px cells


def gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return (GAUSSIAN_QUANTILES * sigma).round().astype(np.int16)[rng.integers(0, 256, shape, dtype=np.uint8)]


def render(picture: Scene, seed: int, stream: int, index: int) -> bytes:
    """The JPEG bytes of image `index` (whose scene is `picture`): gradient, shapes, then grain."""
    w, h = picture.width, picture.height
    # The gradient is linear, so computing it on an 8-px grid and resizing loses nothing.
    gw, gh = w // 8 + 2, h // 8 + 2
    along = (math.cos(picture.angle) * np.arange(gw, dtype=np.float32)[None, :]
             + math.sin(picture.angle) * np.arange(gh, dtype=np.float32)[:, None])
    t = ((along - along.min()) / max(float(along.max() - along.min()), 1.0))[..., None]
    base = np.array(COLORS[picture.background], dtype=np.float32)
    dark, light = base * 0.8, base * 0.7 + 255 * 0.3
    image = Image.fromarray((dark + t * (light - dark)).astype(np.uint8)).resize((gw * 8, gh * 8), Image.BILINEAR)
    image = image.crop((0, 0, w, h))
    draw = ImageDraw.Draw(image)
    for shape in picture.shapes:
        if shape.points is not None:
            draw.polygon(shape.points, fill=shape.rgb)
        elif shape.kind in ("circle", "ellipse"):
            draw.ellipse(shape.box, fill=shape.rgb)
        else:
            draw.rectangle(shape.box, fill=shape.rgb)
    # Fine per-pixel noise plus a coarser luminance texture: flat colours alone compress to ~30 KB,
    # real photos at 640x480 are ~100-200 KB, and decode cost follows the compressed size.
    rng = rng_for(seed, stream, index, GRAIN)
    pixels = np.asarray(image).astype(np.int16) + gaussian_noise(rng, (h, w, 3), GRAIN_SIGMA)
    cells = (h // TEXTURE_CELL + 1, w // TEXTURE_CELL + 1)
    coarse = Image.fromarray((gaussian_noise(rng, cells, TEXTURE_SIGMA) + 128).clip(0, 255).astype(np.uint8))
    texture = coarse.resize((cells[1] * TEXTURE_CELL, cells[0] * TEXTURE_CELL), Image.BILINEAR)
    pixels += np.asarray(texture).astype(np.int16)[:h, :w, None] - 128
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def image_path(index: int) -> str:
    """Relative path of image `index`, as LLaVA-Pretrain names its files ("00453/004539375.jpg")."""
    return f"{index // FOLDER_SIZE:05d}/{index:09d}.jpg"


# ---------------------------------------------------------------------------------------------
# Words about a scene
# ---------------------------------------------------------------------------------------------

def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def count_phrase(count: int, color: str, kind: str) -> str:
    if count == 1:
        return f"{article(color)} {color} {kind}"
    return f"{NUMBER_WORDS[count]} {color} {kind}s"


def groups(picture: Scene) -> list[tuple[int, str, str]]:
    """(count, colour, kind) per distinct coloured kind, largest shapes first."""
    counts = Counter((s.color, s.kind) for s in picture.shapes)
    return [(n, color, kind) for (color, kind), n in counts.items()]


def listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def shape_list(picture: Scene) -> str:
    return listing([count_phrase(*g) for g in groups(picture)])


def where(shape: Shape, picture: Scene) -> str:
    """Which ninth of the image the shape's centre is in: "in the top left corner", "near the left edge", ..."""
    column = min(int(3 * shape.center[0] / picture.width), 2)
    row = min(int(3 * shape.center[1] / picture.height), 2)
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[column]
    if vertical and horizontal:
        return f"in the {vertical} {horizontal} corner"
    if vertical or horizontal:
        return f"near the {vertical or horizontal} edge"
    return "in the center"


def size_word(shape: Shape, picture: Scene) -> str:
    fraction = shape.area / (picture.width * picture.height)
    return "large" if fraction > 0.06 else "small" if fraction < 0.02 else "medium-sized"


def unique_largest(picture: Scene) -> Shape | None:
    """The largest shape when it is clearly larger than the next one (so questions about it are fair)."""
    shapes = picture.shapes
    if shapes and (len(shapes) == 1 or shapes[0].area >= 1.3 * shapes[1].area):
        return shapes[0]
    return None


def caption(picture: Scene, rng: np.random.Generator) -> str:
    """A short BLIP-like caption naming every shape and the background."""
    shapes, bg = shape_list(picture), picture.background
    templates = [f"{shapes} on a {bg} background", f"a {bg} background with {shapes}",
                 f"{shapes} against a {bg} backdrop", f"{shapes} over a plain {bg} gradient"]
    return templates[int(rng.integers(len(templates)))]


# Long answers are the scene's true sentences padded with general remarks that hold for every image.
GENERAL_REMARKS = (
    "The edges of the shapes are crisp and the fills are flat, so the picture looks like an illustration.",
    "A fine grain covers the whole picture, similar to the noise in a photo taken in dim light.",
    "None of the shapes overlap, so each of them is fully visible and easy to tell apart.",
    "The composition has no clear focal point; the shapes seem to be scattered at random.",
    "There is no text, no people and no animals in the image, only geometric shapes.",
    "Because the shapes are separated by some empty space, counting them is straightforward.",
    "Every shape has a color different from the background, so it stands out clearly.",
    "The scene could serve as an example in a lesson about shapes and colors for young children.",
    "Such images are often used to test whether a model can count objects and recognise colors.",
    "The lighting is even across the image, and there are no shadows under the shapes.",
    "Each shape is drawn as a solid region without any outline, pattern or gradient of its own.",
    "The image resembles a page from a coloring book after it has been filled in.",
    "Viewed from a distance, the arrangement might remind someone of a collection of stickers on a wall.",
    "The picture is small enough to take in at a glance, and nothing in it moves or changes.",
    "Nothing in the picture suggests depth; everything lies flat in the same plane.",
)

# Questions and answers of the general-knowledge, text-only conversations (ShareGPT's share of the mix).
TEXT_TOPICS = (
    "Explain the difference between a square and a rectangle.", "How do I compute the area of a {kind}?",
    "Write a short story about a {color} {kind} that wants to become a {kind2}.",
    "Why do painters mix {color} and white?", "Give me some ideas for a poster that uses only {color} and {color2}.",
    "What is the sum of the interior angles of a {kind}?", "Write a Python function that draws a {kind}.",
    "Summarize the history of geometry in a few paragraphs.", "How can I explain fractions to a child using shapes?",
    "What makes a color palette look balanced?",
)
TEXT_SENTENCES = (
    "A polygon is a closed figure made of straight segments, and a regular polygon has equal sides and equal angles.",
    "The interior angles of a triangle always add up to one hundred and eighty degrees.",
    "A square is a special rectangle whose four sides all have the same length.",
    "The area of a circle is pi times the square of its radius, so doubling the radius quadruples the area.",
    "Color theory describes how hues relate to each other, which ones contrast and which ones blend.",
    "Complementary colors sit opposite each other on the color wheel and make each other look brighter.",
    "When you draw a shape in code, you usually describe it by its corners or by a center and a radius.",
    "Children often learn shapes by sorting blocks, tracing outlines and naming objects around the house.",
    "Ancient surveyors used geometry to measure fields after the yearly floods of the Nile.",
    "Euclid collected the known results of his time into a series of books that were taught for centuries.",
    "A good poster keeps the number of colors small and uses one of them to highlight the main message.",
    "Mixing a color with white gives a tint, while mixing it with black gives a shade.",
    "If you split a pizza into eight equal slices, each slice is one eighth of the whole.",
    "A star shape can be drawn by alternating between an outer and an inner radius as you go around the center.",
    "Remember to check the edge cases, for example a radius of zero or a negative side length.",
    "In summary, the idea is simple once you see it, but it takes some practice to apply it quickly.",
    "Let me know if you would like a worked example or a version with more detail.",
    "Here is one way to think about it, step by step.",
)


def padded(sentences: list[str], pool: tuple[str, ...], words: int, rng: np.random.Generator) -> str:
    """`sentences`, then remarks from `pool` (each at most once while any is unused) until about `words` words."""
    out = list(sentences)
    order = list(rng.permutation(len(pool)))
    while sum(len(s.split()) for s in out) < words:
        if not order:
            order = list(rng.permutation(len(pool)))
        out.append(pool[order.pop()])
    return " ".join(out)


def skewed(rng: np.random.Generator, low: int, high: int, power: float) -> int:
    """An integer in [low, high], skewed towards low (larger power: more skew)."""
    return low + int((high - low + 1) * rng.random() ** power)


# ---------------------------------------------------------------------------------------------
# Short questions with answers that are true of the picture
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    answer_type: str  # VQAv2's: "yes/no", "number" or "other"
    question_type: str  # VQAv2's leading words, e.g. "how many"
    options: tuple[str, ...]  # the answer's vocabulary, for distractors and imperfect human answers
    about: str  # the fact asked for: one conversation asks for each fact once, however it is worded


NUMBERS = tuple(str(n) for n in range(11))
SIDES = ("left", "right")


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _plural(kind: str) -> str:
    return f"{kind}s"


def q_count(p: Scene, rng) -> QA:
    question = _pick(rng, ["How many shapes are there?", "How many shapes are in the image?",
                           "How many objects can you see?", "How many shapes are in the picture?"])
    return QA(question, str(len(p.shapes)), "number", "how many", NUMBERS, "count")


def q_count_kind(p: Scene, rng) -> QA:
    kinds = {s.kind for s in p.shapes}
    kind = _pick(rng, sorted(kinds)) if rng.random() < 0.7 else _pick(rng, KINDS)
    n = sum(s.kind == kind for s in p.shapes)
    return QA(f"How many {_plural(kind)} are there?", str(n), "number", "how many", NUMBERS, f"count {kind}")


def q_count_color(p: Scene, rng) -> QA:
    color = _pick(rng, sorted({s.color for s in p.shapes})) if rng.random() < 0.7 else _pick(rng, COLORS)
    n = sum(s.color == color for s in p.shapes)
    return QA(f"How many {color} shapes are there?", str(n), "number", "how many", NUMBERS, f"count {color}")


def q_largest_color(p: Scene, rng) -> QA | None:
    largest = unique_largest(p)
    if largest is None:
        return None
    return QA("What color is the largest shape?", largest.color, "other", "what color is the", tuple(COLORS),
              "largest color")


def q_largest_kind(p: Scene, rng) -> QA | None:
    largest = unique_largest(p)
    if largest is None:
        return None
    question = _pick(rng, ["What shape is the largest object?", "What is the biggest shape?"])
    return QA(question, largest.kind, "other", "what", KINDS, "largest kind")


def q_has_kind(p: Scene, rng) -> QA:
    kind = _pick(rng, KINDS)
    answer = "yes" if any(s.kind == kind for s in p.shapes) else "no"
    return QA(f"Is there {article(kind)} {kind} in the image?", answer, "yes/no", "is there a", ("yes", "no"),
              f"has {kind}")


def q_has_color(p: Scene, rng) -> QA:
    color = _pick(rng, COLORS)
    answer = "yes" if any(s.color == color for s in p.shapes) else "no"
    return QA(f"Are there any {color} shapes?", answer, "yes/no", "are there any", ("yes", "no"), f"has {color}")


def q_background(p: Scene, rng) -> QA:
    return QA("What color is the background?", p.background, "other", "what color is the", tuple(COLORS), "background")


def q_color_of_kind(p: Scene, rng) -> QA | None:
    once = [k for k, n in Counter(s.kind for s in p.shapes).items() if n == 1]
    if not once:
        return None
    kind = _pick(rng, once)
    color = next(s.color for s in p.shapes if s.kind == kind)
    return QA(f"What color is the {kind}?", color, "other", "what color is the", tuple(COLORS), f"color of {kind}")


def q_kind_of_color(p: Scene, rng) -> QA | None:
    once = [c for c, n in Counter(s.color for s in p.shapes).items() if n == 1]
    if not once:
        return None
    color = _pick(rng, once)
    kind = next(s.kind for s in p.shapes if s.color == color)
    return QA(f"What shape is the {color} object?", kind, "other", "what", KINDS, f"kind of {color}")


def q_side(p: Scene, rng) -> QA | None:
    """Left or right, for a shape whose colour and kind are unique and whose centre is clearly off the middle."""
    counts = Counter((s.color, s.kind) for s in p.shapes)
    candidates = [s for s in p.shapes if counts[s.color, s.kind] == 1 and abs(s.center[0] / p.width - 0.5) > 0.15]
    if not candidates:
        return None
    shape = _pick(rng, candidates)
    side = "left" if shape.center[0] < p.width / 2 else "right"
    name = f"{shape.color} {shape.kind}"
    return QA(f"Is the {name} on the left or the right side?", side, "other", "is the", SIDES, f"side of {name}")


QUESTIONS: tuple[Callable[[Scene, np.random.Generator], QA | None], ...] = (
    q_count, q_count_kind, q_count_color, q_largest_color, q_largest_kind, q_has_kind, q_has_color,
    q_background, q_color_of_kind, q_kind_of_color, q_side,
)


def questions(picture: Scene, rng: np.random.Generator, n: int, kinds=QUESTIONS) -> list[QA]:
    """Up to n distinct questions about the picture (fewer when it does not support that many)."""
    found: dict[str, QA] = {}  # by `about`
    for _ in range(8 * n):
        qa = _pick(rng, kinds)(picture, rng)
        if qa is not None and qa.about not in found:
            found[qa.about] = qa
            if len(found) == n:
                break
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# Records: captions (LLaVA-Pretrain), conversations (mix665k), VQAv2 rows
# ---------------------------------------------------------------------------------------------

def with_image(text: str, rng: np.random.Generator, before_only: bool = False) -> str:
    """`<image>` before the first human turn's text, or (LLaVA-Pretrain and LLaVA-Instruct do both) after it."""
    return f"<image>\n{text}" if before_only or rng.random() < 0.5 else f"{text}\n<image>"


def turns(pairs: list[tuple[str, str]]) -> list[dict]:
    return [turn for human, gpt in pairs for turn in ({"from": "human", "value": human}, {"from": "gpt", "value": gpt})]


def pretrain_record(seed: int, index: int) -> dict:
    picture, rng = scene(seed, TRAIN, index), rng_for(seed, TRAIN, index, CAPTION)
    prompt = with_image(_pick(rng, BRIEF_PROMPTS), rng)
    return {"id": f"{index:09d}", "image": image_path(index),
            "conversations": turns([(prompt, caption(picture, rng))])}


def vqa_pairs(picture: Scene, rng) -> list[tuple[str, str]]:
    """VQAv2/GQA-style: many short questions about one image, each with the short-answer suffix."""
    return [(f"{qa.question}\n{SHORT_ANSWER}", qa.answer) for qa in questions(picture, rng, skewed(rng, 2, 10, 1.0))]


def multiple_choice(qa: QA, rng) -> tuple[str, str]:
    """A-OKVQA-style: the answer among up to three distractors from its vocabulary, answered by letter."""
    distractors = [o for o in rng.permutation(qa.options) if o != qa.answer][:3]
    options = [str(o) for o in rng.permutation([qa.answer, *distractors])]
    letters = "ABCD"
    lines = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
    return f"{qa.question}\n{lines}\n{MULTIPLE_CHOICE}", letters[options.index(qa.answer)]


def mc_pairs(picture: Scene, rng) -> list[tuple[str, str]]:
    open_questions = [q for q in QUESTIONS if q not in (q_has_kind, q_has_color)]  # yes/no makes a poor choice
    return [multiple_choice(qa, rng) for qa in questions(picture, rng, skewed(rng, 1, 4, 1.2), open_questions)]


def scene_sentences(picture: Scene, rng) -> list[str]:
    """True sentences about the picture: overview, one per shape, largest/smallest, background."""
    n = len(picture.shapes)
    shapes = f"{NUMBER_WORDS[n]} {'shapes' if n > 1 else 'shape'}"
    out = [_pick(rng, [f"The image shows {shapes} on a {picture.background} background.",
                       f"This picture contains {shapes} arranged over a {picture.background} gradient."])]
    for s in picture.shapes:
        place, size = where(s, picture), size_word(s, picture)
        out.append(_pick(rng, [f"There is a {size} {s.color} {s.kind} {place}.",
                               f"{article(s.color).capitalize()} {s.color} {s.kind} sits {place}.",
                               f"{place.capitalize()}, you can see a {size} {s.color} {s.kind}."]))
    largest, smallest = unique_largest(picture), picture.shapes[-1]
    if largest and n > 2 and smallest.area * 1.3 <= picture.shapes[-2].area:
        out.append(f"The largest shape is the {largest.color} {largest.kind}, "
                   f"and the smallest is the {smallest.color} {smallest.kind}.")
    elif largest and n > 1:
        out.append(f"The largest shape is the {largest.color} {largest.kind}.")
    out.append(f"The background is a smooth gradient of {picture.background} that gets lighter across the image.")
    return out


def detail_pairs(picture: Scene, rng) -> list[tuple[str, str]]:
    """detail_23k-style: one instruction, one long description."""
    prompt = _pick(rng, DETAIL_PROMPTS)
    return [(prompt, padded(scene_sentences(picture, rng), GENERAL_REMARKS, skewed(rng, 60, 480, 1.2), rng))]


def reasoning_pairs(picture: Scene, rng) -> list[tuple[str, str]]:
    """complex_reasoning_77k-style: a question that needs a few facts combined, answered at length."""
    n, pairs = len(picture.shapes), []
    for _ in range(skewed(rng, 1, 2, 2.0)):
        if n > 1 and rng.random() < 0.5:
            rest = picture.shapes[1:]
            question = "If the largest shape were removed, what would be left in the picture?"
            facts = [f"The largest shape is the {picture.shapes[0].color} {picture.shapes[0].kind}.",
                     f"Without it, {NUMBER_WORDS[len(rest)]} shape{'s' if len(rest) > 1 else ''} would remain: "
                     f"{listing([f'{article(s.color)} {s.color} {s.kind}' for s in rest])}."]
        else:
            question = _pick(rng, ["What might this image be used for?",
                                   "Why is it easy to count the objects in this image?",
                                   "What can you infer about how this image was made?"])
            facts = [f"The image contains {shape_list(picture)} on a {picture.background} background."]
        pairs.append((question, padded(facts, GENERAL_REMARKS, skewed(rng, 70, 380, 1.3), rng)))
    return pairs


def conversation_pairs(picture: Scene, rng) -> list[tuple[str, str]]:
    """conversation_58k-style: several questions answered in a sentence or a short paragraph."""
    largest, pairs, n = unique_largest(picture), [], len(picture.shapes)
    options = [("What shapes can you see in the image?", f"I can see {shape_list(picture)}."),
               ("What color is the background?", f"The background is {picture.background}, shading from a darker "
                                                 f"to a lighter tone."),
               ("How many shapes are there?", f"There {'is one shape' if n == 1 else f'are {NUMBER_WORDS[n]} shapes'}"
                                              f" in total: {shape_list(picture)}.")]
    options += [(f"Where is the {s.color} {s.kind}?", f"The {s.color} {s.kind} is {where(s, picture)} of the image.")
                for s in picture.shapes if sum(t.color == s.color and t.kind == s.kind for t in picture.shapes) == 1]
    if largest:
        options.append(("Which shape is the largest?", f"The largest shape is the {largest.color} {largest.kind}, "
                                                       f"{where(largest, picture)}."))
    for i in rng.permutation(len(options))[: skewed(rng, 2, 7, 1.2)]:
        question, answer = options[i]
        pairs.append((question, padded([answer], GENERAL_REMARKS, skewed(rng, 15, 100, 1.3), rng)))
    return pairs


# (builder, share of image records, whether `<image>` always leads): roughly as LLaVA-1.5's mix weighs its
# parts. Its VQA-style parts always start "<image>\n"; LLaVA-Instruct's put it on either side.
CONVERSATION_KINDS = ((vqa_pairs, 0.40, True), (mc_pairs, 0.10, True), (conversation_pairs, 0.22, False),
                      (detail_pairs, 0.12, False), (reasoning_pairs, 0.16, False))


def instruct_records(seed: int, index: int) -> list[dict]:
    """The mix665k-style records of training image `index`: one or two about it, sometimes one text-only."""
    picture, rng = scene(seed, TRAIN, index), rng_for(seed, TRAIN, index, CONVERSATIONS)
    records = []
    shares = [share for _, share, _ in CONVERSATION_KINDS]
    for k in range(1 + int(rng.random() < 0.2)):
        builder, _, image_first = CONVERSATION_KINDS[int(rng.choice(len(shares), p=shares))]
        # Some scenes give a builder nothing to ask (1 in ~1,000 at 100k images); conversation always can.
        pairs = builder(picture, rng) or conversation_pairs(picture, rng)
        first_question, first_answer = pairs[0]
        pairs[0] = (with_image(first_question, rng, before_only=image_first), first_answer)
        records.append({"id": f"{index:09d}-{k}", "image": image_path(index), "conversations": turns(pairs)})
    text = text_only_record(seed, index)
    return records + ([text] if text else [])


def text_only_record(seed: int, index: int) -> dict | None:
    """A ShareGPT-like conversation with no image, for ~6% of all records (ShareGPT's 40k of 665k)."""
    rng = rng_for(seed, TRAIN, index, TEXT_ONLY)
    if rng.random() >= 0.077:  # 0.077 / (1.2 + 0.077) = 6%
        return None
    pairs = []
    for _ in range(skewed(rng, 1, 5, 1.5)):
        kinds, colors = rng.permutation(KINDS), rng.permutation(list(COLORS))
        topic = _pick(rng, TEXT_TOPICS).format(kind=kinds[0], kind2=kinds[1], color=colors[0], color2=colors[1])
        pairs.append((topic, padded([], TEXT_SENTENCES, skewed(rng, 30, 340, 1.4), rng)))
    return {"id": f"text-{index:09d}", "conversations": turns(pairs)}


def human_answers(qa: QA, rng) -> list[dict]:
    """Ten VQAv2-style answers: mostly the true one, a few other wordings or mistakes, the truth always the majority."""
    answers = []
    for j in range(10):
        draw = rng.random()
        if j < 4 or draw < 0.85:
            answers.append(qa.answer)
        elif draw < 0.92 and qa.answer_type == "number":
            answers.append(NUMBER_WORDS[int(qa.answer)])  # "three" for "3": the same after VQA answer normalisation
        else:
            answers.append(_pick(rng, qa.options))
    return [{"answer": str(answer), "answer_confidence": _pick(rng, ["yes", "yes", "yes", "maybe"]), "answer_id": j + 1}
            for j, answer in enumerate(rng.permutation(answers))]


def vqa_rows(seed: int, index: int, count: int) -> list[dict]:
    """VQAv2 validation rows (metadata.jsonl lines) for held-out image `index`."""
    picture, rng = scene(seed, EVAL, index), rng_for(seed, EVAL, index, EVAL_QUESTIONS)
    return [{"file_name": image_path(index), "question_id": index * 1000 + j, "image_id": index,
             "question": qa.question, "question_type": qa.question_type, "answer_type": qa.answer_type,
             "multiple_choice_answer": qa.answer, "answers": human_answers(qa, rng)}
            for j, qa in enumerate(questions(picture, rng, count))]


# ---------------------------------------------------------------------------------------------
# Worker tasks
# ---------------------------------------------------------------------------------------------

FOLDERS = {TRAIN: "images", EVAL: "vqav2/validation"}  # where each stream's images go, under --out


@dataclass(frozen=True)
class Task:
    stream: int
    start: int  # first image index
    stop: int  # one past the last
    vqa_questions: int = 0  # EVAL: questions in the whole set, QUESTIONS_PER_EVAL_IMAGE per image, fewer on the last


@dataclass
class TaskResult:
    captions: list[dict]
    instruct: list[dict]
    vqa: list[dict]
    jpeg_bytes: int  # training images only: the evaluation set's size is measured on disk


def run_task(out: str, seed: int, task: Task) -> TaskResult:
    """Write the task's images; return the text records about them."""
    result = TaskResult([], [], [], 0)
    for index in range(task.start, task.stop):
        picture = scene(seed, task.stream, index)
        data = render(picture, seed, task.stream, index)
        path = Path(out) / FOLDERS[task.stream] / image_path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if task.stream == TRAIN:
            result.jpeg_bytes += len(data)
            result.captions.append(pretrain_record(seed, index))
            result.instruct.extend(instruct_records(seed, index))
        else:
            count = min(QUESTIONS_PER_EVAL_IMAGE, task.vqa_questions - QUESTIONS_PER_EVAL_IMAGE * index)
            result.vqa.extend(vqa_rows(seed, index, count))
    return result


def parquet_schema():
    """The OneVision-Data columns, with the `datasets` features in the metadata so `image` loads as an Image."""
    import pyarrow as pa

    string = {"dtype": "string", "_type": "Value"}
    # The list-of-dict form of a list feature is the one every `datasets` version reads.
    features = {"id": string, "image": {"_type": "Image"}, "conversations": [{"from": string, "value": string}]}
    return pa.schema(
        [("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
         ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )


def write_shard(out: str, number: int, shards: int, records: list[dict]) -> int:
    """One parquet shard, a row group at a time so a worker holds ROW_GROUP images at most; returns its size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    path = Path(out) / "llava_instruct.parquet" / f"train-{number:05d}-of-{shards:05d}.parquet"
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(records), ROW_GROUP):
            rows = [{"id": r["id"], "conversations": r["conversations"],
                     "image": {"bytes": (Path(out) / "images" / r["image"]).read_bytes(), "path": r["image"]}
                     if "image" in r else None}
                    for r in records[start: start + ROW_GROUP]]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

OUTPUTS = ("images", "llava_pretrain.json", "llava_instruct.json", "llava_instruct.parquet", "vqav2", "manifest.json")


def write_json_array(path: Path, records: Iterable[dict]) -> int:
    """A JSON array written one record per line, without building the whole text in memory."""
    with open(path, "w") as f:
        f.write("[")
        for i, record in enumerate(records):
            f.write(("\n" if i == 0 else ",\n") + json.dumps(record))
        f.write("\n]\n")
    return path.stat().st_size


def conversation_words(record: dict) -> int:
    return sum(len(turn["value"].replace("<image>", " ").split()) for turn in record["conversations"])


def tasks_for(n_images: int, n_questions: int, workers: int) -> tuple[list[Task], int]:
    """Chunked tasks over the training images and the evaluation images; also the evaluation image count."""
    eval_images = math.ceil(n_questions / QUESTIONS_PER_EVAL_IMAGE)
    chunk = max(1, min(MAX_CHUNK, math.ceil((n_images + eval_images) / (4 * workers))))  # >= 4 tasks per worker
    tasks = [Task(TRAIN, a, min(a + chunk, n_images)) for a in range(0, n_images, chunk)]
    tasks += [Task(EVAL, a, min(a + chunk, eval_images), n_questions) for a in range(0, eval_images, chunk)]
    return tasks, eval_images


def percentiles(values: list[int]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in (10, 50, 90, 99)} if values else {}


def generate(out: Path, n_images: int, *, seed: int = 0, workers: int | None = None, vqa_questions: int = 20000,
             parquet: bool = True, overwrite: bool = False) -> dict:
    """Write the whole dataset under `out`; returns the manifest."""
    workers = workers or os.cpu_count() or 1
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise SystemExit(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    for name in existing:  # stale shards or images of a larger earlier run would be picked up by loaders
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}
    tasks, eval_images = tasks_for(n_images, vqa_questions, workers)
    captions, instruct, vqa, jpeg_bytes = [], [], [], 0
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = 0
        for result in pool.map(run_task, *zip(*[(str(out), seed, t) for t in tasks], strict=True)):
            captions += result.captions
            instruct += result.instruct
            vqa += result.vqa
            jpeg_bytes += result.jpeg_bytes
            done += 1
            if done % max(1, len(tasks) // 10) == 0:
                print(f"  images: {done}/{len(tasks)} tasks, {time.perf_counter() - started:.0f} s", flush=True)
        timings["images_s"] = time.perf_counter() - started

        # mix665k is shuffled; the text-only records land among the others.
        instruct = [instruct[i] for i in np.random.default_rng(seed).permutation(len(instruct))]
        sizes = {"llava_pretrain.json": write_json_array(out / "llava_pretrain.json", captions),
                 "llava_instruct.json": write_json_array(out / "llava_instruct.json", instruct)}
        with open(out / "vqav2" / "validation" / "metadata.jsonl", "w") as f:
            for row in vqa:
                f.write(json.dumps(row) + "\n")
        timings["json_s"] = time.perf_counter() - started - timings["images_s"]

        shards = 0
        if parquet:
            (out / "llava_instruct.parquet").mkdir()
            shards = math.ceil(len(instruct) / SHARD_ROWS)
            jobs = [(str(out), i, shards, instruct[i * SHARD_ROWS: (i + 1) * SHARD_ROWS]) for i in range(shards)]
            sizes["llava_instruct.parquet"] = sum(pool.map(write_shard, *zip(*jobs, strict=True)))
            timings["parquet_s"] = time.perf_counter() - started - timings["images_s"] - timings["json_s"]

    words = [conversation_words(r) for r in instruct]
    image_records = sum("image" in r for r in instruct)
    sizes["images"] = jpeg_bytes
    sizes["vqav2"] = sum(p.stat().st_size for p in (out / "vqav2").rglob("*") if p.is_file())
    manifest = {
        "script": "benchmarks/make_llava_data.py", "version": VERSION, "seed": seed, "images": n_images,
        "workers": workers,
        "counts": {"images": n_images, "pretrain_records": len(captions), "instruct_records": len(instruct),
                   "instruct_image_records": image_records, "instruct_text_only_records": len(instruct) - image_records,
                   "vqav2_questions": len(vqa), "vqav2_images": eval_images, "parquet_shards": shards},
        "bytes": sizes,
        "mean_jpeg_bytes": jpeg_bytes / max(n_images, 1),
        "instruct_words": percentiles(words),
        "instruct_tokens_estimate": {k: v / 0.75 for k, v in percentiles(words).items()},  # 1 token ~ 0.75 words
        "seconds": {**{k: round(v, 2) for k, v in timings.items()}, "total_s": round(time.perf_counter() - started, 2)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--images", type=int, required=True, help="number of training images (N)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vqa-questions", type=int, default=20000, help="questions in the VQAv2-format set")
    parser.add_argument("--no-parquet", action="store_true", help="skip the parquet copy of the instruct set")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    args = parser.parse_args(argv)
    if args.images < 1 or args.vqa_questions < 1:
        parser.error("--images and --vqa-questions must be at least 1")
    m = generate(args.out, args.images, seed=args.seed, workers=args.workers, vqa_questions=args.vqa_questions,
                 parquet=not args.no_parquet, overwrite=args.overwrite)
    c, s = m["counts"], m["seconds"]
    written = c["images"] + c["vqav2_images"]
    print(f"{written} images ({c['images']} training + {c['vqav2_images']} evaluation; "
          f"{m['mean_jpeg_bytes'] / 1024:.0f} KB mean) "
          f"in {s['images_s']:.1f} s ({written / max(s['images_s'], 1e-9):.0f} images/s), "
          f"{c['pretrain_records']} captions, {c['instruct_records']} instruct records "
          f"({c['instruct_text_only_records']} text-only), {c['vqav2_questions']} VQAv2 questions, "
          f"{c['parquet_shards']} parquet shards; {s['total_s']:.1f} s in all")
    words = m["instruct_words"]
    print("instruct conversation words: " + ", ".join(f"{k} {v:.0f}" for k, v in words.items())
          + "  (~tokens: " + ", ".join(f"{k} {v:.0f}" for k, v in m["instruct_tokens_estimate"].items()) + ")")


if __name__ == "__main__":
    main()
