import numpy as np
import pytest
from bad_images import RED, WHAT_THE_USER_IS_TOLD, broken_images, odd_images
from PIL import Image

from vlm.images import ImageError, load_image


@pytest.mark.parametrize("name", sorted(WHAT_THE_USER_IS_TOLD))
def test_broken_files_get_a_message_naming_the_problem(tmp_path, name):
    path = broken_images(tmp_path)[name]
    with pytest.raises(ImageError, match=WHAT_THE_USER_IS_TOLD[name]) as error:
        load_image(path)
    assert name in str(error.value)
    with pytest.raises(ImageError, match=WHAT_THE_USER_IS_TOLD[name]):
        load_image(path.read_bytes())


def test_odd_modes_become_the_rgb_picture_a_viewer_shows(tmp_path):
    files = odd_images(tmp_path)
    loaded = {name: load_image(path) for name, path in files.items()}
    assert all(image.mode == "RGB" for image in loaded.values())
    cmyk = loaded["cmyk.jpg"].getpixel((10, 10))
    assert all(abs(got - want) <= 12 for got, want in zip(cmyk, RED, strict=True))
    assert loaded["transparent.png"].getpixel((0, 0)) == (255, 255, 255)
    grey = loaded["greyscale.png"].getpixel((0, 0))
    assert grey[0] == grey[1] == grey[2] and 0 < grey[0] < 255
    assert loaded["animated.gif"].getpixel((0, 0)) == RED  # the first frame, not the green second one


def _saved(tmp_path, name, image, **options):
    image.save(tmp_path / name, **options)
    return tmp_path / name


def _16_bit_rgb_png(pixels) -> bytes:
    """PIL writes no 16-bit colour PNG, so this one is assembled chunk by chunk."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits per sample, truecolour
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


GRADIENT_16 = np.linspace(0, 65535, 256).round().astype(np.uint16)
EXPECTED_8 = np.round(GRADIENT_16 / 257)  # 65535 is white, as 255 is


@pytest.mark.parametrize("name, build", [
    ("grey16.png", lambda g: Image.fromarray(g)),  # opens as I;16
    ("grey16-big-endian.tif", lambda g: Image.frombytes("I;16B", (g.shape[1], g.shape[0]), g.astype(">u2").tobytes())),
    ("grey32.tif", lambda g: Image.fromarray(g.astype(np.int32))),  # mode I, holding 16-bit values
])
def test_16_bit_greys_scale_to_8_bits_rather_than_clip(tmp_path, name, build):
    path = _saved(tmp_path, name, build(np.tile(GRADIENT_16, (4, 1))))
    with Image.open(path) as opened:
        assert opened.mode in ("I;16", "I;16B", "I")  # the modes PIL's convert("RGB") clips at 255
    image = load_image(path)
    pixels = np.asarray(image).astype(int)
    assert image.mode == "RGB" and (pixels[..., 0] == pixels[..., 2]).all()
    assert np.abs(pixels[0, :, 0] - EXPECTED_8).max() <= 1


def test_a_16_bit_colour_png_keeps_its_colours(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 65535, 32896, 257
    (tmp_path / "colour16.png").write_bytes(_16_bit_rgb_png(pixels))
    got = load_image(tmp_path / "colour16.png").getpixel((1, 1))
    assert all(abs(a - b) <= 1 for a, b in zip(got, (255, 128, 1), strict=True))


def test_float_images_run_from_black_at_0_to_white_at_1(tmp_path):
    ramp = np.tile(np.linspace(-0.5, 1.5, 201, dtype=np.float32), (4, 1))  # past both ends too
    path = _saved(tmp_path, "float.tif", Image.fromarray(ramp))
    pixels = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert np.abs(pixels - np.round(np.clip(ramp[0], 0, 1) * 255)).max() <= 1


def test_a_photo_turned_by_exif_orientation_is_used_upright(tmp_path):
    # Stored 64 wide and 32 high with a red block at the top left. Orientation 6 says the stored
    # top row is the right-hand side as shown and the stored left column is the top, so a viewer
    # shows it 32 wide and 64 high with the block at the top right.
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste(RED, (0, 0, 16, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_image(_saved(tmp_path, "turned.jpg", stored, exif=exif, quality=95))
    assert image.size == (32, 64)

    def near(xy, colour):
        return all(abs(a - b) <= 24 for a, b in zip(image.getpixel(xy), colour, strict=True))

    assert near((28, 4), RED)
    assert near((4, 4), (0, 0, 255)) and near((28, 60), (0, 0, 255))
