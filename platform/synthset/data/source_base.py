"""The protocol every real-image source follows: ``Source`` (listing, then decoding), ``Listing``, ``Sample``,
``ImageSet``, and ``ArraySource`` for sources already in memory. ``sources.py`` says what the protocol means
and which sources exist (``open_source``); the concrete sources (``folder_source.py``, ``webdataset_source.py``,
``hf_source.py``) build on this module only, so the registry can import them without a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import numpy as np

from synthset.data.images import BadImage, fit_images, read_image


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
