"""The ``hf`` source: a Hugging Face ``datasets`` dataset, from a local directory or the hub.

::

    data:
      source: hf
      path: /data/beans-saved      # a save_to_disk directory (load_from_disk), or a hub id such as "beans"
      split: train                 # the training images
      test_split: test             # optional; None: data.test_fraction of `split` is the test set
      image_column: image
      label_column: labels

A ``path`` that exists locally (or starts with ``/``, ``.`` or ``~``) is read with
``datasets.load_from_disk``; anything else is taken as a hub id and read with
``datasets.load_dataset``, which needs the network (or the local Hugging Face cache).

The image column may be an ``Image`` feature (its encoded bytes are decoded here, through
``images.read_image``, so a corrupt image is reported by row and follows ``data.on_bad_image``),
or hold uint8 arrays (H, W) / (H, W, C). The label column may be a ``ClassLabel`` (its names are
the class names), integers (class names from ``data.class_names``, else ``"0"`` … ``"<max>"``)
or strings (class names: ``data.class_names``, else the sorted distinct labels).
A sample's key is ``"<split>/<row>"``.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
from PIL import Image

from synthset.data.images import BadImage
from synthset.data.source_base import Listing, Source


def load_hf_dataset(path: str):
    """``load_from_disk(path)`` for a local directory, else ``load_dataset(path)`` (a hub id).

    Errors name ``data.path``. Returns a ``Dataset`` or a ``DatasetDict``.
    """
    import datasets

    local = Path(path).expanduser()
    if local.exists() or path.startswith(("/", ".", "~")):
        if not local.is_dir():
            raise FileNotFoundError(f"data.path: {local} is not a directory written by datasets' save_to_disk")
        try:
            return datasets.load_from_disk(str(local))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise ValueError(f"data.path: {local} is not a datasets directory (save_to_disk) ({err})") from None
    try:
        return datasets.load_dataset(path)
    except Exception as err:  # offline, unknown id, gated repo: many exception types, one message
        raise ValueError(f"data.path: cannot load {path!r} from the Hugging Face hub ({type(err).__name__}: {err}); "
                         "give a local save_to_disk directory instead where the network is not reachable") from None


class HFSource(Source):
    """A ``datasets`` dataset: ``split`` is the train part and ``test_split`` (if any) the test part.

    Arguments mirror ``data.path``, ``data.split``, ``data.test_split``, ``data.image_column``,
    ``data.label_column`` and ``data.class_names``; errors name those fields.
    """

    def __init__(self, path: str, split: str = "train", test_split: str | None = None,
                 image_column: str = "image", label_column: str = "label", class_names: list[str] | None = None,
                 channels: int = 1, on_bad_image: str = "error", background: int = 255, max_pixels: int | None = None):
        import datasets

        super().__init__(channels, on_bad_image, background, max_pixels)
        self.path, self.image_column, self.label_column = path, image_column, label_column
        loaded = load_hf_dataset(path)
        wanted = {"train": (split, "data.split")}
        if test_split is not None:
            wanted["test"] = (test_split, "data.test_split")
        self.datasets, self.split_names = {}, {}
        for part, (name, field) in wanted.items():
            if isinstance(loaded, datasets.DatasetDict):
                if name not in loaded:
                    raise ValueError(f"{field}: {path!r} has no split {name!r} (it has {', '.join(loaded)})")
                ds = loaded[name]
            elif part == "train":
                ds = loaded  # a single saved Dataset: it is the training part, whatever data.split says
            else:
                raise ValueError(f"{field}: {path!r} is a single dataset without splits; set data.test_split: null")
            self.datasets[part], self.split_names[part] = self._checked(ds, path, name), name
        self.parts = tuple(self.datasets)
        self._class_names = self._find_class_names(class_names)

    def _checked(self, ds, path: str, split: str):
        """``ds`` with the two columns checked and an Image column left encoded (we decode it ourselves)."""
        import datasets

        for column, field in ((self.image_column, "data.image_column"), (self.label_column, "data.label_column")):
            if column not in ds.column_names:
                raise ValueError(f"{field}: {path!r} split {split!r} has no column {column!r} "
                                 f"(columns: {', '.join(ds.column_names)})")
        ds = ds.select_columns([self.image_column, self.label_column])
        if isinstance(ds.features[self.image_column], datasets.Image):
            # Decoding here rather than in datasets makes a corrupt image a named, skippable error.
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        return ds

    def _find_class_names(self, given: list[str] | None) -> list[str]:
        import datasets

        feature = self.datasets["train"].features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            if given is not None and list(given) != list(feature.names):
                raise ValueError(f"data.class_names: {given} differ from the ClassLabel names {feature.names} of "
                                 f"column {self.label_column!r}; leave data.class_names unset")
            return list(feature.names)
        if given is not None:
            return list(given)
        values = set()
        for ds in self.datasets.values():
            values.update(ds.unique(self.label_column))
        values.discard(None)
        if values and all(isinstance(v, str) for v in values):
            return sorted(values)
        if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            if min(values) < 0:
                raise ValueError(f"data.label_column: negative class index {min(values)} in {self.path!r}")
            return [str(i) for i in range(int(max(values)) + 1)]
        raise ValueError(f"data.label_column: column {self.label_column!r} of {self.path!r} holds neither class "
                         "indices nor class names only; set data.class_names or choose another column")

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def _label_index(self, value) -> int:
        names = self._class_names
        if isinstance(value, str):
            if value not in names:
                raise ValueError(f"label {value!r} is not one of the class names {names}")
            return names.index(value)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"label {value!r} is not a class index or class name")
        if not 0 <= value < len(names):
            raise ValueError(f"class index {value} outside 0..{len(names) - 1} ({len(names)} class names)")
        return int(value)

    def _image_input(self, value, name: str):
        """What ``read_image`` takes for one cell of the image column: bytes, a file path or a PIL image."""
        if isinstance(value, dict):  # an undecoded Image feature: {"bytes": …, "path": …}
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                return value["path"]
            raise ValueError("image cell has neither bytes nor a path")
        if isinstance(value, Image.Image):
            return value
        array = np.asarray(value)
        if array.dtype.kind in "iu" and array.size and 0 <= array.min() and array.max() <= 255:
            array = array.astype(np.uint8)  # a uint8 Array feature or nested lists come back as Python ints
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ValueError(f"image cell is a {array.dtype} array of shape {array.shape}; expected uint8 (H, W[, C])")
        try:
            return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
        except (TypeError, ValueError) as err:  # e.g. 2 or 5 channels: no PIL mode fits
            raise ValueError(f"image cell of shape {array.shape} is not an image ({err})") from None

    def _name(self, part: str, row: int) -> str:
        return f"{self.path}[{self.split_names[part]}][{row}]"

    def _listing(self, part: str) -> Listing:
        """Reads the label column only; images are decoded by row (``_decode``)."""
        split, ds = self.split_names[part], self.datasets[part]
        digits = len(str(max(len(ds) - 1, 0)))
        keys, labels, refs, skipped = [], [], [], []
        for row, value in enumerate(ds[self.label_column]):
            try:
                label = self._label_index(value)
            except ValueError as err:
                skipped.append((len(keys), self._bad(self._name(part, row), str(err))))
                continue
            keys.append(f"{split}/{row:0{digits}d}")
            labels.append(label)
            refs.append((part, row))
        return Listing(keys, np.asarray(labels, dtype=np.int64), refs, skipped)

    def _decode(self, ref, size: int | None) -> np.ndarray:
        part, row = ref
        name = self._name(part, row)
        try:
            data = self._image_input(self.datasets[part][row][self.image_column], name)
        except ValueError as err:
            raise BadImage(name, str(err)) from None
        return self._read_image(data, name, size)
