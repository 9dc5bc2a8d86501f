import pytest
from bad_images import RED, WHAT_THE_USER_IS_TOLD, broken_images, odd_images

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
