"""The torch.distributed transport's wire format: a fixed header and a binary tensor table.

A bucket is its tensors' bytes, each 64-byte aligned, then one 64-byte ``Header`` that
says what comes next from the same sender (T1..T3, ARCHITECTURE.md): so each bucket is
one collective, and a receiver knows the size of the next bucket the moment this one
lands. A bucket's table (names, dtypes, shapes, offsets) travels once per layout: a
header names the table by its CRC-32 and length, and carries it (``table_len > 0``)
only when the sender's table for that bucket index changed. No pickles.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import LoadError
from ..sources.dtypes import DTYPES

ALIGN = 64
HEADER_BYTES = 64
_MAGIC = 0x4C46534D_0001           # "LFSM", wire version 1
END, BUCKET, ABORT = 0, 1, 2
_CODES = list(DTYPES.values())      # a dtype travels as its index in the one dtype table
_CODE_OF = {dtype: code for code, dtype in enumerate(_CODES)}
_ENTRY = struct.Struct("<qHBB")     # offset, name length, dtype code, ndim


class WireError(LoadError):
    """A transport message that does not fit the protocol (another version, a table the
    receiver never got, a corrupt header)."""


class Entry(NamedTuple):
    """One tensor of a bucket: its name, dtype, shape and byte offset."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class Header:
    """What a sender sends next: ``END``, ``ABORT`` (``reason_len`` bytes of reason
    follow), or a ``BUCKET`` of ``size`` bytes (plus the next header) whose table has
    ``table_crc`` (and follows, ``table_len`` bytes, when it is new)."""

    kind: int
    index: int = 0
    size: int = 0
    table_len: int = 0
    table_crc: int = 0
    reason_len: int = 0

    def encode(self, out: torch.Tensor) -> None:
        """Write into ``out``: 64 uint8 bytes (8 int64 values) on any device."""
        values = [_MAGIC, self.kind, self.index, self.size, self.table_len, self.table_crc,
                  self.reason_len, 0]
        out.view(torch.int64).copy_(torch.tensor(values, dtype=torch.int64))

    @classmethod
    def decode(cls, raw: torch.Tensor) -> "Header":
        """From 64 uint8 bytes (a sync when they are on a GPU)."""
        magic, kind, index, size, table_len, crc, reason_len, _ = raw.view(torch.int64).tolist()
        if magic != _MAGIC or kind not in (END, BUCKET, ABORT):
            raise WireError(f"not a loadfsm transport header (magic {magic:#x}, kind "
                            f"{kind}): sender and receiver must run the same loadfsm")
        return cls(kind, index, size, table_len, crc, reason_len)


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def encode_table(entries: list[Entry]) -> bytes:
    """The bucket's tensors as bytes: per tensor offset, name, dtype code and shape."""
    parts = []
    for name, dtype, shape, offset in entries:
        raw = name.encode()
        parts += [_ENTRY.pack(offset, len(raw), _CODE_OF[dtype], len(shape)), raw,
                  struct.pack(f"<{len(shape)}q", *shape)]
    return b"".join(parts)


def decode_table(data: bytes) -> list[Entry]:
    entries, at = [], 0
    while at < len(data):
        offset, name_len, code, ndim = _ENTRY.unpack_from(data, at)
        at += _ENTRY.size
        name = data[at:at + name_len].decode()
        at += name_len
        shape = struct.unpack_from(f"<{ndim}q", data, at)
        at += 8 * ndim
        entries.append(Entry(name, _CODES[code], tuple(shape), offset))
    return entries


def crc(data: bytes) -> int:
    return zlib.crc32(data)


def dtype_supported(dtype: torch.dtype) -> bool:
    return dtype in _CODE_OF
