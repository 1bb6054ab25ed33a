"""Pre-quantized FP8 checkpoints: the layout a checkpoint holds, read from its own metadata.

Three layouts are in common use, each an FP8 (e4m3) weight plus a float32 scale tensor
named after it, dequantized as ``weight * scale``:
  - block: one scale per ``weight_block_size`` tile (DeepSeek-V3, Kimi-K2, Qwen3-FP8;
    ``config.json`` ``quant_method: "fp8"``), named ``weight_scale_inv``;
  - channel: one scale per output row, ``[N, 1]`` (compressed-tensors ``float-quantized``,
    ``strategy: "channel"``), named ``weight_scale``;
  - tensor: one scale per tensor, ``[]`` or ``[1]`` (ModelOpt, compressed-tensors
    ``strategy: "tensor"``), named ``weight_scale``; static ``input_scale`` may sit beside.
The headers are the ground truth (which weights are FP8, the scale names and shapes);
``config.json``'s ``quantization_config`` gives what headers cannot (the block size).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from loadfsm.errors import ShapeMismatchError
from loadfsm.plan import TensorEntry
from loadfsm.quant.config import GRANULARITIES, Fp8Config, quant_name
from loadfsm.quant.fp8 import FP8_DTYPE

SCALE_NAMES = ("weight_scale_inv", "weight_scale")   # DeepSeek-V3 naming first
INPUT_SCALE = "input_scale"
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class Fp8CheckpointConfig:
    """The FP8 layout of a pre-quantized checkpoint, and the kernel it is installed as.

    Args:
        granularity: the checkpoint's scales: per "tensor", "channel" (row) or "block".
        block_size: ``(rows, cols)`` of a tile, for "block".
        scale_name: the scale tensor's suffix in place of ``weight``
            (``weight_scale_inv`` in DeepSeek-V3's naming, else ``weight_scale``).
        tensor_scale_shape: shape of a per-tensor scale as stored: ``()`` or ``(1,)``.
        input_scale_shape: shape of the static activation scales the checkpoint carries
            beside each weight (``None``: none). They are read and checked, not used:
            the kernels quantize activations dynamically.
        quantized: checkpoint weight names stored in FP8 (what a module's pieces must
            name for it to load pre-quantized); other linears load as they are. Empty:
            every linear the config does not exclude (a config written by hand, for an
            iterable source that has no headers to read).
        exclude: modules the checkpoint keeps in full precision (their weights are not
            FP8); also the kernel config's ``exclude``, so a re-planned model keeps them.
        requantize: the FP8 config to requantize to on the device, when the user asked
            for another granularity explicitly (``Fp8Config(requantize=True)``);
            ``None`` keeps the checkpoint's.
    """

    granularity: str
    block_size: tuple[int, int] = DEFAULT_BLOCK
    scale_name: str = "weight_scale"
    tensor_scale_shape: tuple[int, ...] = ()
    input_scale_shape: tuple[int, ...] | None = None
    quantized: frozenset[str] = field(default=frozenset(), repr=False)
    exclude: tuple[str, ...] = ()
    requantize: Fp8Config | None = None

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, "
                             f"got {self.granularity!r}")
        if self.scale_name not in SCALE_NAMES:
            raise ValueError(f"scale_name must be one of {SCALE_NAMES}, "
                             f"got {self.scale_name!r}")
        if tuple(self.tensor_scale_shape) not in ((), (1,)):
            raise ValueError(f"a per-tensor scale is stored as [] or [1], "
                             f"got {self.tensor_scale_shape!r}")
        Fp8Config(granularity=self.granularity, block_size=self.block_size)  # validates
        object.__setattr__(self, "block_size", tuple(self.block_size))
        object.__setattr__(self, "tensor_scale_shape", tuple(self.tensor_scale_shape))
        object.__setattr__(self, "quantized", frozenset(self.quantized))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @classmethod
    def of(cls, config: Fp8Config, scale_name: str | None = None) -> Fp8CheckpointConfig:
        """The layout ``config``'s quantization stores: block scales in DeepSeek-V3's
        naming (``weight_scale_inv``), the others as ``weight_scale``."""
        name = scale_name or SCALE_NAMES[config.granularity != "block"]
        return cls(config.granularity, block_size=config.block_size, scale_name=name)

    @property
    def stored(self) -> Fp8Config:
        """The checkpoint's own granularity as an ``Fp8Config`` (dequantization)."""
        return Fp8Config(granularity=self.granularity, block_size=self.block_size,
                         exclude=self.exclude)

    @property
    def kernel(self) -> Fp8Config:
        """The config of the installed FP8 modules."""
        return self.requantize if self.requantize is not None else self.stored

    @property
    def name(self) -> str:
        """The report's ``quant``: the kernel's name, marked as pre-quantized."""
        return f"{quant_name(self.kernel)}-prequantized"

    def excludes(self, module_name: str) -> bool:
        """Whether the checkpoint keeps ``module_name`` in full precision."""
        return module_name in self.exclude

    def scale_of(self, weight_name: str) -> str:
        """The name of ``weight_name``'s scale: ``...weight`` -> ``...weight_scale_inv``,
        a stacked experts' ``...gate_up_proj`` -> ``...gate_up_proj_scale_inv``."""
        return weight_name + self.scale_name[len("weight"):]

    def for_pushes(self) -> Fp8CheckpointConfig:
        """What a loaded module keeps to re-plan: pushes carry weights and their scales,
        whichever modules the checkpoint held, and never activation scales."""
        return dataclasses.replace(self, input_scale_shape=None, quantized=frozenset())


def detect_fp8_checkpoint(entries: dict[str, TensorEntry], quantization_config: dict | None,
                          block_hint: tuple[int, int] | None = None
                          ) -> Fp8CheckpointConfig | None:
    """The layout of a checkpoint whose ``entries`` hold FP8 weights with scales, or
    ``None`` (a full-precision checkpoint, or FP8 tensors without scales). The block
    size is the config's, else ``block_hint`` (the user's), else 128x128.

    Raises:
        ShapeMismatchError: FP8 weights whose scales fit no known layout.
    """
    fp8 = {name: entry for name, entry in entries.items()
           if entry.dtype == FP8_DTYPE and name.endswith("weight")}
    scaled = {name for name in fp8 if any(name[:-len("weight")] + s in entries
                                          for s in SCALE_NAMES)}
    if not scaled:
        return None
    # The tallest weight tells the layouts apart (one row fits per-channel and per-block).
    first = max(scaled, key=lambda name: (fp8[name].shape[-2], name))
    scale_name = next(s for s in SCALE_NAMES if first[:-len("weight")] + s in entries)
    scale = entries[first[:-len("weight")] + scale_name]
    block = _block_size(quantization_config) or block_hint
    try:
        granularity = _granularity(fp8[first].shape, scale.shape, block)
    except ValueError as exc:
        raise ShapeMismatchError(str(exc), tensor=scale.name, file=scale.file,
                                 layer=first[:-len(".weight")]) from None
    inputs = [e.shape for n, e in entries.items() if n.endswith("." + INPUT_SCALE)]
    exclude = sorted(name[:-len(".weight")] for name, e in entries.items()
                     if name.endswith(".weight") and len(e.shape) == 2
                     and e.dtype.is_floating_point and e.dtype.itemsize > 1)
    return Fp8CheckpointConfig(
        granularity, block_size=block or DEFAULT_BLOCK, scale_name=scale_name,
        tensor_scale_shape=tuple(scale.shape) if granularity == "tensor" else (),
        input_scale_shape=tuple(inputs[0]) if inputs else None,
        quantized=frozenset(fp8), exclude=tuple(exclude))


def _block_size(qc: dict | None) -> tuple[int, int] | None:
    """``weight_block_size`` ("fp8") or compressed-tensors' ``block_structure``."""
    if not qc:
        return None
    block = qc.get("weight_block_size")
    for group in (qc.get("config_groups") or {}).values():
        block = block or (group.get("weights") or {}).get("block_structure")
    return tuple(int(b) for b in block) if block else None


def _granularity(weight: tuple[int, ...], scale: tuple[int, ...],
                 block: tuple[int, int] | None) -> str:
    *_, n, k = weight
    if math.prod(scale) == 1 and tuple(scale) in ((), (1,)):
        return "tensor"
    if tuple(scale) == (n, 1):
        return "channel"
    bn, bk = block or DEFAULT_BLOCK
    if tuple(scale) == (math.ceil(n / bn), math.ceil(k / bk)):
        return "block"
    raise ValueError(f"FP8 scale of shape {tuple(scale)} fits no layout "
                     f"(per tensor [] or [1], per channel [{n}, 1], per {bn}x{bk} block "
                     f"[{math.ceil(n / bn)}, {math.ceil(k / bk)}])")


def reconcile(asked, layout: Fp8CheckpointConfig) -> tuple[Fp8CheckpointConfig, dict | None]:
    """The config to load a pre-quantized checkpoint with, given the user's ``asked``
    (a resolved quant config or ``None``), and what to warn when they differ.

    The checkpoint's layout is kept (no round trip through full precision) unless the user
    asked for another FP8 granularity with ``requantize=True``.
    """
    if isinstance(asked, Fp8CheckpointConfig):
        return asked, None
    same = (isinstance(asked, Fp8Config) and asked.granularity == layout.granularity
            and (asked.granularity != "block" or asked.block_size == layout.block_size))
    if same:
        return layout, None
    differs = {"asked": _label(asked), "checkpoint": _label(layout.stored)}
    if isinstance(asked, Fp8Config) and asked.requantize:
        return dataclasses.replace(layout, requantize=asked), {**differs, "action": "requantize"}
    return layout, {**differs, "action": "keep"}


def _label(config) -> str | None:
    """``quant_name``, with the tile for blocks (``fp8-block 128x128``)."""
    name = quant_name(config)
    if isinstance(config, Fp8Config) and config.granularity == "block":
        return f"{name} {config.block_size[0]}x{config.block_size[1]}"
    return name
