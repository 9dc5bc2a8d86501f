"""The augmentation probe (benchmarks/augment_probe.py) reads true labels off easy-VQA and measures shape sizes
the way the renderer draws them, so the settings it ranks are ranked on what the pictures show."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks import augment_probe
from benchmarks import render_shapes as render
from vlm.data.augment import distance_from_background
from vlm.data.easy_vqa import COLORS, SHAPES


@pytest.mark.integration
def test_easy_vqa_labels_name_the_colour_the_pictures_are_drawn_in():
    paths, labels = augment_probe.easy_vqa_pictures("test")
    assert len(paths) == len(labels) > 700 and set(labels[:, 1].tolist()) == set(range(len(SHAPES)))
    palette = np.array([render.CANONICAL_RGB[c] for c in COLORS], float)
    for path, (colour, _) in list(zip(paths, labels.tolist(), strict=True))[::40]:
        pixels = np.asarray(Image.open(path).convert("RGB"), float)
        shape = distance_from_background(pixels)[1] > 100
        nearest = np.abs(palette - np.median(pixels[shape], axis=0)).sum(axis=1).argmin()
        assert COLORS[nearest] == COLORS[colour], path


def test_content_share_is_the_share_of_the_picture_the_drawn_shape_covers():
    for index in range(12):
        picture = render.scene(7, index)
        image = render.render(picture, render.rng_for(7, index, render.TEXTURE))
        covered = render.coverage(picture).mean()
        assert abs(augment_probe.content_share(image) - covered) < 0.1 * covered + 0.01, picture
