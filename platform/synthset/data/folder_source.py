"""The ``image_folder`` source: ``root/<class>/<image>``, the layout of torchvision's ImageFolder.

::

    data:
      source: image_folder
      path: /data/pets            # pets/cat/001.jpg, pets/dog/abc.png, … (class names: sorted folder names)
      test_path: /data/pets-test  # optional, same class folders; else data.test_fraction of path is the test set
      channels: 3

Every non-hidden subfolder of the root is a class; the images of a class are the files with an
image suffix (``images.IMAGE_SUFFIXES``, case-insensitive) anywhere below its folder, in sorted
path order; other files (``.txt``, ``Thumbs.db``, …) and hidden files are ignored. A sample's key
is its path relative to the root (``"cat/001.jpg"``). Images may have any size and mode; they
are decoded with PIL only and converted as ``images.read_image`` describes.
"""

from __future__ import annotations

import os
from pathlib import Path
import numpy as np

from synthset.data.images import IMAGE_SUFFIXES
from synthset.data.sources import Listing, Source


def _visible(name: str) -> bool:
    return not name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden files and folders left out), sorted by relative path."""
    found = []
    # followlinks: a class folder may be a symlink to images stored elsewhere (as torchvision allows).
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if _visible(d)]
        found += [Path(directory) / f for f in files if _visible(f) and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class ImageFolderSource(Source):
    """Images in ``root/<class>/…`` folders (and optionally ``test_root/<class>/…`` as the test part).

    ``root``/``test_root`` are ``data.path``/``data.test_path``; errors name those fields. The
    folders are listed once, on first use of a part: an empty class folder is a ``ValueError``
    naming the class.
    """

    def __init__(self, root: str | os.PathLike, test_root: str | os.PathLike | None = None, channels: int = 1,
                 on_bad_image: str = "error", background: int = 255):
        super().__init__(channels, on_bad_image, background)
        self.roots = {"train": self._check_dir(root, "data.path")}
        if test_root is not None:
            self.roots["test"] = self._check_dir(test_root, "data.test_path")
        self.parts = tuple(self.roots)
        names = sorted(d.name for d in self.roots["train"].iterdir() if d.is_dir() and _visible(d.name))
        if not names:
            raise ValueError(f"data.path: {self.roots['train']} has no class folders (expected <path>/<class>/<image>)")
        self._class_names = names
        if "test" in self.roots:
            extra = sorted(d.name for d in self.roots["test"].iterdir()
                           if d.is_dir() and _visible(d.name) and d.name not in names)
            if extra:
                raise ValueError(f"data.test_path: class folder(s) {extra} in {self.roots['test']} are not classes of "
                                 f"data.path ({names})")
        self._files: dict[str, list[tuple[Path, int]]] = {}

    @staticmethod
    def _check_dir(path: str | os.PathLike, field: str) -> Path:
        path = Path(path).expanduser()
        if not path.is_dir():
            layout = f"<{field.split('.')[-1]}>/<class>/<image>"
            raise FileNotFoundError(f"{field}: {path} is not a directory (expected {layout})")
        return path

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def files(self, part: str = "train") -> list[tuple[Path, int]]:
        """(image file, class index) of every image of the part, in sample order (listed once)."""
        if part not in self._files:
            root, field = self.roots[part], "data.path" if part == "train" else "data.test_path"
            files = []
            for label, name in enumerate(self.class_names):
                folder = root / name
                if part == "test" and not folder.is_dir():
                    continue  # a test set need not hold every class
                found = list_images(folder)
                if not found:
                    raise ValueError(f"{field}: class {name!r} has no images in {folder} (image files end with "
                                     f"{', '.join(IMAGE_SUFFIXES)}); remove the folder or add images")
                files += [(path, label) for path in found]
            self._files[part] = files
        return self._files[part]

    def _listing(self, part: str) -> Listing:
        root, files = self.roots[part], self.files(part)
        return Listing([path.relative_to(root).as_posix() for path, _ in files],
                       np.asarray([label for _, label in files], dtype=np.int64), [str(path) for path, _ in files])

    def _decode(self, ref: str, size: int | None) -> np.ndarray:
        return self._read_image(ref, ref, size)
