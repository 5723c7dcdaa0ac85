"""Real-image sources behind one protocol: each yields (key, image, label) samples and names its classes.

``open_source(cfg.data)`` returns the ``Source`` that ``data.source`` names:

| name | reads | class names |
| --- | --- | --- |
| ``fashion_mnist`` | the four IDX files (``data.root``, the Debian package, a download) | ten garment names |
| ``digits`` | sklearn's 8×8 digits, split 80/20 (a tiny test fixture) | "zero" … "nine" |
| ``image_folder`` | ``data.path/<class>/<image>`` (``folder_source.py``) | sorted subfolder names |
| ``webdataset`` | local ``.tar`` shards with ``.cls`` or a ``.json`` label (``webdataset_source.py``) | see there |
| ``hf`` | a Hugging Face ``datasets`` dataset (``hf_source.py``) | its ClassLabel feature, see there |

A source has *parts*: ``"train"`` always, ``"test"`` when it has its own test images
(``splits.load_source`` sets a test set aside otherwise). ``source.samples(part, size)`` streams
``Sample(key, image, label)``: ``key`` is stable and unique within the part (``"train/00042"``,
``"cat/img_001.jpg"``, ``"shard-000003.tar/abc"``), ``image`` is uint8 (H, W) when
``data.channels`` is 1 and (H, W, 3) when it is 3, converted from whatever mode the file has
(``images.py``), and fitted to a square ``size`` when one is given. ``source.load(part, size)``
stacks a part into an ``ImageSet`` (small parts and tests only: the prepare stage never holds a part).

Listing comes before decoding: ``source.listing(part)`` gives every usable sample's key, label and a
small ``ref`` (a file path, a tar member's place, a row) without decoding any image, and
``source.read_ref(ref, size)`` decodes one. ``samples`` is exactly listing then reading, so the
prepare stage (``data/prepare.py``) can draw the splits on the listing and decode in parallel
tasks, each of which opens the source again (``open_source`` is cheap) and reads only its refs.
Images that cannot be decoded raise a ``ValueError`` naming them, or with ``data.on_bad_image:
skip`` are left out and listed in ``source.skipped[part]`` (and ``ImageSet.skipped``).

The protocol's classes (``Source``, ``Listing``, ``ArraySource``…) live in ``source_base.py``.

Fashion-MNIST is looked for in ``data.root``, then in the Debian package's directory
(``apt-get install dataset-fashion-mnist``), then downloaded when ``data.download`` allows.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from synthset.config import DataConfig
from synthset.data.images import pixel_cap
from synthset.data.source_base import ArraySource, ImageSet, Source

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
DIGITS_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
# Where `apt-get install dataset-fashion-mnist` puts the files (overridable for tests).
DEBIAN_DIR = os.environ.get("SYNTHSET_FMNIST_DEBIAN_DIR", "/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_CACHE = "~/.cache/synthset/fashion-mnist"


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array, validating its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: unreadable IDX file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _download(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES.values():
        target = directory / f"{stem}.gz"
        if not target.exists():
            tmp = target.with_suffix(".gz.part")
            urllib.request.urlretrieve(DOWNLOAD_URL + target.name, tmp)  # noqa: S310 (fixed https/http host)
            os.replace(tmp, target)


def locate_fashion_mnist(root: str | None, download: bool, cache_dir: str | Path) -> Path:
    """The directory holding all four IDX files, or a ``FileNotFoundError`` naming every place tried."""
    candidates = [Path(root)] if root else []
    candidates += [Path(DEBIAN_DIR), Path(cache_dir)]
    for directory in candidates:
        if all(_find(directory, stem) for stem in FASHION_MNIST_FILES.values()):
            return directory
    tried = [f"data.root={root!r}" if root else "data.root (not set)", f"the Debian package's {DEBIAN_DIR}"]
    if download:
        try:
            _download(Path(cache_dir))
            return Path(cache_dir)
        except OSError as err:
            tried.append(f"download from {DOWNLOAD_URL} into {cache_dir} ({err})")
    else:
        tried.append("download (disabled by data.download=false)")
    raise FileNotFoundError(
        "Fashion-MNIST not found. Tried: " + "; ".join(tried)
        + ". Install it with `apt-get install dataset-fashion-mnist` or set data.root to a directory "
        "with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz]."
    )


def load_fashion_mnist(root: str | None = None, download: bool = True,
                       cache_dir: str | Path = FASHION_MNIST_CACHE) -> tuple[ImageSet, ImageSet]:
    """(train 60k, test 10k) Fashion-MNIST."""
    directory = locate_fashion_mnist(root, download, Path(cache_dir).expanduser())
    arrays = {k: read_idx(_find(directory, stem)) for k, stem in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise ValueError(f"{directory}: {split} has {n_img} images but {n_lab} labels")
    make = lambda s: ImageSet(arrays[f"{s}_images"], arrays[f"{s}_labels"].astype(np.int64), FASHION_MNIST_CLASSES)
    return make("train"), make("test")


def load_digits_fixture() -> tuple[ImageSet, ImageSet]:
    """sklearn's 8×8 digits scaled to uint8, split 80/20 deterministically: a tiny test fixture."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = d.target.astype(np.int64)
    cut = int(0.8 * len(labels))
    names = list(DIGITS_CLASSES)
    return ImageSet(images[:cut], labels[:cut], names), ImageSet(images[cut:], labels[cut:], names)


def _open_fashion_mnist(cfg: DataConfig, cache_dir: str | Path) -> Source:
    return ArraySource(lambda: load_fashion_mnist(cfg.root, cfg.download, cache_dir), FASHION_MNIST_CLASSES,
                       (28, 28), cfg.channels)


def _open_digits(cfg: DataConfig, cache_dir: str | Path) -> Source:
    return ArraySource(load_digits_fixture, DIGITS_CLASSES, (8, 8), cfg.channels)


def _open_image_folder(cfg: DataConfig, cache_dir: str | Path) -> Source:
    from synthset.data.folder_source import ImageFolderSource

    return ImageFolderSource(cfg.path, cfg.test_path, cfg.channels, cfg.on_bad_image, cfg.alpha_background,
                             cfg.follow_links_outside, pixel_cap(cfg.image_size, cfg.max_image_pixels))


def _open_webdataset(cfg: DataConfig, cache_dir: str | Path) -> Source:
    from synthset.data.webdataset_source import WebDatasetSource

    return WebDatasetSource(cfg.path, cfg.test_path, cfg.label_key, cfg.class_names, cfg.channels,
                            cfg.on_bad_image, cfg.alpha_background, pixel_cap(cfg.image_size, cfg.max_image_pixels))


def _open_hf(cfg: DataConfig, cache_dir: str | Path) -> Source:
    from synthset.data.hf_source import HFSource

    return HFSource(cfg.path, cfg.split, cfg.test_split, cfg.image_column, cfg.label_column, cfg.class_names,
                    cfg.channels, cfg.on_bad_image, cfg.alpha_background,
                    pixel_cap(cfg.image_size, cfg.max_image_pixels))


# data.source → opener. The names are config.DATA_SOURCES (tests/data/test_sources.py checks they agree).
SOURCES: dict[str, Callable[[DataConfig, str | Path], Source]] = {
    "fashion_mnist": _open_fashion_mnist,
    "digits": _open_digits,
    "image_folder": _open_image_folder,
    "webdataset": _open_webdataset,
    "hf": _open_hf,
}


def open_source(cfg: DataConfig, cache_dir: str | Path = FASHION_MNIST_CACHE) -> Source:
    """The ``Source`` that ``cfg.source`` names, configured from ``cfg`` (the ``data`` section).

    Opening checks what is cheap to check (the path exists, the classes, splits and columns are
    there); images are decoded only when samples are read. ``cache_dir``: where Fashion-MNIST is
    downloaded to.
    """
    opener = SOURCES.get(cfg.source)
    if opener is None:  # config validation rejects this first; a DataConfig built without validation may not
        raise ValueError(f"data.source: unknown source {cfg.source!r}; choose from {', '.join(SOURCES)}")
    return opener(cfg, Path(cache_dir).expanduser())
