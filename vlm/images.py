"""Opening user images: every mode and format becomes one RGB frame, or a clear ImageError."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Far above any photo a user chats about, far below what exhausts memory when decoded.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """The input is not a usable image; the message says why in words a user understands."""


def to_rgb(image: Image.Image) -> Image.Image:
    """First frame, RGB; transparent areas become white as a viewer shows them."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
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
