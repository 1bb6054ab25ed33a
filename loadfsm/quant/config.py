"""FP8 quantization settings: one frozen config, and the names ``load(quant=...)`` accepts."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

GRANULARITIES = ("tensor", "channel", "block")

# quant name -> granularity; None means "leave weights in full precision".
_QUANT_NAMES: dict[str, str | None] = {
    "none": None,
    "bf16": None,
    "fp8": "tensor",
    "fp8-channel": "channel",
    "fp8_channel": "channel",
    "fp8-block": "block",
    "fp8_block": "block",
}


@dataclass(frozen=True)
class Fp8Config:
    """How weights are quantized to FP8 (e4m3fn).

    Args:
        granularity: one scale per tensor (per expert for stacked experts), per output
            row ("channel"), or per ``block_size`` tile of the ``[N, K]`` weight.
        block_size: ``(rows, cols)`` of a tile when ``granularity == "block"``.
        exclude: module names left unquantized. The default keeps ``lm_head`` and MoE
            routers (``*.mlp.gate``, ``*.router``) in full precision: FP8 error in a
            router flips top-k expert choices, a discrete error far larger than rounding. A pattern matches fnmatch-style against
            the full module name, or as a plain dotted suffix ("lm_head" matches
            "model.lm_head").

    Raises:
        ValueError: on an unknown granularity, a bad block size or a bad exclude list.
    """

    granularity: Literal["tensor", "channel", "block"] = "tensor"
    block_size: tuple[int, int] = (128, 128)
    exclude: tuple[str, ...] = ("lm_head", "*.mlp.gate", "*.router")

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, "
                             f"got {self.granularity!r}")
        block = tuple(self.block_size) if isinstance(self.block_size, (tuple, list)) else None
        if (block is None or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                           for b in block)):
            raise ValueError(f"block_size must be two positive ints, got {self.block_size!r}")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"exclude must be a sequence of module-name patterns, "
                             f"got {self.exclude!r}")
        # Lists are accepted for convenience; stored as tuples so the config stays hashable.
        object.__setattr__(self, "block_size", block)
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def excludes(self, module_name: str) -> bool:
        """Whether the module called ``module_name`` stays in full precision."""
        return any(fnmatchcase(module_name, pattern) or module_name == pattern
                   or module_name.endswith("." + pattern) for pattern in self.exclude)


def resolve_quant(quant: str | Fp8Config | None) -> Fp8Config | None:
    """Turn the ``quant=`` argument of ``load`` into a config, or None for no quantization.

    Args:
        quant: None, an ``Fp8Config``, or one of "none", "bf16", "fp8", "fp8-channel",
            "fp8-block" (underscores accepted in place of dashes).

    Raises:
        ValueError: on an unknown name or type.
    """
    if quant is None or isinstance(quant, Fp8Config):
        return quant
    if not isinstance(quant, str) or quant.lower() not in _QUANT_NAMES:
        raise ValueError(f"unknown quant {quant!r}; accepted: None, an Fp8Config, or one of "
                         f"{', '.join(sorted(_QUANT_NAMES))}")
    granularity = _QUANT_NAMES[quant.lower()]
    return None if granularity is None else Fp8Config(granularity=granularity)


def quant_name(config: Fp8Config | None) -> str | None:
    """The ``quant=`` name of a config (``"fp8-channel"``), ``None`` for full precision."""
    if config is None:
        return None
    return {"tensor": "fp8", "channel": "fp8-channel", "block": "fp8-block"}[config.granularity]
