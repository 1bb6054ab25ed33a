"""A quantization scheme written outside loadfsm: INT4 group-wise weight-only (W4A16).

A scheme is three pieces, none of them inside the package:
  1. a frozen config: what the scheme needs to know, and ``excludes(module_name)``;
  2. a kernel module that runs on the quantized tensors and says what feeds it
     (``full_precision_slots()``) and how it was made (``config``);
  3. a ``Handler``: ``quantize`` turns a complete layer's full-precision staging into
     tensors, ``install`` says what the model gets, ``live_tensors`` which tensors a
     push overwrites; its ``installs`` names the kernel module, so a loaded model
     re-plans onto the handler (a bare ``loadfsm.WeightSync(model)``).
``register_handler(handler, modules=(nn.Linear,), config=Int4Config)`` plugs it in:
``loadfsm.load(model, ..., quant=Int4Config())`` then loads every ``nn.Linear`` the
config does not exclude with it, layer by layer, and ``WeightSync.push`` re-quantizes
pushed bf16 weights into the live tensors in place.

The format: symmetric, one float32 scale per ``group_size`` (128) consecutive input
columns of a row, ``scale = max|w| / 7``, codes ``round(w / scale)`` in [-7, 7], stored
``+ 8`` two per byte (column ``2j`` in the low nibble, ``2j + 1`` in the high one):
``weight`` is uint8 ``[N, K / 2]``, ``weight_scale`` float32 ``[N, K / group_size]``.
``K`` must be a multiple of ``group_size``; exclude modules where it is not.

The run loads the reference model, checks every INT4 layer against a dequantized
reference computed independently (no packing) and the logits bit for bit against the
bf16 model holding those dequantized weights, then pushes new weights and checks the
same again, and that no tensor moved.

    python examples/custom_handler.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import loadfsm
from loadfsm.handlers import Handler, Install, register_handler
from loadfsm.quant import sqnr_db
from loadfsm.quant.config import DEFAULT_EXCLUDE, checked_exclude, excluded
from loadfsm.testing import build_model, load_reference_model, reference_state_dict

INT4_MAX = 7


@dataclass(frozen=True)
class Int4Config:
    """INT4 group-wise weight-only. Frozen and hashable: a loaded model's modules carry
    it, and re-planning reads it back from them."""

    group_size: int = 128
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    name = "int4-g128"          # what LoadReport.quant says (a plain class attribute)

    def __post_init__(self):
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be even and >= 2, got {self.group_size}")
        object.__setattr__(self, "exclude", checked_exclude(self.exclude))

    def excludes(self, module_name: str) -> bool:
        return excluded(module_name, self.exclude)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, scale)`` of a ``[N, K]`` weight (the format in the module docstring)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}; "
                         f"exclude this module")
    groups = w.float().reshape(n, k // group_size, group_size)
    scale = groups.abs().amax(dim=-1).clamp_min(1e-12) / INT4_MAX           # [N, K/G]
    codes = (groups / scale[..., None]).round().clamp(-INT4_MAX, INT4_MAX).reshape(n, k)
    nibbles = (codes + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The ``[N, K]`` weight ``packed`` and ``scale`` stand for, in ``dtype``."""
    n, half = packed.shape
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    codes = torch.stack([low, high], dim=-1).reshape(n, scale.shape[1], -1).float()
    return (codes * scale[..., None]).reshape(n, 2 * half).to(dtype)


class Int4Linear(nn.Module):
    """A linear layer on INT4 weights; ``forward`` dequantizes and runs ``F.linear``
    (a real engine would call a W4A16 kernel here)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 config: Int4Config, out_dtype: torch.dtype):
        super().__init__()
        self.config, self.out_dtype = config, out_dtype
        # ``weight`` names the slot a checkpoint feeds (full_precision_slots) and holds
        # its quantized form: re-planning finds the slot's live tensor under its name.
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    def full_precision_slots(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """What a checkpoint or a push feeds this layer: the full-precision weight (and
        bias). A loaded model is re-planned from this."""
        n, half = self.weight.shape
        slots = {"weight": (torch.Size([n, 2 * half]), self.out_dtype)}
        if self.bias is not None:
            slots["bias"] = (self.bias.shape, self.bias.dtype)
        return slots

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(self.weight, self.weight_scale, self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(), self.bias)


class Int4Handler(Handler):
    """``nn.Linear`` -> ``Int4Linear``. Stateless: one instance serves every layer."""

    name = "int4"
    installs = (Int4Linear,)
    makes_new_tensors = True

    def quantize(self, rec, config: Int4Config) -> dict[str, torch.Tensor]:
        # rec.staging: the layer's complete full-precision tensors, freed after this.
        packed, scale = quantize_int4(rec.staging["weight"], config.group_size)
        results = {"weight": packed, "weight_scale": scale}
        if "bias" in rec.staging:
            results["bias"] = rec.staging["bias"]
        return results

    def install(self, rec, config: Int4Config) -> Install:
        res = rec.results
        return Install(module=Int4Linear(res["weight"], res["weight_scale"], res.get("bias"),
                                         config, out_dtype=rec.slots["weight"].dtype))

    def live_tensors(self, rec) -> dict[str, torch.Tensor]:
        # A push's results are copied into these, attribute by attribute, in place.
        return dict(rec.module.named_parameters(recurse=False))


register_handler(Int4Handler(), modules=(nn.Linear,), config=Int4Config)


# -- the run: load, check, push, check ------------------------------------------------
def reference_dequantized(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """The same format written the plain way, one group at a time, with no packing."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for g in range(w.shape[1] // group_size):
        cols = slice(g * group_size, (g + 1) * group_size)
        block = w[:, cols].float()
        scale = block.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / INT4_MAX
        out[:, cols] = torch.clamp(torch.round(block / scale), -INT4_MAX, INT4_MAX) * scale
    return out.to(w.dtype)


def check(model: nn.Module, config_name: str, seed: int, quant: Int4Config) -> str:
    """Every Int4Linear equals the reference dequantization of the seed's weights, and
    the logits equal, bit for bit, those of the bf16 model holding those weights.
    Returns the SQNR of the weights (the worst layer) and of the logits against the
    plain bf16 model: 4 bits cost ~20 dB per weight, and these random-weight models
    add the error of every layer in series."""
    bf16 = load_reference_model(config_name, seed=seed)
    original = {n: p.detach().clone() for n, p in bf16.named_parameters()}
    int4 = [(n, m) for n, m in model.named_modules() if isinstance(m, Int4Linear)]
    if not int4:
        raise SystemExit("no layer was loaded by the INT4 handler")
    weight_sqnr = math.inf
    with torch.no_grad():
        for name, module in int4:
            expected = reference_dequantized(original[f"{name}.weight"], quant.group_size)
            if not torch.equal(module.dequantized(), expected):
                raise SystemExit(f"{name}: INT4 weight differs from the reference")
            bf16.get_submodule(name).weight.copy_(expected)
            weight_sqnr = min(weight_sqnr, sqnr_db(original[f"{name}.weight"], expected))
        tokens = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
        ours, theirs = model(tokens), bf16(tokens)
        if not torch.equal(ours, theirs):
            raise SystemExit("logits differ from the dequantized reference model")
        for name, param in bf16.named_parameters():
            param.copy_(original[name])
        logits_sqnr = sqnr_db(bf16(tokens).float(), ours.float())
    return f"SQNR vs bf16: weights >= {weight_sqnr:.1f} dB, logits {logits_sqnr:.1f} dB"


def main() -> None:
    config_name, quant = "tiny", Int4Config()
    model = build_model(config_name)                          # on meta
    report = loadfsm.load(model, reference_state_dict(config_name, seed=0).items(),
                          quant=quant, device="cpu")
    layers = sum(isinstance(m, Int4Linear) for m in model.modules())
    print(f"loaded: {report.states['FINALIZED']} layers FINALIZED, {layers} INT4, "
          f"quant={report.quant}, peak {report.peak_bytes / 2**20:.1f} MiB, "
          f"final {report.final_bytes / 2**20:.1f} MiB")
    print(f"load matches the dequantized reference; {check(model, config_name, 0, quant)}")

    addresses = {n: t.data_ptr() for n, t in model.state_dict().items()}
    sync = loadfsm.WeightSync(model)                          # re-planned from the model
    pushed = sync.push(reference_state_dict(config_name, seed=1).items())
    moved = [n for n, t in model.state_dict().items() if t.data_ptr() != addresses[n]]
    if moved:
        raise SystemExit(f"push moved {moved[:3]}")
    print(f"pushed: {pushed.layers_updated} layers in place, no tensor moved; "
          f"matches the dequantized reference; {check(model, config_name, 1, quant)}")
    bits = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
               if n.endswith(".weight") and t.dtype == torch.uint8) * 8
    weights = sum(math.prod(m.full_precision_slots()["weight"][0])
                  for m in model.modules() if isinstance(m, Int4Linear))
    print(f"INT4 weights: {bits / weights:.1f} bits per weight before scales")


if __name__ == "__main__":
    main()
