"""data/images.py: decoding any image file into the configured mode and size."""

import io

import numpy as np
import pytest
from PIL import Image

from synthset.data.images import BadImage, fit_image, fit_images, read_image, to_channels


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def test_transparent_pixels_are_composited_over_the_background_not_dropped():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200                     # stored colour: red everywhere …
    rgba[:2, :, 3] = 0                     # … invisible in the top half,
    rgba[2:, :, 3] = 255                   # opaque in the bottom half
    image = Image.fromarray(rgba, "RGBA")
    rgb = np.asarray(to_channels(image, 3, background=255))
    assert (rgb[:2] == 255).all()          # dropping alpha would have shown the hidden red
    assert (rgb[2:] == [200, 0, 0]).all()
    assert (np.asarray(to_channels(image, 1, background=0))[:2] == 0).all()
    half = Image.fromarray(np.array([[[0, 0, 0, 128]]], np.uint8), "RGBA")
    assert abs(int(np.asarray(to_channels(half, 1, background=255))[0, 0]) - 127) <= 1


def test_palette_cmyk_and_sixteen_bit_images_convert_through_their_colours():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255, 255, 255, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert np.asarray(to_channels(palette, 3)).tolist() == [[[0, 0, 255], [255, 255, 255]]]
    assert np.asarray(to_channels(palette, 1)).tolist() == [[29, 255]]    # the luma of blue, not index 0
    palette.info["transparency"] = 0
    assert np.asarray(to_channels(palette, 1, background=100)).tolist() == [[100, 255]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))                   # pure red ink mix
    assert np.asarray(to_channels(cmyk, 3)).tolist() == [[[255, 0, 0]]]
    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))
    assert np.asarray(to_channels(sixteen, 1)).tolist() == [[0, 100, 255]]  # scaled, not clipped at 255
    with pytest.raises(ValueError, match="data.channels"):
        to_channels(cmyk, 2)


def test_fit_image_pads_small_differences_and_crops_non_square_images():
    padded = fit_image(np.full((28, 20, 3), 7, np.uint8), 32)
    assert padded.shape == (32, 32, 3) and padded[2:30, 6:26].min() == 7 and padded[:, :6].max() == 0
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 255                                                  # a bright centre square
    fitted = fit_image(wide, 16)
    assert fitted.shape == (16, 16) and fitted.min() > 200                # aspect kept: the centre fills it
    square = np.random.default_rng(0).integers(0, 256, (3, 50, 50)).astype(np.uint8)
    expected = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in square])
    np.testing.assert_array_equal(fit_images(square, 32), expected)       # squares resize as they always did
    assert fit_images(np.zeros((0, 50, 50, 3), np.uint8), 32).shape == (0, 32, 32, 3)


def test_read_image_decodes_fits_and_names_bad_files(tmp_path):
    photo = Image.new("RGB", (640, 480), (10, 200, 30))
    image = read_image(encode(photo, "JPEG"), "photo.jpg", channels=3, size=32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and abs(int(image[16, 16, 1]) - 200) < 8
    path = tmp_path / "g.webp"
    Image.new("L", (9, 12), 90).save(path)
    assert read_image(path, str(path), channels=1).shape == (12, 9)
    truncated = encode(photo, "PNG")[:200]
    with pytest.raises(BadImage, match=r"^cat/broken\.png: cannot read image") as err:
        read_image(truncated, "cat/broken.png", channels=3)
    assert err.value.name == "cat/broken.png" and isinstance(err.value, ValueError)
    with pytest.raises(BadImage, match="notes.jpg"):
        read_image(b"not an image at all", "notes.jpg", channels=1)
