"""Which files a checkpoint path names, confined to the checkpoint.

An index file is data from whoever published the checkpoint: its entries may name
only regular files inside the checkpoint directory (after resolving symlinks), so a
hostile or careless index cannot make a load read another model's weights, a FIFO
that never ends, or ``/etc/passwd``. A Hugging Face cache snapshot links its files
into the repository's ``blobs`` folder; that folder counts as inside.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

from ..errors import (CorruptCheckpointError, TraceOverwritesInputError,
                      UnsafeCheckpointPathError)

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20     # a weight_map of a million names is about 100 MB less


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; the type is checked on the
    opened descriptor, so swapping the file between a check and the open changes nothing.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot open checkpoint file: {exc.strerror}",
                                     file=str(path)) from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeCheckpointPathError(f"not a regular file ({_kind(mode)})", file=str(path))
    os.set_blocking(fd, True)
    return fd


def refuse_overwrite(output, inputs: list[Path]) -> None:
    """Raise if the path ``output`` (a trace file; ``None`` or ``True`` are no path) is
    one of ``inputs``; called before it is opened for writing."""
    if output is None or isinstance(output, bool) or not os.path.exists(output):
        return
    for file in inputs:
        if os.path.samefile(output, file):
            raise TraceOverwritesInputError(
                f"the trace path {str(output)!r} is a file this load reads; writing the "
                f"trace would destroy it", file=str(file))


def checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str], Path | None,
                                          dict[str, tuple[int, int]]]:
    """``(shards, index, index file, identities)`` of a checkpoint file or directory.

    ``index`` maps each tensor name to its shard as the index names it (empty without
    an index). Every shard is a regular file inside the checkpoint; ``identities`` holds
    each one's ``(st_dev, st_ino)`` as checked, so the open can prove it is the same file.
    """
    if path.is_dir():
        return _directory(path)
    if not path.exists():
        raise CorruptCheckpointError("checkpoint path does not exist", file=str(path))
    fd = open_regular(path)        # the caller named this file: only its type is checked
    st = os.fstat(fd)
    os.close(fd)
    return [path], {}, None, {str(path): (st.st_dev, st.st_ino)}


def _directory(path: Path):
    roots = _roots(path)
    index_file = path / INDEX_NAME
    if index_file.exists() or index_file.is_symlink():
        weight_map = _weight_map(_confined(path, INDEX_NAME, roots)[0])
        checked = {f: _confined(path, f, roots) for f in dict.fromkeys(weight_map.values())}
        index = {name: str(checked[file][0]) for name, file in weight_map.items()}
    else:
        checked = {p.name: _confined(path, p.name, roots) for p in path.glob("*.safetensors")}
        index, index_file = {}, None
        if not checked:
            raise CorruptCheckpointError("no .safetensors files in directory", file=str(path))
    files = sorted({target for target, _ in checked.values()})
    identities = {str(target): identity for target, identity in checked.values()}
    return files, index, index_file, identities


def _roots(path: Path) -> list[Path]:
    root = path.resolve()
    if root.parent.name == "snapshots":           # huggingface_hub cache layout
        return [root, root.parent.parent / "blobs"]
    return [root]


def _confined(directory: Path, name: str, roots: list[Path]) -> tuple[Path, tuple[int, int]]:
    """``directory / name`` and its ``(st_dev, st_ino)`` if it is a regular file inside the
    checkpoint; refused otherwise."""
    where = str(directory / name)
    parts = PurePosixPath(name).parts
    if not name or "\0" in name or PurePosixPath(name).is_absolute() or ".." in parts:
        raise UnsafeCheckpointPathError(
            f"the index names {name!r}, outside the checkpoint directory", file=where)
    target = directory / name
    if not target.exists() and not target.is_symlink():
        raise CorruptCheckpointError("shard named by the index is missing", file=where)
    real = target.resolve()
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise UnsafeCheckpointPathError(
            f"{name!r} links to {real}, outside the checkpoint directory", file=where)
    st = real.stat()
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeCheckpointPathError(f"not a regular file ({_kind(st.st_mode)})", file=where)
    return target, (st.st_dev, st.st_ino)


def _weight_map(index_file: Path) -> dict[str, str]:
    fd = open_regular(index_file)
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read index: {exc}", file=str(index_file)) from exc
    if len(raw) > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"index larger than {MAX_INDEX_BYTES} bytes",
                                     file=str(index_file))
    try:
        weight_map = json.loads(raw)["weight_map"]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CorruptCheckpointError(f"unreadable index: {exc!r}", file=str(index_file)) from exc
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(
            f"index weight_map is a {type(weight_map).__name__}, not an object",
            file=str(index_file))
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CorruptCheckpointError(
                f"index names {file!r} as the file of a tensor: not a string",
                tensor=name, file=str(index_file))
    return weight_map


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"
