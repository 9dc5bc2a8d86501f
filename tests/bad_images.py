"""Image files as users really upload them: odd modes the loader must accept, broken files it must refuse."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

RED = (200, 30, 30)
# Words the refusal of each broken file must contain.
WHAT_THE_USER_IS_TOLD = {
    "notes.png": "not an image",
    "truncated.png": "truncated",
    "truncated.jpg": "truncated",
    "large.png": "9000x8000 pixels",
    "enormous.png": "resize it",
}


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid PNG header that declares width x height, so only the size check can refuse it."""
    png = bytearray(_encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + png[24:29]
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(png)


def odd_images(directory: Path) -> dict[str, Path]:
    """Readable images in modes and formats other than plain RGB; each one's first pixel is RED or a known colour."""
    red = Image.new("RGB", (64, 48), RED)
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, (0, 255, 0))]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files = {
        "cmyk.jpg": _encoded(red.convert("CMYK"), "JPEG", quality=95),
        "transparent.png": _encoded(Image.new("RGBA", (32, 32), (0, 0, 255, 0)), "PNG"),
        "greyscale.png": _encoded(red.convert("L"), "PNG"),
        "animated.gif": animated.getvalue(),
    }
    return _write(directory, files)


def broken_images(directory: Path) -> dict[str, Path]:
    """Files that are not usable images, keyed by what a user must be told."""
    png = _encoded(Image.new("RGB", (64, 48), RED), "PNG")
    jpeg = _encoded(Image.new("RGB", (64, 48), RED), "JPEG")
    files = {
        "notes.png": b"shopping list: milk, eggs\n",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "large.png": _png_claiming_size(9000, 8000),
        "enormous.png": _png_claiming_size(20000, 20000),
    }
    return _write(directory, files)


def _write(directory: Path, files: dict[str, bytes]) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {name: directory / name for name in files}
