"""Real-image sources: Fashion-MNIST (IDX files) and sklearn's digits (a tiny test fixture).

A source returns an ``ImageSet``: uint8 images (N, H, W), int64 labels (N,), class names.
Fashion-MNIST is looked for in ``data.root``, then in the Debian package's directory
(``apt-get install dataset-fashion-mnist``), then downloaded when ``data.download`` allows.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
# Where `apt-get install dataset-fashion-mnist` puts the files (overridable for tests).
DEBIAN_DIR = os.environ.get("SYNTHSET_FMNIST_DEBIAN_DIR", "/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.class_names)


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
                       cache_dir: str | Path = "~/.cache/synthset/fashion-mnist") -> tuple[ImageSet, ImageSet]:
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
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    cut = int(0.8 * len(labels))
    return ImageSet(images[:cut], labels[:cut], names), ImageSet(images[cut:], labels[cut:], names)
