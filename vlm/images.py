"""Opening user images: every mode and format becomes one RGB frame, or a clear ImageError."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Far above any photo a user chats about, far below what exhausts memory when decoded.
MAX_PIXELS = 64_000_000


def _from_16_bit(pixels: np.ndarray) -> np.ndarray:
    # The high byte, as PIL itself reduces 16-bit RGB PNGs, so grey and colour files agree.
    return (pixels.astype(np.uint32) >> 8).astype(np.uint8)


# Single-channel modes deeper than 8 bits, to 8-bit grey. 16-bit PNGs and TIFFs open as I;16*.
# "I" (32-bit int) is what 16-bit TIFFs and older Pillows' 16-bit PNGs open as, so it is read as
# 0..65535. Float ("F") images, as image editors write 32-bit TIFFs and numpy/scikit-image hold
# them, run from 0 (black) to 1 (white); PIL's own clipping at 255 would make those black.
HIGH_DEPTH = {
    **dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N"), _from_16_bit),
    "I": lambda pixels: _from_16_bit(np.clip(pixels, 0, 65535)),
    "F": lambda pixels: np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8),
}


class ImageError(ValueError):
    """The input is not a usable image; the message says why in words a user understands."""


def to_rgb(image: Image.Image) -> Image.Image:
    """First frame, RGB, upright, 8 bits; transparent areas become white as a viewer shows them."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    # Phones save a photo as the sensor was held and note in EXIF which way is up; viewers turn it.
    image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_DEPTH:
        # PIL's convert("RGB") clips these at 255 rather than scaling, so a 16-bit photo turns white.
        image = Image.fromarray(HIGH_DEPTH[image.mode](np.asarray(image)))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return to_rgb(source)
    name = "the upload" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise ImageError(f"image file {source} does not exist")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(
                    f"{name} is {image.width}x{image.height} pixels, more than the {MAX_PIXELS:,} allowed; "
                    "resize it and try again"
                )
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError:
        # Pillow refuses these in Image.open, before the size check above can name the dimensions.
        raise ImageError(f"{name} has more than the {MAX_PIXELS:,} pixels allowed; resize it and try again") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image this program can read (PNG, JPEG, GIF, WebP, BMP, TIFF)") from None
    except (OSError, SyntaxError) as e:
        raise ImageError(f"{name} could not be decoded ({e}); it may be truncated or corrupt") from None
