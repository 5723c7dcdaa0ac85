"""Artifacts on any pyarrow filesystem: a local path, ``file://``, ``s3://``, ``gs://``.

Every write goes to a temporary name and is renamed when complete, so a reader never sees a
partial file under its final name and a killed job leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI or a local path (made absolute)."""
    uri = str(uri)
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _location(uri: str) -> tuple[str, str]:
    """(filesystem, normalised absolute path) of ``uri``: ``("", path)`` for local paths and ``file://``,
    ``("s3://bucket", "/key/prefix")`` for a remote URI. Purely lexical: ``..`` is folded, links are not followed."""
    uri = str(uri)
    if is_local(uri):
        return "", os.path.normpath(os.path.abspath(os.path.expanduser(local_path(uri))))
    scheme, rest = uri.split("://", 1)
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}", posixpath.normpath("/" + key)


def is_within(root: str, uri: str, resolve_links: bool = False) -> bool:
    """Whether ``uri`` is ``root`` or lies below it (same filesystem, same bucket; ``..`` folded first).

    ``resolve_links``: for local paths, compare where symbolic links really lead (a link inside the root
    that points elsewhere is outside)."""
    (root_fs, root_path), (fs, path) = _location(root), _location(uri)
    if resolve_links and fs == root_fs == "":
        root_path, path = os.path.realpath(root_path), os.path.realpath(path)
    return fs == root_fs and (path == root_path or path.startswith(root_path.rstrip("/") + "/"))


# Local directories no run may write into as its root (the filesystem's own and the user's home).
SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run",
               "/sbin", "/sys", "/usr", "/var", "/snap", "/srv", "/opt", "/root", "/home", "/tmp", "/mnt", "/media")


def root_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be a root that a run writes everything under (None when it can): the filesystem's
    root, a system directory or a home directory itself, or a bucket without a prefix — a run needs a
    directory of its own. Links are resolved first (a link to ``/`` is ``/``)."""
    fs, path = _location(uri)
    if fs:
        return None if path.strip("/") else f"{uri} is a whole bucket; give a prefix (s3://bucket/project/run)"
    real = os.path.realpath(path)
    if real in SYSTEM_DIRS or real == os.path.realpath(os.path.expanduser("~")):
        shown = path if real == path else f"{path} (a link to {real})"
        return f"{shown} is a system or home directory; give a directory of the project's own (e.g. runs/my-run)"
    return None


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def exists_or_explain(uri: str, field: str) -> bool:
    """``exists(uri)``, with a storage error (no credentials, an unknown bucket, no network) turned into one
    line that names the config ``field`` instead of a filesystem library's traceback."""
    try:
        return exists(uri)
    except (OSError, ValueError) as err:  # pyarrow raises OSError (and ArrowInvalid, a ValueError) for these
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"{field}: cannot reach {uri} ({first})") from None


def delete(uri: str) -> None:
    """Remove one file if it exists."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (temporary name, then rename)."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_parts(uri: str, parts) -> None:
    """Write the concatenation of ``parts`` (an iterable of bytes) to ``uri`` atomically, one part in memory at
    a time (an audit of a million rows, gathered from its per-shard parts)."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        for part in parts:
            f.write(part)
    fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(obj, indent=1, sort_keys=False).encode())


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs/paths of the files directly under ``uri`` ending with ``suffix``."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    prefix = uri.rstrip("/") if "://" in str(uri) else path
    return sorted(f"{prefix}/{i.base_name}" for i in infos
                  if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def delete_dir_contents(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(path)


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (no-op when they are the same place)."""
    local_dir = Path(local_dir).resolve()
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem) and Path(path) == local_dir:
        return
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            write_bytes(join(uri, *f.relative_to(local_dir).parts), f.read_bytes())


def local_path(uri: str) -> str:
    """The filesystem path of a local ``uri`` (a plain path or ``file://``); remote URIs raise."""
    if not is_local(uri):
        raise ValueError(f"{uri}: this stage needs a local or mounted path")
    return uri[len("file://"):] if uri.startswith("file://") else uri


def materialize(uri: str, cache_root: str | os.PathLike = "~/.cache/synthset/artifacts") -> str:
    """A local directory with the files under ``uri``: the path itself when local, else a cached copy."""
    if is_local(uri):
        return local_path(uri)
    import hashlib

    target = Path(cache_root).expanduser() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        return str(target)
    fs, path = resolve(uri)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            dest = target / info.path[len(path):].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src:
                dest.write_bytes(src.read())
    (target / ".complete").write_text(uri)
    return str(target)
