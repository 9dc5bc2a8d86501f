"""Views of a training picture that keep every answer about it true, for data like easy-VQA's.

A model trained on easy-VQA's pictures alone (one shape, upright, on white, in exact colours) fails on shapes
drawn another way. Each view turns, mirrors, resizes, stretches and moves the picture's content, keeping all
of it in the frame and filling what it uncovers with the picture's own background (which `background` then
repaints in gradients and blotches, the shape's colour untouched), then jitters brightness, contrast and
saturation a little (never hue, so a colour keeps its name), blurs and adds noise; with `original`, view 0 is
the picture itself. With `upscale`, a view is drawn larger, its edges sharp: easy-VQA's pictures are 64 px,
and resized softly to the tower's input they never show a sharp edge, while users' pictures of shapes mostly
do. A view is a pure function of (image key, view number, settings): the feature cache stores it under
`view_key` and a rebuilt cache, or a run without one, sees the same pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from vlm.config import AugmentConfig

VERSION = 1  # part of every view's cache key: raise it when the same settings start drawing other views
# A pixel further than this from the background colour (in any channel) belongs to the content.
CONTENT_THRESHOLD = 24
MARGIN = 1.0  # pixels kept between the moved content and the frame's edge
SUPERSAMPLE = 4  # a redrawn edge is antialiased from this many samples a pixel, each way
# A picture with more than this share of pixels off the line from its background to its shape's colour is not
# one flat shape on a flat background (a photo, say): it is enlarged as it is, not redrawn.
NOT_FLAT_SHARE = 0.01


@functools.cache  # every example's every view is keyed through here
def identity(config: AugmentConfig) -> str:
    """Names the settings a view is drawn with. The number of views is left out: view 2 is the same
    picture whether a run asks for 4 views or 8."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "views"}
    return hashlib.sha256(json.dumps([VERSION, settings], sort_keys=True).encode()).hexdigest()[:12]


def view_key(key: str, config: AugmentConfig, view: int) -> str:
    """The feature cache's key for view `view` of the image cached as `key`."""
    return f"{key}#aug-{identity(config)}-{view}"


def view_loader(load: Callable[[], Image.Image], key: str, config: AugmentConfig, view: int
                ) -> Callable[[], Image.Image]:
    """`load`, then view `view` of what it opened (picklable, for DataLoader workers)."""
    return functools.partial(_open_view, load, key, config, view)


def _open_view(load, key, config, view):
    return augmented(load(), key, config, view)


def augmented(image: Image.Image, key: str, config: AugmentConfig, view: int) -> Image.Image:
    if config.original and view == 0:
        return image.convert("RGB")
    seed = int.from_bytes(hashlib.sha256(f"{key}\0{view}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    image = image.convert("RGB")
    factor = rng.uniform(1, config.upscale) if config.upscale > 1 else 1.0
    if factor > 1:
        image = _redrawn(image, factor)
    image = _moved(image, rng, config)
    if config.background:
        image = _repainted(image, rng, config.background)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(1 - config.color, 1 + config.color))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, config.blur) * factor))
    noise = rng.normal(0, rng.uniform(0, config.noise) * 255, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float64) + noise, 0, 255).round().astype(np.uint8))


def border_colour(pixels: np.ndarray) -> np.ndarray:
    """The picture's background, as the median colour of its outermost pixels ([height, width, 3] in)."""
    return np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)


def distance_from_background(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The background colour, and each pixel's largest channel difference from it: over CONTENT_THRESHOLD is
    content."""
    background = border_colour(pixels)
    return background, np.abs(pixels.astype(np.float64) - background).max(axis=-1)


def _moved(image: Image.Image, rng: np.random.Generator, config: AugmentConfig) -> Image.Image:
    """The content stretched, resized, mirrored and turned about its centre, then moved, all in one resampling."""
    background, distance = distance_from_background(np.asarray(image))
    size = np.array([image.width, image.height], np.float64)
    ys, xs = np.nonzero(distance > CONTENT_THRESHOLD)
    low, high = (np.array([xs.min(), ys.min()]), np.array([xs.max(), ys.max()]) + 1) if len(xs) else (0 * size, size)
    centre = (low + high) / 2

    aspect = np.sqrt((1 + config.aspect) ** rng.uniform(-1, 1))
    scale = rng.uniform(1 - config.scale, 1 + config.scale)
    mirror = np.where(rng.random(2) < 0.5, -1.0, 1.0) if config.flip else np.ones(2)
    angle = np.deg2rad(rng.uniform(-config.rotate, config.rotate))
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # Stretched along the picture's own axes first, so a rectangle stays a rectangle once turned.
    linear = turn @ np.diag(mirror) @ np.diag([scale * aspect, scale / aspect])

    corners = np.array([[low[0], low[1]], [high[0], low[1]], [low[0], high[1]], [high[0], high[1]]]) - centre
    reach = np.abs(corners @ linear.T).max(axis=0)  # half the moved content's width and height
    shrink = min(1.0, *((size / 2 - MARGIN) / np.maximum(reach, 1e-6)))
    linear, reach = linear * shrink, reach * shrink
    lowest, highest = reach + MARGIN, size - reach - MARGIN  # where the content's centre may go
    centre_in_frame = np.clip(centre, lowest, highest)
    target = rng.uniform(np.clip(centre_in_frame - config.shift * size, lowest, highest),
                         np.clip(centre_in_frame + config.shift * size, lowest, highest))

    # PIL maps each output pixel back to the input: x_in = inverse @ (x_out - target) + centre.
    inverse = np.linalg.inv(linear)
    offset = centre - inverse @ target
    coefficients = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BICUBIC,
                           fillcolor=tuple(int(round(c)) for c in background))


def _redrawn(image: Image.Image, factor: float) -> Image.Image:
    """One flat shape on a flat background drawn again at `factor` times the size, with sharp antialiased edges.

    Each pixel's share of the shape's colour (its position on the line from background to shape colour) is
    enlarged smoothly and cut at one half, which gives the outline at the new size; the outline is then
    antialiased by supersampling. Redrawn rather than enlarged pixel by pixel: views enlarged with
    nearest-neighbour pixels keep the 64 px picture's staircase edges, and a GPU run with them scored 91.4% on
    the drawn set, below the 92.7-94.0% of runs without them (issue 15, the 2026-11-25 session's note).
    """
    width, height = round(image.width * factor), round(image.height * factor)
    flat = flat_shape(np.asarray(image, np.float64))
    if flat is None:
        return image.resize((width, height), Image.Resampling.BICUBIC)
    background, colour, share = flat
    fine = Image.fromarray(share.astype(np.float32), mode="F").resize(
        (width * SUPERSAMPLE, height * SUPERSAMPLE), Image.Resampling.BICUBIC)
    covered = (np.asarray(fine) >= 0.5).reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))
    return Image.fromarray((background + covered[..., None] * (colour - background)).round().clip(0, 255)
                           .astype(np.uint8))


def _repainted(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """A flat shape's background repainted as a smooth gradient plus blotches, each channel moved by up to
    `strength` of the 0-255 range; the shape keeps its colour, and its edge blends it into the new background.
    Anything else (a photo, say) is left as it is: its background is not one colour to repaint."""
    flat = flat_shape(np.asarray(image, np.float64))
    if flat is None:
        return image
    background, colour, share = flat
    height, width = share.shape
    ys, xs = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, 2 * np.pi)
    along = xs * np.cos(angle) + ys * np.sin(angle)
    along = 2 * (along - along.min()) / max(np.ptp(along), 1.0) - 1
    gradient = along[..., None] * rng.uniform(-1, 1, 3)
    cells = int(rng.integers(2, 9))  # from a broad wash to blotches an eighth of the picture across
    grid = rng.uniform(-1, 1, (cells, cells, 3)).astype(np.float32)
    blotches = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize(
        (width, height), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
    field = strength * 255 / 2 * (rng.uniform(0, 1) * gradient + rng.uniform(0, 1) * blotches)
    pixels = (background + field) * (1 - share[..., None]) + colour * share[..., None]
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def flat_shape(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A picture of one flat shape on a flat background ([height, width, 3] in) as its background colour, the
    shape's colour and each pixel's share of the shape's colour (its position on the line between the two);
    None where it shows no shape, or is something else: more than NOT_FLAT_SHARE of its pixels off that line."""
    background, distance = distance_from_background(pixels)
    content = distance > CONTENT_THRESHOLD
    if not content.any():
        return None
    colour = np.median(pixels[distance >= np.median(distance[content])], axis=0)  # its least blended pixels
    direction = colour - background
    share = np.clip((pixels - background) @ direction / (direction @ direction), 0, 1)
    off_line = np.abs(pixels - background - share[..., None] * direction).max(axis=-1) > CONTENT_THRESHOLD
    return None if off_line.mean() > NOT_FLAT_SHARE else (background, colour, share)
