"""Quantization settings: one frozen config per scheme (FP8, INT8), and the names
``load(quant=...)`` accepts. A scheme's handlers register under its config type
(``handlers.registry``); any object with ``excludes(module_name)`` is a config to them."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import ClassVar, Literal

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
# Modules every scheme leaves in full precision by default (see ``Fp8Config.exclude``).
DEFAULT_EXCLUDE = ("lm_head", "*.mlp.gate", "*.router")


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
        requantize: a checkpoint already in FP8 at another granularity (a block-FP8
            checkpoint loaded with ``granularity="tensor"``) is requantized to this one
            on the device; by default the checkpoint's granularity is kept (and a trace
            warning names both). See ``quant.fp8_layout``.

    Raises:
        ValueError: on an unknown granularity, a bad block size or a bad exclude list.
    """

    granularity: Literal["tensor", "channel", "block"] = "tensor"
    block_size: tuple[int, int] = (128, 128)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    requantize: bool = False

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, "
                             f"got {self.granularity!r}")
        block = tuple(self.block_size) if isinstance(self.block_size, (tuple, list)) else None
        if (block is None or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                           for b in block)):
            raise ValueError(f"block_size must be two positive ints, got {self.block_size!r}")
        # Lists are accepted for convenience; stored as tuples so the config stays hashable.
        object.__setattr__(self, "block_size", block)
        object.__setattr__(self, "exclude", checked_exclude(self.exclude))

    def excludes(self, module_name: str) -> bool:
        """Whether the module called ``module_name`` stays in full precision."""
        return excluded(module_name, self.exclude)


@dataclass(frozen=True)
class Int8Config:
    """INT8 weight-only quantization (W8A16): one symmetric scale per output row.

    ``scale = max|w[n, :]| / 127``, stored in the weight's own dtype (what
    ``torch._weight_int8pack_mm`` reads); ``q = round(w / scale)`` clamped to
    [-127, 127]. Activations stay in full precision.

    Args:
        exclude: module names left unquantized, matched as in ``Fp8Config.exclude``
            (same default: ``lm_head`` and MoE routers).

    Raises:
        ValueError: on a bad exclude list.
    """

    name: ClassVar[str] = "int8"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    def __post_init__(self):
        object.__setattr__(self, "exclude", checked_exclude(self.exclude))

    def excludes(self, module_name: str) -> bool:
        """Whether the module called ``module_name`` stays in full precision."""
        return excluded(module_name, self.exclude)


def excluded(module_name: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``module_name`` matches a pattern: fnmatch-style on the full name, or as a
    plain dotted suffix ("lm_head" matches "model.lm_head")."""
    return any(fnmatchcase(module_name, pattern) or module_name == pattern
               or module_name.endswith("." + pattern) for pattern in patterns)


def checked_exclude(exclude) -> tuple[str, ...]:
    """``exclude`` as a tuple of patterns (lists accepted; a tuple keeps a config hashable).

    Raises:
        ValueError: a bare string, or a pattern that is not a string.
    """
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise ValueError(f"exclude must be a sequence of module-name patterns, "
                         f"got {exclude!r}")
    return tuple(exclude)


def resolve_quant(quant):
    """Turn the ``quant=`` argument of ``load`` into a config, or None for no quantization.

    Args:
        quant: None; a config object (``Fp8Config``, ``Int8Config``, or a user's scheme's
            config: anything with ``excludes(module_name)``), passed through; or one of
            "none", "bf16", "fp8", "fp8-channel", "fp8-block", "int8" (underscores
            accepted in place of dashes).

    Raises:
        ValueError: on an unknown name or type.
    """
    if quant is None or callable(getattr(quant, "excludes", None)):
        return quant
    if not isinstance(quant, str) or quant.lower() not in (*_QUANT_NAMES, Int8Config.name):
        raise ValueError(f"unknown quant {quant!r}; accepted: None, a config (Fp8Config, "
                         f"Int8Config), or one of "
                         f"{', '.join(sorted((*_QUANT_NAMES, Int8Config.name)))}")
    if quant.lower() == Int8Config.name:
        return Int8Config()
    granularity = _QUANT_NAMES[quant.lower()]
    return None if granularity is None else Fp8Config(granularity=granularity)


def quant_name(config) -> str | None:
    """The ``quant=`` name of a config (``"fp8-channel"``, ``"int8"``; a user's config:
    its ``name``, else its class name), ``None`` for full precision."""
    if config is None:
        return None
    if isinstance(config, Fp8Config):
        return {"tensor": "fp8", "channel": "fp8-channel",
                "block": "fp8-block"}[config.granularity]
    return getattr(config, "name", type(config).__name__)
