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
import stat
from pathlib import Path
import numpy as np

from synthset.data.images import IMAGE_SUFFIXES
from synthset.data.source_base import Listing, Source


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _printable(path: Path) -> str:
    """A path as an error can print it: bytes that are not UTF-8 shown as escapes (``\\xe9``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def list_images(folder: Path, root: Path | None = None, follow_links_outside: bool = False,
                field: str = "data.path") -> list[tuple[Path, str | None]]:
    """(image file, problem or None) for every image file anywhere below ``folder`` (hidden files and folders
    left out), sorted by relative path, each file once.

    Links are followed, with three rules: a directory link that leads back into a folder it lies in (a
    loop) is a ``ValueError`` naming it; a link whose target lies outside ``root`` (``data.path``) is a
    ``ValueError`` unless ``follow_links_outside``; a file reached by two paths (a link and its target) is
    listed once, under its first path. A file that is not a regular file (a FIFO, a device) or whose name is
    not valid UTF-8 is listed with its problem, for the source's bad-image policy to report.
    """
    real_root = os.path.realpath(root or folder)
    found: list[tuple[str, Path]] = []

    def walk(directory: Path, ancestors: frozenset) -> None:
        st = os.stat(directory)
        here = (st.st_dev, st.st_ino)
        target = os.path.realpath(directory)
        if not follow_links_outside and not _is_within(target, real_root):
            raise ValueError(f"{field}: {directory} is a link to {target}, outside {real_root}; move the images "
                             "in, or set data.follow_links_outside: true to read them where they are")
        if here in ancestors:
            raise ValueError(f"{field}: {directory} is a directory link that loops back to a folder it lies in "
                             f"({os.path.realpath(directory)}); remove the link")
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if not _visible(entry.name):
                continue
            path = Path(directory) / entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:  # a link loop on a file: reported with the file below
                is_dir = False
            if entry.is_symlink() and not follow_links_outside and not is_dir:  # directories: walk() checks
                target = os.path.realpath(path)
                if not _is_within(target, real_root):
                    raise ValueError(f"{field}: {path} is a link to {target}, outside {real_root}; move the images "
                                     "in, or set data.follow_links_outside: true to read them where they are")
            if is_dir:
                walk(path, ancestors | {here})
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                found.append((path.relative_to(folder).as_posix(), path))

    walk(folder, frozenset())
    out, seen = [], set()
    for _, path in sorted(found, key=lambda t: t[0]):
        try:
            st = os.stat(path)
        except OSError as err:  # a dangling link, a link loop on a file
            out.append((path, f"cannot read image ({type(err).__name__}: {err.strerror or err})"))
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue  # the same file by a second path (a link): once
        seen.add((st.st_dev, st.st_ino))
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file (a pipe, socket or device is never read)"
        else:
            try:
                str(path).encode("utf-8")
            except UnicodeEncodeError:
                problem = "its file name is not valid UTF-8; rename it"
        out.append((path, problem))
    return out


class ImageFolderSource(Source):
    """Images in ``root/<class>/…`` folders (and optionally ``test_root/<class>/…`` as the test part).

    ``root``/``test_root`` are ``data.path``/``data.test_path``; errors name those fields. The
    folders are listed once, on first use of a part: an empty class folder is a ``ValueError``
    naming the class.
    """

    def __init__(self, root: str | os.PathLike, test_root: str | os.PathLike | None = None, channels: int = 1,
                 on_bad_image: str = "error", background: int = 255, follow_links_outside: bool = False,
                 max_pixels: int | None = None):
        super().__init__(channels, on_bad_image, background, max_pixels)
        self.follow_links_outside = follow_links_outside
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

    def files(self, part: str = "train") -> list[tuple[Path, int, str | None]]:
        """(image file, class index, problem or None) of every image of the part, in sample order (listed once)."""
        if part not in self._files:
            root, field = self.roots[part], "data.path" if part == "train" else "data.test_path"
            files = []
            for label, name in enumerate(self.class_names):
                folder = root / name
                if part == "test" and not folder.is_dir():
                    continue  # a test set need not hold every class
                found = list_images(folder, root, self.follow_links_outside, field)
                if not found:
                    raise ValueError(f"{field}: class {name!r} has no images in {folder} (image files end with "
                                     f"{', '.join(IMAGE_SUFFIXES)}); remove the folder or add images")
                files += [(path, label, problem) for path, problem in found]
            self._files[part] = files
        return self._files[part]

    def _listing(self, part: str) -> Listing:
        root = self.roots[part]
        keys, labels, refs, skipped = [], [], [], []
        for path, label, problem in self.files(part):
            if problem is not None:
                skipped.append((len(keys), self._bad(_printable(path), problem)))
                continue
            keys.append(path.relative_to(root).as_posix())
            labels.append(label)
            refs.append(str(path))
        return Listing(keys, np.asarray(labels, dtype=np.int64), refs, skipped)

    def _decode(self, ref: str, size: int | None) -> np.ndarray:
        return self._read_image(ref, ref, size)
