"""Decoding a user's image files into the configured mode and size (PIL only).

Every source that reads encoded images (image folders, WebDataset shards, Hugging Face
datasets) goes through ``read_image``: it decodes the bytes, converts whatever mode the file
has to ``data.channels`` (1 → ``"L"``, 3 → ``"RGB"``) and, when asked, fits it to a square
``size`` (``fit_image``). A file PIL cannot decode raises a ``ValueError`` that names it, so a
source can report it or, with ``data.on_bad_image: skip``, skip it.

Mode conversion (``to_channels``):

- transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent colour) is
  composited over a flat background of grey level ``data.alpha_background`` (white by
  default) instead of dropping the alpha channel: a dropped alpha channel reveals whatever
  colour the transparent pixels happen to store (often black, sometimes garbage), while
  compositing shows the image as a viewer does;
- ``CMYK`` (and ``YCbCr``, ``LAB``, …) converts to RGB with PIL's conversion (no colour profile);
- 16-bit grayscale (``I;16``, ``I``) is scaled from 0..65535 to 0..255 rather than clipped;
- RGB → grayscale uses PIL's ITU-R 601-2 luma, grayscale → RGB repeats the channel;
- the EXIF orientation tag is applied first, so camera photos stand the right way up.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# The file types image folders and WebDataset shards are read for (lower case, with the dot).
# The issue asks for PNG/JPEG/WebP; the rest are other formats PIL decodes and torchvision's
# ImageFolder also accepts, so a folder that works there works here.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

# Modes that carry an alpha channel PIL can convert to "RGBA" (palette images are checked separately).
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class BadImage(ValueError):
    """An image (or sample) a source cannot use: ``str(err)`` is ``"<name>: <reason>"``."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def channel_mode(channels: int) -> str:
    """``data.channels`` → PIL mode: 1 → ``"L"``, 3 → ``"RGB"``."""
    if channels not in (1, 3):
        raise ValueError(f"data.channels: must be 1 or 3 (got {channels!r})")
    return "L" if channels == 1 else "RGB"


def to_channels(image: Image.Image, channels: int, background: int = 255) -> Image.Image:
    """``image`` in any PIL mode → mode ``"L"`` (channels=1) or ``"RGB"`` (channels=3).

    ``background`` is the grey level (0..255) transparent pixels are composited over; see the
    module docstring for why alpha is composited rather than dropped.
    """
    mode = channel_mode(channels)
    image = ImageOps.exif_transpose(image)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and image.has_transparency_data):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        image = Image.alpha_composite(canvas, rgba).convert("RGB")
    elif image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 → L conversion clips at 255, which would turn most 16-bit scans white.
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode not in ("L", "RGB"):
        # "1", "P" without transparency, "CMYK", "YCbCr", "LAB", "HSV", "F": RGB first, so that a
        # palette or CMYK image reaches grayscale through its colours, not its raw indices/inks.
        image = image.convert("RGB")
    return image if image.mode == mode else image.convert(mode)


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W[, C]) → uint8 (size, size[, C]).

    The rule of ``splits.fit_images`` for one image of any shape: an image a little smaller than
    ``size`` (by at most a quarter of its side, e.g. 28 → 32) is zero-padded, centred, so its
    pixels stay untouched; any other image is resized (bilinear, antialiased when shrinking) so
    that its *shorter* side equals ``size`` and then centre-cropped, which keeps the aspect ratio
    of non-square photos instead of stretching them. Square images are resized exactly as
    ``fit_images`` resizes them.
    """
    h, w = image.shape[:2]
    if h == w == size:
        return image
    if size >= h and size >= w and size - max(h, w) <= max(h, w) // 4:
        out = np.zeros((size, size) + image.shape[2:], dtype=np.uint8)
        top, left = (size - h) // 2, (size - w) // 2
        out[top:top + h, left:left + w] = image
        return out
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def fit_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W[, C]) → uint8 (N, size, size[, C]) with ``fit_image``'s rule (padding at once)."""
    n, h, w = images.shape[:3]
    if h == w == size:
        return images
    if size >= h and size >= w and size - max(h, w) <= max(h, w) // 4:
        out = np.zeros((n, size, size) + images.shape[3:], dtype=np.uint8)
        top, left = (size - h) // 2, (size - w) // 2
        out[:, top:top + h, left:left + w] = images
        return out
    if n == 0:
        return np.zeros((0, size, size) + images.shape[3:], dtype=np.uint8)
    return np.stack([fit_image(im, size) for im in images])


def pixel_cap(image_size: int, max_image_pixels: int | None = None) -> int:
    """The most pixels a source image may declare: ``data.max_image_pixels``, else 4096² or 64 × the
    training size², whichever is larger (a 12-megapixel photo passes; a 20 KB PNG declaring 13000 × 13000
    does not get decoded)."""
    return max_image_pixels or max(4096 * 4096, 64 * image_size * image_size)


def read_image(data: bytes | str | Path | Image.Image, name: str, channels: int, size: int | None = None,
               background: int = 255, max_pixels: int | None = None) -> np.ndarray:
    """Decode one image into uint8 (H, W) (channels=1) or (H, W, 3) (channels=3), fitted to ``size``.

    ``data`` is the encoded file (bytes), a path to it, or an already opened PIL image; ``name``
    is how errors refer to it (a file path, ``shard.tar:member``, ``dataset[split][row]``).
    Anything PIL cannot decode — a truncated or corrupt file, an unknown format, an image over
    PIL's decompression-bomb limit — raises ``BadImage`` (a ``ValueError``: ``"<name>: <reason>"``).
    """
    try:
        with warnings.catch_warnings():
            # Our cap decides (below); without one, PIL's warning (it only warns below 179 Mpx) is an error.
            warnings.simplefilter("ignore" if max_pixels else "error", Image.DecompressionBombWarning)
            if isinstance(data, Image.Image):
                image = data
            else:
                # Bytes in memory, never an open file: nothing to close, even for multi-frame GIF/TIFF.
                raw = data if isinstance(data, (bytes, bytearray)) else Path(data).read_bytes()
                image = Image.open(io.BytesIO(raw))
            declared = image.size[0] * image.size[1]
        if max_pixels is not None and declared > max_pixels:
            raise BadImage(name, f"declares {image.size[0]}×{image.size[1]} = {declared:,} pixels, over the cap of "
                                 f"{max_pixels:,} (data.max_image_pixels); not decoded")
        if size is not None and image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller
            # (the shorter side stays >= size): large photos decode several times faster.
            image.draft(None, (size, size))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if max_pixels else "error", Image.DecompressionBombWarning)
            image.load()  # PIL decodes lazily: force it here so a corrupt file fails now, by name
        array = np.asarray(to_channels(image, channels, background))
    except BadImage:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, …
        raise BadImage(name, f"cannot read image ({type(err).__name__}: {err})") from None
    return array if size is None else fit_image(array, size)
