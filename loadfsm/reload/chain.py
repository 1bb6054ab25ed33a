"""The reading side of the torch.distributed transport, shared by every rank: a ring of
rotating buffers, and one sender's chain of buckets received into it (T1..T3,
ARCHITECTURE.md; ``transport`` has the protocol, ``wire`` the formats). Engines apply
what a chain yields; senders follow the other senders' chains and drop them.
"""

from __future__ import annotations

import collections
import ctypes
from typing import Iterator

import torch
import torch.distributed as dist

from ..errors import LoadError
from .wire import ABORT, BUCKET, HEADER_BYTES, Entry, Header, WireError, crc, decode_table


class SenderAbortedError(LoadError):
    """The trainer's push failed before it finished sending (its iterator raised)."""


def _comm_device(group) -> torch.device:
    """Where buckets and headers live for the group's backend."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Ring:
    """``count`` rotating uint8 buffers, each grown (never shrunk) to what it must hold,
    and the pending collective of each."""

    def __init__(self, count: int, device: torch.device):
        if count < 1:
            raise ValueError(f"buffers must be >= 1, got {count}")
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None] * count
        self.work: list = [None] * count

    def take(self, slot: int, nbytes: int) -> torch.Tensor:
        """Buffer ``slot``, at least ``nbytes``, once its last collective is done."""
        self.wait(slot)
        buf = self.buffers[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self.buffers[slot] = torch.empty(nbytes, dtype=torch.uint8,
                                                   device=self.device)
        return buf

    def wait(self, slot: int | None = None) -> None:
        for i in range(len(self.work)) if slot is None else (slot,):
            if self.work[i] is not None:
                self.work[i].wait()
                self.work[i] = None


class Chain:
    """Reads one sender's chain of buckets (T1..T3) on any rank: headers, tables once
    per layout, buckets received into a ring while the previous one is consumed."""

    def __init__(self, peer: "Peer", src: int):
        self.peer, self.src = peer, src

    def buckets(self) -> Iterator[tuple[Header, int, torch.Tensor, list[Entry]]]:
        """Yield ``(header, ring slot, buffer, table)`` per bucket; bucket k+1 is on the
        wire while the caller handles bucket k. Raises ``SenderAbortedError`` at an abort."""
        peer = self.peer
        header = peer.recv_header(self.src)                                       # T1
        if len(peer.ring.buffers) < 2:
            raise ValueError("a receiver needs buffers >= 2 (one received while one is "
                             "applied)")
        pending = self._post(header, 0) if header.kind == BUCKET else None
        slot = 0
        while pending is not None:
            this, buf, table = pending
            peer.ring.wait(slot)
            header = Header.decode(buf[this.size:this.size + HEADER_BYTES])
            nxt = (slot + 1) % len(peer.ring.buffers)
            pending = self._post(header, nxt) if header.kind == BUCKET else None  # T2
            yield this, slot, buf, table
            slot = nxt
        if header.kind == ABORT:                                                  # T3
            raise SenderAbortedError(f"sender rank {self.src} aborted the push: "
                                     f"{peer.recv_reason(self.src, header)}")

    def _post(self, header: Header, slot: int):
        peer = self.peer
        table = peer.table(self.src, header)
        buf = peer.ring.take(slot, header.size + HEADER_BYTES)
        peer.ring.work[slot] = dist.broadcast(buf[:header.size + HEADER_BYTES], self.src,
                                              group=peer.group, async_op=True)
        return header, buf, table


class Peer:
    """What senders and receivers share: the group, the ring, the tables seen."""

    def __init__(self, group, senders: tuple[int, ...], buffers: int):
        self.group, self.senders = group, senders
        self._buffers = buffers
        self.device: torch.device | None = None     # the ring's device; default: the group's
        self._ring: Ring | None = None
        self.tables: dict[tuple[int, int], tuple[int, list[Entry]]] = {}
        self.tables_received = 0      # tables that travelled in the last push

    @property
    def ring(self) -> Ring:
        if self._ring is None:
            self._ring = Ring(self._buffers, self.device or _comm_device(self.group))
        return self._ring

    def _small(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.ring.device)

    def recv_header(self, src: int) -> Header:
        raw = self._small(HEADER_BYTES)
        dist.broadcast(raw, src, group=self.group)
        return Header.decode(raw)

    def table(self, src: int, header: Header) -> list[Entry]:
        """Bucket ``header.index``'s table: received when it travels, else the one kept."""
        key = (src, header.index)
        if header.table_len:
            raw = self._small(header.table_len)
            dist.broadcast(raw, src, group=self.group)
            data = _host_bytes(raw)
            if crc(data) != header.table_crc:
                raise WireError(f"bucket {header.index} table from rank {src} is corrupt")
            self.tables[key] = (header.table_crc, decode_table(data))
            self.tables_received += 1
        kept = self.tables.get(key)
        if kept is None or kept[0] != header.table_crc:
            raise WireError(f"rank {src} sent bucket {header.index} of a layout this rank "
                            "never received (a receiver made after the sender's first "
                            "push?): make the WeightSender again, so its tables travel")
        return kept[1]

    def recv_reason(self, src: int, header: Header) -> str:
        raw = self._small(header.reason_len)
        dist.broadcast(raw, src, group=self.group)
        return _host_bytes(raw).decode(errors="replace")

    def follow(self, src: int) -> BaseException | None:
        """Receive another sender's chain and drop it; its abort is returned, not raised."""
        try:
            collections.deque(Chain(self, src).buckets(), maxlen=0)   # received, dropped
        except SenderAbortedError as exc:
            return exc
        return None


def _host_bytes(raw: torch.Tensor) -> bytes:
    host = raw.cpu().contiguous()
    return ctypes.string_at(host.data_ptr(), host.numel())
