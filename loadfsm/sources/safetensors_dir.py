"""Safetensors checkpoints: one file, or a directory of shards (index optional).

Headers are read up front (names, shapes, dtypes; no data) so the session can
plan. Data is read tensor by tensor in the order the session asks for, which
groups the pieces of one layer even when shards interleave them.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CorruptCheckpointError, DuplicateWeightError
from ..plan import TensorEntry
from .pinned import PinnedRing

PINNED_MAX_BYTES = 1 << 30   # larger tensors go through pageable memory

INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsSource:
    """Streams tensors from safetensors files; never reads a whole shard at once."""

    def __init__(self, path: str | Path, *, device: torch.device | str | None = None):
        self.path = Path(path)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._maps: dict[str, tuple[mmap.mmap, int, dict]] = {}
        self._index: dict[str, str] = {}
        self._files = self._resolve_files()
        self._handles: dict[str, object] = {}
        self._entries: dict[str, TensorEntry] | None = None

    def _resolve_files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            raise CorruptCheckpointError("checkpoint path does not exist", file=str(self.path))
        index_file = self.path / INDEX_NAME
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptCheckpointError(f"unreadable index: {exc}",
                                             file=str(index_file)) from exc
            self._index = {name: str(self.path / file) for name, file in weight_map.items()}
            files = sorted({self.path / file for file in weight_map.values()})
            for file in files:
                if not file.exists():
                    raise CorruptCheckpointError("shard named by the index is missing",
                                                 file=str(file))
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CorruptCheckpointError("no .safetensors files in directory",
                                         file=str(self.path))
        return files

    def _open(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(file, framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CorruptCheckpointError(f"cannot open safetensors file: {exc}",
                                             file=file) from exc
            self._handles[file] = handle
        return handle

    def entries(self) -> dict[str, TensorEntry]:
        if self._entries is None:
            entries: dict[str, TensorEntry] = {}
            for path in self._files:
                file = str(path)
                handle = self._open(file)
                for name in handle.keys():
                    if name in entries:
                        raise DuplicateWeightError("tensor appears in two files", tensor=name,
                                                   file=f"{entries[name].file} and {file}")
                    info = handle.get_slice(name)
                    dtype = _DTYPES.get(info.get_dtype())
                    if dtype is None:
                        raise CorruptCheckpointError(f"unsupported dtype {info.get_dtype()}",
                                                     tensor=name, file=file)
                    entries[name] = TensorEntry(name, tuple(info.get_shape()), dtype, file)
            for name, file in self._index.items():
                if name in entries and entries[name].file != file:
                    raise CorruptCheckpointError(
                        f"index places the tensor in {file} but it is in {entries[name].file}",
                        tensor=name, file=file)
            self._entries = entries
        return self._entries

    def index(self) -> dict[str, str]:
        return dict(self._index)

    def read(self, order: Iterable[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        entries = self.entries()
        names = list(entries if order is None else order)
        if self.device.type == "cuda":
            yield from self._read_pinned(names)
            return
        for name in names:
            yield name, self._get(name)

    def _get(self, name: str) -> torch.Tensor:
        file = self._entries[name].file
        try:
            return self._open(file).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"cannot read tensor: {exc}", tensor=name,
                                         file=file) from exc

    def _read_pinned(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Zero-copy views of the mapped files, staged through pinned buffers.

        safetensors offers no zero-copy view, so the data offsets come from the
        header it already validated (8-byte length, JSON, then the data).
        """
        largest = max((self._entries[n].nbytes for n in names), default=0)
        ring = PinnedRing(min(largest, PINNED_MAX_BYTES), self.device) if largest else None
        for name in names:
            view = self._view(name)
            if ring is None or view.numel() * view.element_size() > ring.nbytes:
                yield name, view
                continue
            yield name, ring.stage(view)
            ring.release()   # the consumer has enqueued its copy from the buffer by now

    def _view(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        mapped = self._maps.get(entry.file)
        if mapped is None:
            with open(entry.file, "rb") as f:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            (header_len,) = struct.unpack("<Q", buf[:8])
            header = json.loads(buf[8:8 + header_len])
            mapped = self._maps[entry.file] = (buf, 8 + header_len, header)
        buf, base, header = mapped
        start, end = header[name]["data_offsets"]
        with warnings.catch_warnings():   # read-only map: we never write through the view
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buf, dtype=torch.uint8, count=end - start,
                                    offset=base + start)
        return flat.view(entry.dtype).view(entry.shape)

    def file_of(self, name: str) -> str | None:
        entry = (self._entries or {}).get(name)
        return entry.file if entry else self._index.get(name)

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()
