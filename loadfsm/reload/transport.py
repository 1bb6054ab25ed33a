"""Weights over ``torch.distributed``: pipelined bucket broadcasts from trainers to engines.

Every trainer rank that owns weights calls a ``WeightSender`` after its optimizer step
(``sender(model.named_parameters())``); every engine rank calls
``WeightReceiver.receive()``, which feeds the arrivals into its ``WeightSync``.

Wire protocol, per push, all collectives on ``group`` (``wire`` has the formats,
``chain`` the reading side every rank shares):

- **T1** per sender, in the order of ``senders``, a 64-byte header broadcast from it:
  its first bucket's size and table CRC, then that table once per layout (its first
  push, or after its buckets changed), else nothing.
- **T2** its buckets, one broadcast each: the tensors flattened, 64-byte aligned (each a
  view), followed by the header of what comes next from that sender. A sender packs
  bucket k+1 while bucket k is on the wire; a receiver receives bucket k+1 while it
  applies bucket k (on a GPU, the receive runs on NCCL's stream and the apply on the
  current one). ``buffers`` rotating buffers on each side (2-3).
- **T3** the last bucket's trailing header says end, or abort when the trainer's
  iterator raised (its reason follows); engines roll back. Other senders' chains are
  still received (and dropped), so every rank stays in step.

Every rank of ``group`` takes part in every broadcast: a sender receives the other
senders' buckets into scratch buffers, and an engine that does not host a tensor
(``hosts``) receives it without applying it. A tensor larger than ``bucket_bytes``
travels alone. Buckets live on the CPU with gloo, on the current CUDA device with NCCL.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist

from ..errors import PushError
from ..watchdog import Watchdog
from .chain import Chain, Peer, SenderAbortedError
from .sync import SyncReport, WeightSync
from .wire import (ABORT, ALIGN, BUCKET, END, HEADER_BYTES, Entry, Header, aligned, crc,
                   dtype_supported, encode_table)

__all__ = ["SenderAbortedError", "WeightReceiver", "WeightSender"]

DEFAULT_BUCKET_BYTES = 256 << 20
DEFAULT_BUFFERS = 2
STALL_WARNING_S = 60.0       # a bucket of 256 MB takes well under a second on any link


def _senders(src: int | Sequence[int]) -> tuple[int, ...]:
    senders = (src,) if isinstance(src, int) else tuple(src)
    if not senders or len(set(senders)) != len(senders):
        raise ValueError(f"senders must be distinct ranks, got {src!r}")
    return senders


class WeightSender(Peer):
    """Trainer side: sends named tensors in flattened buckets, pipelined.

    Args:
        group: the process group (default: the world).
        src: global rank of this sender.
        bucket_bytes: bytes per bucket; a tensor larger than that gets a bucket of its own.
        device: where buckets are packed; the current CUDA device for NCCL, else CPU.
        senders: every sending rank, in the order their chains go (default: ``[src]``);
            each calls its own ``WeightSender`` with the tensors it owns, and the
            receivers are given the same list.
        buffers: rotating send buffers: bucket k+1 is packed while bucket k is sent.

    ``tables_sent``: how many bucket tables the last push sent (0 once the layout is
    known to the receivers and unchanged).
    """

    def __init__(self, group=None, src: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device=None, *, senders: Sequence[int] | None = None,
                 buffers: int = DEFAULT_BUFFERS):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        senders = _senders(src if senders is None else senders)
        if src not in senders:
            raise ValueError(f"src {src} is not one of senders {senders}")
        super().__init__(group, senders, buffers)
        self.src, self.bucket_bytes = src, bucket_bytes
        self.device = torch.device(device) if device is not None else None
        self._sent_tables: dict[int, int] = {}      # bucket index -> table CRC sent
        self.tables_sent = 0

    @torch.no_grad()
    def __call__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send one push; returns the bytes of tensor data this rank sent.

        Raises:
            Whatever the iterator raised, after telling the receivers to roll back (and
            after the other senders' chains, so every rank stays in step).
        """
        self.tables_sent = 0
        error, sent = None, 0
        for src in self.senders:
            if src == self.src:
                sent, error = self._send(iter(named_tensors))
            else:
                self.follow(src)
        if error is not None:
            raise error
        return sent

    # -- this rank's chain ---------------------------------------------------------------
    def _send(self, items: Iterator) -> tuple[int, BaseException | None]:
        """This rank's chain (T1..T3); returns the bytes sent and the iterator's error."""
        ring = self.ring
        if len(ring.buffers) < 2:
            raise ValueError("a sender needs buffers >= 2 (one packed while one is sent)")
        self._spill, sent = None, 0
        self._pad = torch.zeros(ALIGN, dtype=torch.uint8, device=ring.device)
        try:
            bucket = self._pack(items, 0)
        except BaseException as exc:          # noqa: BLE001 - told to receivers, re-raised
            self._abort(self._small(HEADER_BYTES), exc)
            return 0, exc
        self._announce(bucket, self._small(HEADER_BYTES), alone=True)              # T1
        while bucket is not None:
            try:
                nxt, error = self._pack(items, bucket.index + 1), None
            except BaseException as exc:      # noqa: BLE001 - told to receivers, re-raised
                nxt, error = None, exc
            trailer = bucket.buf[bucket.size:bucket.size + HEADER_BYTES]
            if error is not None:
                reason = _reason(error)
                Header(ABORT, reason_len=len(reason)).encode(trailer)
            else:
                self._announce(nxt, trailer, alone=False)
            ring.work[bucket.slot] = dist.broadcast(                                # T2
                bucket.buf[:bucket.size + HEADER_BYTES], self.src, group=self.group,
                async_op=True)
            sent += bucket.nbytes
            if error is not None:                                                   # T3
                self._bytes(reason)
                ring.wait()
                return sent, error
            if nxt is not None and nxt.travels:
                self._bytes(nxt.table)              # its table, once per layout
            bucket = nxt
        ring.wait()
        return sent, None

    def _pack(self, items: Iterator, index: int) -> "_Packed | None":
        """Bucket ``index`` from ``items``, packed into its ring buffer with one ``cat``;
        ``None`` when the items are done."""
        batch, size = [], 0
        if self._spill is not None:
            batch, size = [self._spill], aligned(_nbytes(self._spill[1]))
            self._spill = None
        for name, tensor in items:
            n = aligned(_nbytes(tensor))
            if batch and size + n > self.bucket_bytes:
                self._spill = (name, tensor)
                break
            batch.append((name, tensor))
            size += n
        if not batch:
            return None
        slot = index % len(self.ring.buffers)
        buf = self.ring.take(slot, size + HEADER_BYTES)
        entries, parts, offset = [], [], 0
        for name, tensor in batch:
            if not dtype_supported(tensor.dtype):
                raise TypeError(f"{name}: dtype {tensor.dtype} has no wire code")
            raw = tensor.detach().reshape(-1).view(torch.uint8)
            entries.append(Entry(name, tensor.dtype, tuple(tensor.shape), offset))
            parts.append(raw if raw.device == buf.device else raw.to(buf.device))
            end = offset + raw.numel()
            offset = aligned(end)
            if offset > end:
                parts.append(self._pad[:offset - end])   # filler: bytes nobody reads
        torch.cat(parts, out=buf[:size])
        table = encode_table(entries)
        table_crc = crc(table)
        travels = self._sent_tables.get(index) != table_crc
        self._sent_tables[index] = table_crc
        return _Packed(index, slot, buf, size, table, table_crc, travels,
                       sum(_nbytes(t) for _, t in batch))

    def _announce(self, bucket: "_Packed | None", raw: torch.Tensor, alone: bool) -> None:
        """Write the header of ``bucket`` (``None``: the end) into ``raw``; ``alone``: it
        is the chain's first header, broadcast now with the table if that travels."""
        if bucket is None:
            Header(END).encode(raw)
        else:
            Header(BUCKET, bucket.index, bucket.size,
                   len(bucket.table) if bucket.travels else 0, bucket.table_crc).encode(raw)
            self.tables_sent += bucket.travels
        if alone:
            dist.broadcast(raw, self.src, group=self.group)
            if bucket is not None and bucket.travels:
                self._bytes(bucket.table)

    def _abort(self, raw: torch.Tensor, exc: BaseException) -> None:
        reason = _reason(exc)
        Header(ABORT, reason_len=len(reason)).encode(raw)
        dist.broadcast(raw, self.src, group=self.group)
        self._bytes(reason)

    def _bytes(self, data: bytes) -> None:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.ring.device)
        dist.broadcast(raw, self.src, group=self.group)


class _Packed(NamedTuple):
    index: int
    slot: int
    buf: torch.Tensor
    size: int
    table: bytes
    table_crc: int
    travels: bool
    nbytes: int


class WeightReceiver(Peer):
    """Engine side: receives the senders' buckets and pushes them into ``sync``.

    Args:
        sync: the engine's ``WeightSync``.
        group: the process group (default: the world).
        src: global rank of the sender, or the ranks of every sender, in the order the
            senders were given them (``WeightSender(senders=...)``).
        stall_warning_s: seconds without a tensor, once a push has begun, before a
            ``push_stalled`` warning names the layers in flight and the pieces each
            waits for (``loadfsm.watchdog``); ``None`` turns it off.
        hosts: ``hosts(name) -> bool``: whether this engine applies a tensor (an expert
            or shard it hosts); the others are received and dropped. Decided once per
            layout (again for a bucket whose ring buffer grew since), not per push.
            Default: every tensor.
        buffers: rotating receive buffers: bucket k+1 is received while bucket k is
            applied.

    After a push: ``tables_received`` (0 while the layout is unchanged), ``skipped``
    (tensors received but not hosted), ``owners`` (tensor name -> sending rank).
    """

    def __init__(self, sync: WeightSync, group=None, src: int | Sequence[int] = 0,
                 stall_warning_s: float | None = STALL_WARNING_S, *,
                 hosts: Callable[[str], bool] | None = None, buffers: int = DEFAULT_BUFFERS):
        super().__init__(group, _senders(src), buffers)
        self.sync, self.src = sync, src
        self.stall_warning_s, self.hosts = stall_warning_s, hosts
        self.skipped = 0
        # (sender, bucket index) -> (what the views were made for, views, skipped)
        self._views: dict[tuple[int, int], tuple[tuple, list, int]] = {}

    @property
    def owners(self) -> dict[str, int]:
        """Which sender sends each tensor, from the layouts received."""
        return {entry.name: src for (src, _), (_, table) in self.tables.items()
                for entry in table}

    def receive(self, *, version=None) -> SyncReport:
        """Receive one push and apply it, stamping ``version`` on the layers it commits
        (as ``WeightSync.push``); returns the ``SyncReport``.

        Raises:
            PushError: as ``WeightSync.push``; the rest of the push is still received
                (and dropped) so the collectives stay in step with the senders.
        """
        arrivals = self.arrivals()
        try:
            with Watchdog(self.sync.session, self.stall_warning_s, "push"):
                return self.sync.push(arrivals, version=version)
        except PushError:
            collections.deque(arrivals, maxlen=0)   # drain: stay in step with the senders
            raise

    def arrivals(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` views of each received bucket (hosted tensors only),
        every sender's chain in turn, until each has ended.

        Raises:
            SenderAbortedError: a sender's iterator raised mid-push (raised once every
                other sender's chain has been received too).
        """
        self.tables_received = self.skipped = 0
        aborted = None
        for src in self.senders:
            if aborted is not None:
                self.follow(src)
                continue
            try:
                for header, slot, buf, table in Chain(self, src).buckets():
                    yield from self._hosted(src, header, slot, buf, table)
            except SenderAbortedError as exc:
                aborted = exc
        if aborted is not None:
            raise aborted

    def _hosted(self, src: int, header: Header, slot: int, buf: torch.Tensor,
                table: list[Entry]) -> list[tuple[str, torch.Tensor]]:
        """The views of the hosted tensors of a bucket, made once per layout: a bucket
        index lands in the same ring slot on every push."""
        made_for = (header.table_crc, slot, buf.data_ptr(), buf.numel())
        kept = self._views.get((src, header.index))
        if kept is None or kept[0] != made_for:
            views = [(name, buf[offset:offset + _numel(shape) * dtype.itemsize]
                      .view(dtype).view(shape))
                     for name, dtype, shape, offset in table
                     if self.hosts is None or self.hosts(name)]
            kept = self._views[src, header.index] = (made_for, views, len(table) - len(views))
        self.skipped += kept[2]
        return kept[1]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _reason(exc: BaseException) -> bytes:
    return f"{type(exc).__name__}: {exc}".encode()[:4096] or b"?"
