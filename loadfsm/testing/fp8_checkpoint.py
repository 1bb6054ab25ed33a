"""Pre-quantized FP8 checkpoints in the layouts published models use, from bf16 tensors.

``quantize_state`` turns a bf16 state dict (checkpoint naming) into one of three
layouts, exactly as their publishers store them; ``write_fp8_checkpoint`` writes it as
safetensors with the ``config.json`` that says so:
  - ``"deepseek"``: 128x128 (or ``block_size``) block scales named ``weight_scale_inv``,
    ``quant_method: "fp8"`` with ``weight_block_size`` (DeepSeek-V3, Qwen3-FP8);
  - ``"compressed-tensors"``: per-channel ``weight_scale`` ``[N, 1]``, ``format:
    "float-quantized"``, ``strategy: "channel"``;
  - ``"modelopt"``: per-tensor ``weight_scale`` ``[]`` with a static ``input_scale``,
    ``quant_method: "modelopt"``.
``dequantized_state`` gives the bf16 weights those FP8 tensors stand for.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch

from ..quant.config import Fp8Config
from ..quant.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from ..sources.checkpoint_config import CONFIG_NAME
from ..sources.dtypes import NAMES
from .checkpoint import _raw_bytes

LAYOUTS = ("deepseek", "compressed-tensors", "modelopt")
_SCALE = {"deepseek": "weight_scale_inv", "compressed-tensors": "weight_scale",
          "modelopt": "weight_scale"}
_GRANULARITY = {"deepseek": "block", "compressed-tensors": "channel", "modelopt": "tensor"}


def projections(name: str) -> bool:
    """The weights quantized by default: every ``*_proj.weight`` (not embeddings, norms,
    ``lm_head`` or MoE routers, which FP8 checkpoints keep in bf16)."""
    return name.endswith("_proj.weight")


def layout_config(layout: str, block_size: tuple[int, int] = (128, 128)) -> Fp8Config:
    """The ``Fp8Config`` whose math a ``layout`` stores."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return Fp8Config(granularity=_GRANULARITY[layout], block_size=block_size)


def quantize_state(state: dict[str, torch.Tensor], layout: str, *,
                   block_size: tuple[int, int] = (128, 128),
                   quantize: Callable[[str], bool] = projections) -> dict[str, torch.Tensor]:
    """``state`` with every weight ``quantize`` accepts replaced by its FP8 form and its
    scale (named as ``layout`` names it); ``"modelopt"`` adds an ``input_scale`` each."""
    config = layout_config(layout, block_size)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not quantize(name):
            out[name] = tensor
            continue
        q, scale = quantize_fp8(tensor, config)
        prefix = name[:-len("weight")]
        out[name], out[prefix + _SCALE[layout]] = q, scale
        if layout == "modelopt":
            out[prefix + "input_scale"] = tensor.abs().amax().float() / 448.0
    return out


def dequantized_state(tensors: dict[str, torch.Tensor], layout: str, *,
                      block_size: tuple[int, int] = (128, 128),
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The full-precision state an FP8 ``layout`` checkpoint stands for: each FP8 weight
    times its scale in ``dtype``; scales and activation scales dropped."""
    config = layout_config(layout, block_size)
    out = {}
    for name, tensor in tensors.items():
        if name.endswith((_SCALE[layout], "input_scale")):
            continue
        if tensor.dtype == FP8_DTYPE:
            scale = tensors[name[:-len("weight")] + _SCALE[layout]]
            tensor = dequantize_fp8(tensor, scale.reshape(()) if scale.numel() == 1
                                    and config.granularity == "tensor" else scale, config,
                                    dtype)
        out[name] = tensor
    return out


def quantization_config(layout: str, block_size: tuple[int, int] = (128, 128),
                        ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    """``config.json``'s ``quantization_config`` as each publisher writes it."""
    if layout == "deepseek":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(block_size)}
    if layout == "compressed-tensors":
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "ignore": list(ignore),
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                "symmetric": True, "dynamic": False},
                    "input_activations": {"num_bits": 8, "type": "float",
                                          "strategy": "token", "dynamic": True}}}}
    return {"quant_method": "modelopt", "quant_algo": "FP8",
            "exclude_modules": list(ignore)}


def write_fp8_checkpoint(tensors: dict[str, torch.Tensor], directory: str | Path, *,
                         layout: str, block_size: tuple[int, int] = (128, 128),
                         config: dict | None = None) -> Path:
    """Write ``tensors`` (from ``quantize_state``) as ``model.safetensors`` and a
    ``config.json`` holding ``config`` (default: an empty model config) with the
    ``layout``'s ``quantization_config``. Returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, directory / "model.safetensors")
    body = dict(config or {})
    body["quantization_config"] = quantization_config(layout, block_size)
    (directory / CONFIG_NAME).write_text(json.dumps(body, indent=2) + "\n")
    return directory


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Any CPU tensors (FP8 included) as one safetensors file, in the given order."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors.values():
            f.write(_raw_bytes(tensor.detach().cpu()))
    return Path(path)
