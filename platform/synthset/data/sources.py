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

Fashion-MNIST is looked for in ``data.root``, then in the Debian package's directory
(``apt-get install dataset-fashion-mnist``), then downloaded when ``data.download`` allows.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from synthset.config import DataConfig
from synthset.data.images import BadImage, fit_images, pixel_cap, read_image

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


class Sample(NamedTuple):
    """One image of a source: a stable ``key``, uint8 pixels (H, W) or (H, W, 3), a class index."""

    key: str
    image: np.ndarray
    label: int


@dataclass(frozen=True)
class SkippedImage:
    """An image left out under ``data.on_bad_image: skip``: what it was (``name``) and why."""

    name: str
    reason: str


@dataclass
class Listing:
    """A part's samples without their pixels: ``keys``, ``labels`` and ``refs`` in sample order.

    ``refs[i]`` is what ``Source.read_ref`` needs to decode sample ``i`` (plain data that pickles
    small: a path, a row number, a tar member's offset). ``skipped`` holds the samples rejected while
    listing (no image member, a bad label) under ``on_bad_image: skip``, with their listing ``order``
    (the number of samples listed before them), so a caller can merge them with decoding failures in
    the order ``samples`` would have reported them.
    """

    keys: list[str]
    labels: np.ndarray  # int64 (N,)
    refs: list
    skipped: list[tuple[int, "SkippedImage"]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows) -> "Listing":
        """The samples at ``rows`` (indices or a boolean mask), in that order; ``skipped`` is not carried."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, np.int64)
        return Listing([self.keys[i] for i in rows], self.labels[rows], [self.refs[i] for i in rows])


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W) for one channel, (N, H, W, 3) for RGB
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    keys: np.ndarray | None = None  # str (N,): each image's source key, when the source has them
    skipped: list[SkippedImage] = field(default_factory=list)  # bad images left out of this set

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else self.images.shape[-1]

    def subset(self, index: np.ndarray) -> "ImageSet":
        keys = None if self.keys is None else self.keys[index]
        return ImageSet(self.images[index], self.labels[index], self.class_names, keys)


class Source:
    """The protocol every real-image source follows (see the module docstring).

    Subclasses set ``parts``, provide ``class_names`` and implement ``_listing(part)`` (keys,
    labels and refs, no decoding; unusable samples go through ``self._bad``, which raises or returns them
    to be listed as skipped) and
    ``_decode(ref, size)`` (one image, ``BadImage`` when it cannot be used). ``samples`` and
    ``load`` follow from those two, so listing-then-reading gives exactly the streamed samples.

    ``channels``: 1 (grayscale) or 3 (RGB); ``on_bad_image``: ``"error"`` or ``"skip"``;
    ``background``: the grey level transparent pixels are composited over.
    """

    parts: tuple[str, ...] = ("train",)
    # The (H, W) every image of the source has, when they all share one (arrays); None when sizes vary.
    native_size: tuple[int, int] | None = None

    def __init__(self, channels: int = 1, on_bad_image: str = "error", background: int = 255,
                 max_pixels: int | None = None):
        self.max_pixels = max_pixels  # the most pixels an image may declare (images.pixel_cap); None: PIL's own
        if channels not in (1, 3):
            raise ValueError(f"data.channels: must be 1 or 3 (got {channels!r})")
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"data.on_bad_image: must be 'error' or 'skip' (got {on_bad_image!r})")
        self.channels, self.on_bad_image, self.background = channels, on_bad_image, background
        self.skipped: dict[str, list[SkippedImage]] = {}

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    def _check_part(self, part: str) -> None:
        if part not in self.parts:
            raise ValueError(f"{type(self).__name__} has no {part!r} part (it has {', '.join(self.parts)})")

    def listing(self, part: str = "train") -> Listing:
        """Every usable sample of the part (keys, labels, refs) in sample order, without decoding an image.

        Samples unusable before decoding (no image, a bad label) raise under ``on_bad_image: error`` and
        are left out and listed in ``Listing.skipped`` under ``skip``. Images that fail to decode are
        found only by ``read_ref``.
        """
        self._check_part(part)
        return self._listing(part)

    def read_ref(self, ref, size: int | None = None) -> np.ndarray:
        """The pixels of one listed sample (``Listing.refs[i]``), fitted to ``size``; ``BadImage`` if unusable."""
        return self._decode(ref, size)

    def samples(self, part: str = "train", size: int | None = None) -> Iterator[Sample]:
        """Stream the part's samples in a fixed order; ``size``: fit every image to size × size."""
        listed = self.listing(part)
        found = [(order, 0, s) for order, s in listed.skipped]
        self.skipped[part] = []
        for i, (key, label, ref) in enumerate(zip(listed.keys, listed.labels, listed.refs)):
            try:
                image = self._decode(ref, size)
            except BadImage as err:
                found.append((i, 1, self._bad(err.name, err.reason)))
                continue
            yield Sample(key, image, int(label))
        # In the order they were met: a listing skip comes before the listed sample that followed it.
        self.skipped[part] = [s for *_, s in sorted(found, key=lambda t: t[:2])]

    def load(self, part: str = "train", size: int | None = None) -> ImageSet:
        """The whole part in memory. Without ``size`` its images must all have the same size."""
        keys, images, labels = [], [], []
        for sample in self.samples(part, size):
            if images and sample.image.shape != images[0].shape:
                raise ValueError(f"{sample.key}: image of shape {sample.image.shape}, but {keys[0]} has "
                                 f"{images[0].shape}; images of different sizes need a size (data.image_size)")
            keys.append(sample.key)
            images.append(sample.image)
            labels.append(sample.label)
        if not images:
            raise ValueError(f"{type(self).__name__}: no usable images in the {part!r} part"
                             + (f" ({len(self.skipped[part])} skipped)" if self.skipped.get(part) else ""))
        return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), self.class_names,
                        np.asarray(keys, dtype=str), list(self.skipped[part]))

    def _listing(self, part: str) -> Listing:
        raise NotImplementedError

    def _decode(self, ref, size: int | None) -> np.ndarray:
        raise NotImplementedError

    def _bad(self, name: str, reason: str) -> SkippedImage:
        """A sample that cannot be used: raise (``on_bad_image: error``), or return it to be listed as skipped."""
        if self.on_bad_image == "error":
            raise BadImage(name, reason + " (data.on_bad_image: skip leaves such images out)")
        return SkippedImage(name, reason)

    def _read_image(self, data, name: str, size: int | None) -> np.ndarray:
        """``images.read_image`` in this source's mode (``BadImage`` when the image cannot be decoded)."""
        return read_image(data, name, self.channels, size, self.background, self.max_pixels)


class ArraySource(Source):
    """A source already held as grayscale uint8 arrays (Fashion-MNIST, digits), loaded on first use.

    ``load`` converts whole arrays at once; with channels=1 and no size it returns them untouched,
    so the embedded default behaves exactly as before sources had a protocol.
    """

    parts = ("train", "test")

    def __init__(self, read: Callable[[], tuple["ImageSet", "ImageSet"]], class_names: list[str],
                 native_size: tuple[int, int], channels: int = 1):
        super().__init__(channels)
        self._read_arrays, self._class_names, self.native_size = read, list(class_names), native_size
        self._arrays: dict[str, ImageSet] | None = None

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def _part(self, part: str) -> ImageSet:
        if self._arrays is None:
            train, test = self._read_arrays()
            self._arrays = {"train": train, "test": test}
        return self._arrays[part]

    def _convert(self, images: np.ndarray, size: int | None) -> np.ndarray:
        if self.channels == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        return images if size is None else fit_images(images, size)

    def _keys(self, part: str) -> list[str]:
        digits = len(str(max(len(self._part(part)) - 1, 0)))
        return [f"{part}/{i:0{digits}d}" for i in range(len(self._part(part)))]

    def _listing(self, part: str) -> Listing:
        arrays = self._part(part)
        return Listing(self._keys(part), np.asarray(arrays.labels, dtype=np.int64),
                       [(part, i) for i in range(len(arrays))])

    def _decode(self, ref, size: int | None) -> np.ndarray:
        part, i = ref
        return self._convert(self._part(part).images[i][None], size)[0]

    def load(self, part: str = "train", size: int | None = None) -> ImageSet:
        self._check_part(part)
        arrays = self._part(part)
        keys = np.asarray(self._keys(part), dtype=str)
        return ImageSet(self._convert(arrays.images, size), arrays.labels, self.class_names, keys)


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


# data.source → opener. The names are config.DATA_SOURCES (tests/test_sources.py checks they agree).
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
