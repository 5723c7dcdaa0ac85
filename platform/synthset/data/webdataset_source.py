"""The ``webdataset`` source: existing local WebDataset shards (``.tar`` files) as real images.

::

    data:
      source: webdataset
      path: /data/shards/train-{000000..000031}.tar   # or a directory of .tar files, or a glob: /data/shards/*.tar
      test_path: /data/shards/test-*.tar               # optional; else data.test_fraction of path is the test set
      label_key: null                                  # null: <key>.cls; "label": the "label" field of <key>.json

A shard is a tar file whose members are grouped into samples by key, the WebDataset way: the
member ``dir/abc.seg.png`` belongs to sample ``dir/abc`` with extension ``seg.png``, and a
sample's members are consecutive. A sample's image is its first member with an image extension
(``images.IMAGE_SUFFIXES``); its label is the integer in ``<key>.cls`` or, with
``data.label_key``, that field of ``<key>.json`` (an integer class index or a class-name string).
A sample's key in this source is ``<shard file name>/<sample key>``, unique even when two
shards reuse a sample key.

Shards are read with the standard library's ``tarfile``, one member at a time, without
extracting anything to disk and without unpickling: only image, ``.cls`` and ``.json``
members are read, every other member (``.pyd``, ``.pickle``, ``.npy`` …) is skipped unread.

Class names, in order of preference: ``data.class_names``; the ``class_names`` of a
``manifest.json`` beside the shards (synthset's own synthetic datasets have one); the sorted
distinct labels when they are strings; ``"0"`` … ``"<max>"`` when they are integers. The last
two need one pass over the label members (not the images) of every shard.
"""

from __future__ import annotations

import glob
import json
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from synthset.data.images import IMAGE_SUFFIXES, BadImage
from synthset.data.source_base import Listing, Source

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_IMAGE_EXTENSIONS = {s.lstrip(".") for s in IMAGE_SUFFIXES}


def expand_shards(pattern: str, field: str = "data.path") -> list[Path]:
    """The shard files ``pattern`` names: a directory (its .tar files), one file, or a brace/glob pattern.

    Braces expand first (``{000000..000009}``, ``{a,b}``), in their order; each result is then
    globbed (``*``, ``?``, ``[…]``) and its matches sorted. Raises ``FileNotFoundError`` naming
    ``field`` when nothing matches.
    """
    if "://" in pattern:
        raise ValueError(f"{field}: {pattern!r}: the webdataset source reads local shards only")
    path = Path(pattern).expanduser()
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SHARD_SUFFIXES))
    elif path.is_file():
        shards = [path]
    else:
        from braceexpand import braceexpand  # a dependency of the webdataset package

        shards, seen = [], set()
        for expanded in braceexpand(str(path)):
            for match in sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]:
                if Path(match).is_file() and match not in seen:
                    seen.add(match)
                    shards.append(Path(match))
    if not shards:
        raise FileNotFoundError(f"{field}: no shard files match {pattern!r} (expected a directory of .tar files, "
                                "a .tar file, or a brace/glob pattern such as shards/train-{000000..000009}.tar)")
    return shards


def _split_member(name: str) -> tuple[str, str]:
    """``"dir/abc.seg.png"`` → (``"dir/abc"``, ``"seg.png"``): key up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_samples(shard: Path, want) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(sample key, {extension: payload}) for each sample of a shard, reading only members ``want(ext)`` accepts.

    Consecutive members with the same key form one sample. Payloads are read into memory; nothing
    is extracted to disk, so member names (even ``../x``) never touch the file system.
    """
    for key, members in iter_tar_members(shard, want, keep=lambda ext: False):
        yield key, {ext: payload for ext, (_, payload) in members.items()}


def iter_tar_members(shard: Path, read, keep=lambda ext: True) -> Iterator[tuple[str, dict[str, tuple]]]:
    """(sample key, {extension: (TarInfo, payload or None)}) per sample of a shard, in file order.

    Members ``keep(ext)`` rejects are left out; of those kept, only the payloads ``read(ext)`` accepts
    are read (the others give None, their ``TarInfo.offset_data`` says where they are). The first member
    of each extension counts. Errors name the shard.
    """
    key, members = None, {}
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            for info in tar:
                if not info.isfile() or info.name.rpartition("/")[2].startswith("."):
                    continue
                member_key, ext = _split_member(info.name)
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                if (read(ext) or keep(ext)) and ext not in members:
                    if read(ext) and info.size > MAX_LABEL_BYTES:
                        raise ValueError(f"{shard}:{info.name}: a {info.size:,}-byte .{ext} member (at most "
                                         f"{MAX_LABEL_BYTES:,} are read for a label)")
                    members[ext] = (info, tar.extractfile(info).read() if read(ext) else None)
    except (tarfile.TarError, OSError, EOFError) as err:
        # A damaged shard is not one bad image: data.on_bad_image does not skip it.
        raise ValueError(f"{shard}: unreadable tar file ({type(err).__name__}: {err})") from None
    if key is not None:
        yield key, members


# What is read of one member: a label (.cls, .json) and an image; a bigger one (a .tar.gz bomb) is refused.
MAX_LABEL_BYTES = 1 << 20
MAX_IMAGE_BYTES = 256 << 20


def _safe_key(key: str) -> str:
    """A tar member's sample key as a source key: no absolute path, no ``..``, no empty segment."""
    import posixpath

    parts = [p for p in posixpath.normpath("/" + key).split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


def _is_image(ext: str) -> bool:
    return ext.rpartition(".")[2] in _IMAGE_EXTENSIONS


class WebDatasetSource(Source):
    """Samples of local WebDataset shards; ``path``/``test_path`` are ``data.path``/``data.test_path``.

    ``label_key``: None reads ``.cls``; a name reads that field of ``.json``. ``class_names``:
    ``data.class_names`` (None: from a manifest or the labels, see the module docstring).
    """

    def __init__(self, path: str, test_path: str | None = None, label_key: str | None = None,
                 class_names: list[str] | None = None, channels: int = 1, on_bad_image: str = "error",
                 background: int = 255, max_pixels: int | None = None):
        super().__init__(channels, on_bad_image, background, max_pixels)
        self.shards = {"train": expand_shards(path, "data.path")}
        if test_path is not None:
            self.shards["test"] = expand_shards(test_path, "data.test_path")
        self.parts = tuple(self.shards)
        self.path, self.label_key = path, label_key
        self._class_names = list(class_names) if class_names else None
        self._open = None  # (shard, its byte stream, the raw file): the shard _member_bytes last read

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = self._manifest_class_names() or self._scan_class_names()
        return self._class_names

    def _manifest_class_names(self) -> list[str] | None:
        manifest = Path(self.path).expanduser() / "manifest.json"
        if not manifest.is_file():
            return None
        try:
            names = json.loads(manifest.read_text()).get("class_names")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"data.path: {manifest}: unreadable manifest ({err})") from None
        return [str(n) for n in names] if names else None

    def _label_ext(self) -> str:
        return "cls" if self.label_key is None else "json"

    def _raw_label(self, members: dict[str, bytes]) -> int | str:
        """The sample's label as stored (an int, or a string class name); ``ValueError`` says what is wrong."""
        ext = self._label_ext()
        if ext not in members:
            hint = " (set data.label_key to read it from .json)" if ext == "cls" else ""
            raise ValueError(f"no .{ext} member{hint}")
        if ext == "cls":
            text = members["cls"].decode("utf-8", "replace").strip()
            try:
                return int(text)
            except ValueError:
                raise ValueError(f".cls holds {text[:40]!r}, not an integer class index") from None
        try:
            meta = json.loads(members["json"])
        except ValueError as err:
            raise ValueError(f".json is not valid JSON ({err})") from None
        if not isinstance(meta, dict) or self.label_key not in meta:
            raise ValueError(f".json has no field {self.label_key!r} (data.label_key)")
        value = meta[self.label_key]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f".json field {self.label_key!r} is {value!r}, not a class index or class name")
        return value

    def _scan_class_names(self) -> list[str]:
        """Class names from the labels themselves: one pass over the label members of every shard."""
        labels: set = set()
        ext = self._label_ext()
        for shards in self.shards.values():
            for shard in shards:
                for _, members in iter_tar_samples(shard, lambda e: e == ext):
                    try:
                        labels.add(self._raw_label(members))
                    except ValueError:
                        pass  # reported (or skipped) by samples(), with the sample's name
        if not labels:
            where = "<key>.cls" if self.label_key is None else f"the {self.label_key!r} field of <key>.json"
            raise ValueError(f"data.path: no labelled samples in {self.path!r} (labels come from {where})")
        if all(isinstance(v, str) for v in labels):
            return sorted(labels)
        if all(isinstance(v, int) for v in labels):
            if min(labels) < 0:
                raise ValueError(f"data.path: negative class index {min(labels)} in {self.path!r}")
            return [str(i) for i in range(max(labels) + 1)]
        raise ValueError(f"data.path: {self.path!r} mixes integer and string labels; set data.class_names")

    def _label_index(self, value: int | str) -> int:
        names = self.class_names
        if isinstance(value, str):
            if value not in names:
                raise ValueError(f"label {value!r} is not one of the class names {names}")
            return names.index(value)
        if not 0 <= value < len(names):
            raise ValueError(f"class index {value} outside 0..{len(names) - 1} ({len(names)} class names)")
        return value

    def _listing(self, part: str) -> Listing:
        """Reads the label members only; each image member is located (shard, offset, size), not read."""
        label_ext = self._label_ext()
        keys, labels, refs, skipped = [], [], [], []
        for shard in self.shards[part]:
            for key, members in iter_tar_members(shard, lambda e: e == label_ext, _is_image):
                name = f"{shard}:{key}"
                image_ext = next((e for e in members if _is_image(e)), None)
                if image_ext is None:
                    skipped.append((len(keys), self._bad(name, "sample has no image member")))
                    continue
                try:
                    label = self._label_index(self._raw_label({e: p for e, (_, p) in members.items()}))
                except ValueError as err:
                    skipped.append((len(keys), self._bad(name, str(err))))
                    continue
                info = members[image_ext][0]
                keys.append(f"{shard.name}/{_safe_key(key)}")
                labels.append(label)
                refs.append((str(shard), f"{key}.{image_ext}", info.offset_data, info.size))
        return Listing(keys, np.asarray(labels, dtype=np.int64), refs, skipped)

    def _decode(self, ref, size: int | None) -> np.ndarray:
        shard, member, offset, length = ref
        if length > MAX_IMAGE_BYTES:
            raise BadImage(f"{shard}:{member}", f"a {length:,}-byte image member, over the {MAX_IMAGE_BYTES:,} "
                                               "bytes read for one image")
        return self._read_image(self._member_bytes(shard, offset, length), f"{shard}:{member}", size)

    def _member_bytes(self, shard: str, offset: int, length: int) -> bytes:
        """A member's payload by its offset. The shard's file stays open for the next member: a task reads
        its members in shard order, so a compressed shard is decompressed once, not once per member."""
        if self._open is None or self._open[0] != shard:
            self.close()
            raw = open(shard, "rb")
            self._open = (shard, tarfile.open(fileobj=raw, mode="r:*").fileobj, raw)
        f = self._open[1]
        try:
            f.seek(offset)
            data = f.read(length)
        except (OSError, EOFError) as err:
            raise ValueError(f"{shard}: unreadable tar file ({type(err).__name__}: {err})") from None
        if len(data) != length:
            raise ValueError(f"{shard}: unreadable tar file (member at {offset} is cut short)")
        return data

    def close(self) -> None:
        if self._open is not None:
            self._open[2].close()
            self._open = None
