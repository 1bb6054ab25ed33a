"""The delta stream's head: what a delta push is computed against, and what it skipped.

A delta push over torch.distributed is one sender chain of ordinary buckets (``wire``,
``transport``), its tensors in this order:

- **D1** the head, one uint8 tensor named ``HEAD_NAME``: ``DeltaHead`` packed with
  ``struct`` (no pickle): whether the push is full, the push it is computed against
  (``base_id`` and that push's user version), this push's id and version, the number of
  tile patches, and the trainer's ``DeltaReport``.
- **D2** per tile patch, three tensors named ``layer.attr``: the int64 tile index, the
  FP8 tiles, the float32 scales.
- **D3** the whole layers, as any push sends them.
- **D4** after the chain ends, one all-reduce (max) of an int64 ``[1]`` on every rank: each
  engine's outcome (``TAKEN``, ``FAILED``, ``STALE``), so the trainer keeps what it sent
  only when every engine took it.

The bucket tables (names, dtypes, shapes) travel as for any push: once per layout, which
for deltas mostly means every push, at a few bytes per tensor.
"""

from __future__ import annotations

import struct
from dataclasses import astuple, dataclass

import torch

from .delta import DeltaReport
from .wire import WireError

HEAD_NAME = "\x00delta"
TAKEN, FAILED, STALE = 0, 1, 2          # D4 outcomes; the max over the engines wins
_MAGIC = b"LFDH"
_VERSION = 1
_FULL = 1
_HEAD = struct.Struct("<4sHBxIqq7q")     # magic, wire version, flags, patches, ids, report
_BLOB = struct.Struct("<BI")             # a user version: kind, byte length
_NONE, _INT, _STR = 0, 1, 2


@dataclass(frozen=True)
class DeltaHead:
    """D1. ``full``: every layer travels whole (a full push, valid onto any engine
    state); else the engine must hold push ``base_id``, stamped ``base_version``."""

    full: bool
    base_id: int
    push_id: int
    base_version: object
    version: object
    patches: int
    report: DeltaReport

    def tensor(self) -> torch.Tensor:
        """The head as uint8 bytes, for the chain's first bucket."""
        raw = _HEAD.pack(_MAGIC, _VERSION, _FULL if self.full else 0, self.patches,
                         self.base_id, self.push_id, *astuple(self.report))
        raw += encode_version(self.base_version) + encode_version(self.version)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    @classmethod
    def decode(cls, data: bytes) -> "DeltaHead":
        """From the head's bytes.

        Raises:
            WireError: not a delta head of this wire version.
        """
        if len(data) < _HEAD.size or data[:4] != _MAGIC:
            raise WireError("the push does not open with a delta head: the trainer sends "
                            "with a plain WeightSender, or runs another loadfsm")
        magic, version, flags, patches, base_id, push_id, *report = _HEAD.unpack_from(data)
        if version != _VERSION:
            raise WireError(f"delta head of wire version {version}, this loadfsm reads "
                            f"{_VERSION}: sender and receiver must run the same loadfsm")
        base_version, at = _decode_version(data, _HEAD.size)
        this_version, _ = _decode_version(data, at)
        return cls(bool(flags & _FULL), base_id, push_id, base_version, this_version,
                   patches, DeltaReport(*report))


def encode_version(version) -> bytes:
    """A user's push version as bytes: ``None``, an ``int`` (64-bit) or a ``str``.

    Raises:
        TypeError: another type (it could not be compared on the engine).
        ValueError: an ``int`` past 64 bits.
    """
    if version is None:
        return _BLOB.pack(_NONE, 0)
    if isinstance(version, int) and not isinstance(version, bool):
        if not -(1 << 63) <= version < 1 << 63:
            raise ValueError(f"version {version} does not fit 64 bits")
        return _BLOB.pack(_INT, 8) + struct.pack("<q", version)
    if isinstance(version, str):
        raw = version.encode()
        return _BLOB.pack(_STR, len(raw)) + raw
    raise TypeError(f"a version sent over torch.distributed is None, an int or a str, "
                    f"not {type(version).__name__}")


def _decode_version(data: bytes, at: int) -> tuple[object, int]:
    kind, length = _BLOB.unpack_from(data, at)
    at += _BLOB.size
    raw = data[at:at + length]
    if kind == _INT:
        return struct.unpack("<q", raw)[0], at + length
    if kind == _STR:
        return raw.decode(), at + length
    return None, at + length
