"""Delta pushes: the trainer sends only the layers whose quantized bytes changed.

In some RL workloads only 1-3% of the bytes change per step. ``DeltaPush`` keeps, on the
trainer, what it last sent: each parameter as it was, and what the engine made of it
(``quantize_for_push`` with the engine's config: the FP8 bytes and scales, the other
tensors as they are). A push then quantizes only the parameters whose bytes moved,
compares the results with what was sent, and sends every tensor of each engine layer
with a changed byte (a layer is pushed whole: R1..R4 need all its pieces). A layer left
out holds exactly what the full push would give it, since quantization is deterministic:
the push is bit-identical to a full one, always, as long as the engine holds what was
last sent (``commit`` after each push the engine took, ``forget`` after one it did not).

``tiles=True`` (a block-FP8 engine) goes below layers: a layer whose only changes are
FP8 tiles sends just those tiles with their scales (``tile_delta``), written into the
live tensors in place (``tile_push``); the other changed layers go whole, as above.
Per-tensor and per-channel FP8 keep whole layers: one changed value can move a scale
that every byte of the tensor (or row) depends on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..quant.config import Fp8Config
from ..quant.fp8_layout import Fp8CheckpointConfig
from ..quant.push_fp8 import quantize_for_push
from ..loading.session import LoadSession
from .routes import PushRoutes, checkpoint_tensors
from .sync import SyncReport, WeightSync
from .tile_delta import TileTracker
from .tile_push import TileDelta, apply_tile_delta
from .tiles import tile_count


@dataclass
class DeltaReport:
    """What a delta push sent and skipped, against a full push of the same weights
    (``bytes_*`` are the bytes that push would carry: FP8 and scales when
    ``prequantized``, else the trainer's bf16; with tiles, the patches' tiles, scales
    and indices count as sent). ``tiles_sent`` of ``tiles_total`` block-FP8 tiles went as
    patches (both 0 without ``tiles``); a patch counts as one tensor."""

    layers_sent: int
    layers_skipped: int
    tensors_sent: int
    bytes_sent: int
    bytes_skipped: int
    tiles_sent: int = 0
    tiles_total: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class DeltaPush:
    """Trainer side of delta pushes into an FP8 engine.

    Args:
        config: the engine's ``Fp8Config``.
        engine: the engine's ``WeightSync`` (in this process), the engine's model class
            built on ``meta`` (a remote engine loaded with online FP8: its plan is made
            here), or a function giving the engine layer of a pushed name. Names of one
            engine layer are sent together.
        prequantized: push FP8 weights and scales (an engine loaded pre-quantized);
            else the trainer's bf16 tensors (an engine with online FP8).
        scale_name: as ``quantize_for_push``'s.
        tiles: send changed FP8 tiles, not whole layers (a block-FP8 ``config``; the
            engine given as its ``WeightSync`` or model class). A step then gives a
            ``TileDelta``, which ``apply_tile_delta`` pushes (``push`` does).

    Memory: the trainer keeps one copy of every parameter and one of its FP8 form.
    ``report``: the last push's ``DeltaReport``.

    Raises:
        ValueError: ``tiles`` with a per-tensor or per-channel config, or with the
            engine given as a function.
    """

    def __init__(self, config: Fp8Config,
                 engine: WeightSync | nn.Module | Callable[[str], str], *,
                 prequantized: bool = False, scale_name: str | None = None,
                 tiles: bool = False):
        self.config, self.prequantized, self.scale_name = config, prequantized, scale_name
        routes = None
        if isinstance(engine, (WeightSync, nn.Module)):
            routes = (engine._routes if isinstance(engine, WeightSync)
                      else PushRoutes(LoadSession(engine, quant=config, device="cpu").plan))
            self._layer_of = lambda name: routes.resolve(name).rec.name
        else:
            self._layer_of = engine
        if tiles and (config.granularity != "block" or routes is None):
            raise ValueError("tiles=True needs a block-FP8 config and the engine's "
                             "WeightSync or model class (its layers' FP8 weights)")
        self._tiles = TileTracker(routes, config) if tiles else None
        self._layout = Fp8CheckpointConfig.of(config, scale_name)
        self._raw: dict[str, torch.Tensor] = {}     # parameter -> as last sent
        self._sent: dict[str, torch.Tensor] = {}    # pushed name -> quantized, as last sent
        self._pending: tuple | None = None
        self.report: DeltaReport | None = None

    def __call__(self, model: nn.Module) -> list[tuple[str, torch.Tensor]] | TileDelta:
        """What to push for ``model``'s current weights: every tensor of each layer whose
        quantized bytes changed since the last ``commit`` (with ``tiles``: a
        ``TileDelta``, those layers' changed tiles when tiles are all that changed)."""
        if self._tiles is not None:
            return self._tile_delta(model)
        with torch.no_grad():
            params = dict(model.named_parameters())
            moved = [n for n, p in params.items() if not _same(self._raw.get(n), p)]
            fresh = dict(quantize_for_push(_Only(model, moved), self.config,
                                           scale_name=self.scale_name))
            weight_of = {self._layout.scale_of(n): n for n in fresh}
            dirty = {self._layer_of(weight_of.get(n, n)) for n, t in fresh.items()
                     if not _same(self._sent.get(n), t)}
            full = ({**self._sent, **fresh}.items() if self.prequantized
                    else checkpoint_tensors(model))
            items, total, layers = [], 0, set()
            for name, tensor in full:
                total += _nbytes(tensor)
                layer = self._layer_of(weight_of.get(name, name))
                layers.add(layer)
                if layer in dirty:
                    items.append((name, tensor))
            self._pending = ({n: params[n].detach().clone() for n in moved},
                             {n: t.clone() for n, t in fresh.items()})
        sent = sum(_nbytes(t) for _, t in items)
        self.report = DeltaReport(layers_sent=len(dirty), layers_skipped=len(layers - dirty),
                                  tensors_sent=len(items), bytes_sent=sent,
                                  bytes_skipped=total - sent)
        return items

    def _tile_delta(self, model: nn.Module) -> TileDelta:
        """Tiles of the layers whose only changes are FP8 tiles; the other changed layers
        whole (a first push: all of them)."""
        tracker = self._tiles
        params = dict(model.named_parameters())
        places = {n: tracker.place(n, p.shape) for n, p in params.items()}
        layer_of = {n: place.layer if place else self._layer_of(n)
                    for n, place in places.items()}
        dirty, tiled = set(), []
        with torch.no_grad():
            for name, param in params.items():
                kept, place = self._raw.get(name), places[name]
                if place is not None and name in tracker.sent:
                    tiled.append((name, param, kept, place))
                elif not _same(kept, param):
                    dirty.add(layer_of[name])
            patches, moved = tracker.changed(tiled)
            whole = [n for n in params if layer_of[n] in dirty]
            delta = TileDelta(self._whole_items(model, whole, dirty),
                              [p for p in patches if p.layer not in dirty])
            self._pending = ({n: params[n].detach().clone() for n in whole},
                             {n: tracker.whole(params[n]) for n in whole if places[n]},
                             [m for m in moved if layer_of[m[0]] not in dirty])
        self.report = self._tile_report(params, places, layer_of, dirty, delta)
        return delta

    def _whole_items(self, model: nn.Module, names: list[str],
                     dirty: set[str]) -> list[tuple[str, torch.Tensor]]:
        """Every tensor of the ``dirty`` layers (whose parameters are ``names``), as a
        full push sends them."""
        if self.prequantized:
            return list(quantize_for_push(_Only(model, names), self.config,
                                          scale_name=self.scale_name))
        return [(n, t) for n, t in checkpoint_tensors(model) if self._layer_of(n) in dirty]

    def _tile_report(self, params, places, layer_of, dirty, delta: TileDelta) -> DeltaReport:
        block = self.config.block_size
        total = sum(_full_bytes(p, places[n] is not None and self.prequantized, block)
                    for n, p in params.items())
        sent_layers = dirty | {p.layer for p in delta.patches}
        skipped = set(layer_of.values()) - sent_layers
        sent = delta.nbytes
        return DeltaReport(
            layers_sent=len(sent_layers), layers_skipped=len(skipped),
            tensors_sent=len(delta.items) + len(delta.patches), bytes_sent=sent,
            bytes_skipped=total - sent, tiles_sent=sum(len(p.index) for p in delta.patches),
            tiles_total=sum(tile_count(p.shape, block)
                            for n, p in params.items() if places[n]))

    def commit(self) -> None:
        """The engine took the last push: its weights are what was sent."""
        if self._pending is None:
            return
        if self._tiles is not None:
            raw, whole, moved = self._pending
            self._raw.update(raw)
            self._tiles.sent.update(whole)
            self._tiles.commit(self._raw, moved)
        else:
            raw, fresh = self._pending
            self._raw.update(raw)
            self._sent.update(fresh)
        self._pending = None

    def forget(self) -> None:
        """The engine may not hold what was sent (a push failed): the next push is full."""
        self._raw, self._sent, self._pending = {}, {}, None
        if self._tiles is not None:
            self._tiles.sent = {}

    def push(self, sync: WeightSync, model: nn.Module, **kwargs) -> SyncReport:
        """``sync.push`` (with tiles: ``apply_tile_delta``) of the delta for ``model``;
        commits, or forgets if it raised."""
        delta = self(model)
        try:
            report = (apply_tile_delta(sync, delta, **kwargs) if self._tiles is not None
                      else sync.push(delta, **kwargs))
        except BaseException:
            self.forget()
            raise
        self.commit()
        return report


class _Only:
    """``model`` as ``quantize_for_push`` reads it, with only the parameters ``names``."""

    def __init__(self, model: nn.Module, names: list[str]):
        self._model, self._names = model, set(names)
        custom = getattr(model, "checkpoint_pieces", None)
        if callable(custom):
            self.checkpoint_pieces = custom

    def named_modules(self):
        return self._model.named_modules()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self._model.named_parameters() if n in self._names)


def _same(kept: torch.Tensor | None, tensor: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN, -0.0 and FP8 compared by their bits)."""
    return (kept is not None and kept.dtype == tensor.dtype and kept.shape == tensor.shape
            and torch.equal(_bits(kept), _bits(tensor)))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes, as 8-byte words where they divide evenly: ``torch.equal`` on int64 is
    ~7x faster than on bytes on a CPU."""
    raw = tensor.detach().reshape(-1).view(torch.uint8)
    if raw.numel() % 8 == 0 and raw.data_ptr() % 8 == 0:
        return raw.view(torch.int64)
    return raw


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _full_bytes(param: torch.Tensor, fp8: bool, block: tuple[int, int]) -> int:
    """What a full push carries of ``param``: FP8 bytes and float32 tile scales when it
    goes ``fp8``, else the parameter as it is."""
    return param.numel() + 4 * tile_count(param.shape, block) if fp8 else _nbytes(param)
