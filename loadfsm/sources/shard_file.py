"""One safetensors file read with ``pread`` into buffers loadfsm owns.

No memory map: a file truncated by another writer while mapped kills the process
with SIGBUS when a page past the new end is touched. ``pread`` instead returns
short, which becomes a typed error naming the file and tensor. The header is
checked against the file size before any data is read, and the file's identity
(size, inode, mtime) is checked again after each tensor, so bytes from a file
rewritten during the load are never handed out.

Large reads are split across a pool of threads (``os.preadv`` releases the GIL), so
one tensor streams from the page cache at memory speed.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

from ..errors import CheckpointChangedError, CorruptCheckpointError, UnsafeCheckpointPathError
from ..plan import TensorEntry
from .checkpoint_files import open_regular
from .dtypes import DTYPES, ITEMSIZES

MAX_HEADER_BYTES = 100_000_000   # the limit safetensors itself enforces
READ_THREADS = min(16, os.cpu_count() or 1)   # 16 reach ~40 GB/s from the page cache (H200 host)
MIN_CHUNK_BYTES = 1 << 20        # smaller reads are not worth a thread hand-off


class ShardFile:
    """An open safetensors file: its validated header and positional reads.

    ``tensors``: what the header says of each tensor; ``offsets``: where in the file
    each tensor's data starts.

    ``identity``: the ``(st_dev, st_ino)`` the file had when its path was checked; a
    file swapped in since (a symlink re-pointed outside the checkpoint) is refused.
    """

    def __init__(self, path: str | Path, identity: tuple[int, int] | None = None):
        self.path = str(path)
        self._fd = open_regular(Path(path))
        try:
            st = os.fstat(self._fd)
            if identity is not None and (st.st_dev, st.st_ino) != identity:
                raise UnsafeCheckpointPathError("file replaced after its path was checked",
                                                file=self.path)
            self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            self.tensors, self.offsets = _parse_header(self._fd, st.st_size, self.path)
        except BaseException:
            os.close(self._fd)
            raise

    def read_into(self, name: str, out: torch.Tensor,
                  pool: ThreadPoolExecutor | None = None) -> None:
        """Fill the contiguous CPU uint8 tensor ``out`` with ``name``'s bytes."""
        self.read_range(name, self.offsets[name], out, pool)

    def read_range(self, name: str, offset: int, out: torch.Tensor,
                   pool: ThreadPoolExecutor | None = None) -> None:
        """Fill ``out`` from absolute ``offset``; checks the file did not change."""
        nbytes = out.numel()
        if nbytes:
            view = memoryview((ctypes.c_ubyte * nbytes).from_address(out.data_ptr())).cast("B")
            step = max(MIN_CHUNK_BYTES, -(-nbytes // READ_THREADS))   # one share per thread
            chunks = [(view[i:i + step], offset + i) for i in range(0, nbytes, step)]
            if pool is None or len(chunks) == 1:
                for chunk, at in chunks:
                    self._pread(name, chunk, at)
            else:
                futures = [pool.submit(self._pread, name, c, at) for c, at in chunks]
                try:
                    for future in futures:
                        future.result()
                finally:
                    wait(futures)   # no write into ``out`` outlives this call (error, Ctrl-C)
        self.check_unchanged(name)

    def prefetch(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading ``nbytes`` from ``offset`` into the page cache
        now (``POSIX_FADV_WILLNEED``: asynchronous, a no-op for cached pages), so a cold
        read keeps the disk busy across tensor boundaries."""
        if nbytes and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    def _pread(self, name: str, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            try:
                got = os.preadv(self._fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise CheckpointChangedError(f"read failed: {exc}", tensor=name,
                                             file=self.path) from exc
            if got == 0:
                raise CheckpointChangedError(
                    f"file ended at byte {offset + done} inside the tensor: truncated "
                    f"during the load", tensor=name, file=self.path)
            done += got

    def check_unchanged(self, name: str | None = None) -> None:
        """Raise if another writer truncated, grew or rewrote the file since it was opened."""
        st = os.fstat(self._fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
            raise CheckpointChangedError(
                f"file changed during the load (size {self._identity[2]} -> {st.st_size})",
                tensor=name, file=self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _parse_header(fd: int, size: int,
                  file: str) -> tuple[dict[str, TensorEntry], dict[str, int]]:
    """The header's tensors and the absolute offset of each one's data, every offset
    checked against ``size`` and each other."""
    def bad(message: str, tensor: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"invalid safetensors header: {message}",
                                      tensor=tensor, file=file)

    if size < 8:
        raise bad(f"file is {size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise bad(f"header length {length} exceeds the file ({size} bytes) or the limit")
    raw = os.pread(fd, length, 8)
    if len(raw) != length:
        raise CheckpointChangedError("file shrank while its header was read", file=file)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad(f"a JSON {type(header).__name__}, not an object")
    base, data_size = 8 + length, size - 8 - length
    fields: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ must map strings to strings")
            continue
        fields[name] = _fields(name, info, data_size, bad)
    spans = sorted((start, end, n) for n, (_, _, start, end) in fields.items() if end > start)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise bad(f"data of {first!r} and {second!r} overlap", tensor=second)
    tensors: dict[str, TensorEntry] = {}
    for name, (dtype_name, shape, _, _) in sorted(fields.items()):   # name order, as safetensors
        if dtype_name not in DTYPES:
            raise CorruptCheckpointError(f"unsupported dtype {dtype_name}", tensor=name,
                                         file=file)
        tensors[name] = TensorEntry(name, shape, DTYPES[dtype_name], file)
    return tensors, {name: base + start for name, (_, _, start, _) in fields.items()}


def _fields(name: str, info, data_size: int, bad) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype name, shape, start, end)`` of one header entry, offsets relative to the data."""
    if not isinstance(info, dict):
        raise bad(f"entry is a {type(info).__name__}, not an object", name)
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in ITEMSIZES:
        raise bad(f"unknown dtype {dtype_name!r}", name)
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers", name)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_count(n) for n in offsets) or offsets[0] > offsets[1]):
        raise bad(f"data_offsets {offsets!r} are not [start, end]", name)
    itemsize = ITEMSIZES[dtype_name]
    numel = 1
    for n in shape:
        numel *= n
    start, end = offsets
    if end - start != numel * itemsize:
        raise bad(f"data_offsets {offsets} hold {end - start} bytes; shape {shape} of "
                  f"{dtype_name} needs {numel * itemsize}", name)
    if end > data_size:
        raise bad(f"data_offsets {offsets} run past the end of the file's "
                  f"{data_size} data bytes", name)
    return dtype_name, tuple(shape), start, end


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice")
    return dict(pairs)
