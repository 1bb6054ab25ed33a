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
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointChangedError, CorruptCheckpointError, UnsafeCheckpointPathError
from .checkpoint_files import open_regular

MAX_HEADER_BYTES = 100_000_000   # the limit safetensors itself enforces
READ_THREADS = min(16, os.cpu_count() or 1)   # 16 reach ~40 GB/s from the page cache (H200 host)
MIN_CHUNK_BYTES = 1 << 20        # smaller reads are not worth a thread hand-off

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ITEMSIZE = {"U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "C64": 8}   # valid, not loadable


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a header; ``dtype`` is ``None`` for a type loadfsm cannot load."""

    dtype_name: str
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    start: int      # absolute file offsets
    end: int


class ShardFile:
    """An open safetensors file: its validated header and positional reads.

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
            self.tensors = _parse_header(self._fd, st.st_size, self.path)
        except BaseException:
            os.close(self._fd)
            raise

    def read_into(self, name: str, out: torch.Tensor,
                  pool: ThreadPoolExecutor | None = None) -> None:
        """Fill the contiguous CPU uint8 tensor ``out`` with ``name``'s bytes."""
        entry = self.tensors[name]
        self.read_range(name, entry.start, out, pool)

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


def _parse_header(fd: int, size: int, file: str) -> dict[str, HeaderEntry]:
    """The header's tensors, every offset checked against ``size`` and each other."""
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
    entries: dict[str, HeaderEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ must map strings to strings")
            continue
        entries[name] = _entry(name, info, base, data_size, bad)
    spans = sorted((e.start, e.end, n) for n, e in entries.items() if e.end > e.start)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise bad(f"data of {first!r} and {second!r} overlap", tensor=second)
    return entries


def _entry(name: str, info, base: int, data_size: int, bad) -> HeaderEntry:
    if not isinstance(info, dict):
        raise bad(f"entry is a {type(info).__name__}, not an object", name)
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or (dtype_name not in DTYPES
                                           and dtype_name not in _ITEMSIZE):
        raise bad(f"unknown dtype {dtype_name!r}", name)
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers", name)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_count(n) for n in offsets) or offsets[0] > offsets[1]):
        raise bad(f"data_offsets {offsets!r} are not [start, end]", name)
    dtype = DTYPES.get(dtype_name)
    itemsize = dtype.itemsize if dtype is not None else _ITEMSIZE[dtype_name]
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
    return HeaderEntry(dtype_name, dtype, tuple(shape), base + start, base + end)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice")
    return dict(pairs)
