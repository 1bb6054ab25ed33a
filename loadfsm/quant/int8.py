"""INT8 weight-only (W8A16) quantization: per-output-row symmetric scales, and the matmul.

Conventions:
  1. Weights are ``[N, K]`` or stacked experts ``[E, N, K]``; scales are ``[..., N, 1]`` in
     the weight's own dtype (what ``torch._weight_int8pack_mm`` reads; no float32 copy
     to keep in step with it).
  2. ``scale = max(max|w[n, :]| / 127, tiny)`` computed in float32, then rounded to the
     weight's dtype; ``tiny`` (the dtype's smallest normal) keeps an all-zero row finite.
     NaN/Inf in a row reach its scale.
  3. ``q = clamp(round(w / scale), -127, 127)`` with the rounded scale, in float32, so
     ``q * scale`` is what the kernels compute with; row chunks bound the temporaries.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .outputs import check_quantize_outputs

INT8_MAX = 127.0
# Upper bound on the float32 temporary of one quantization chunk.
_CHUNK_BYTES = 64 << 20
# torch < 2.9 computed the CPU kernel's offsets in int32 (pytorch#158341).
_INT32_LIMIT = 2**31
# Rows of activations up to which the CPU kernel beats dequantize + F.linear: its cost
# grows with every row (no reuse of a weight tile across rows), the fallback's is mostly
# the one conversion of the weight. Measured on a Xeon (AVX-512), bf16, 1 thread,
# [2048, 2048] and [512, 4096] weights: 2.1x faster at 8 rows, even at 12-16, 2x slower
# at 32.
INT8PACK_MAX_ROWS = 8


def int8_scale_shape(weight_shape: tuple[int, ...]) -> torch.Size:
    """``[..., N, 1]`` for a weight of ``[..., N, K]``.

    Raises:
        ValueError: if the weight is not 2-D or 3-D.
    """
    if len(weight_shape) not in (2, 3):
        raise ValueError(f"int8 weights are [N, K] or [E, N, K], got shape "
                         f"{tuple(weight_shape)}")
    return torch.Size([*weight_shape[:-1], 1])


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row scales of ``w`` in ``w.dtype`` (step 2); no float32 copy of ``w`` is made."""
    int8_scale_shape(w.shape)   # validates the rank
    # max and -min: no temporary the size of w, and 5x faster on CPU than an inf-norm.
    amax = torch.maximum(w.amax(dim=-1, keepdim=True), w.amin(dim=-1, keepdim=True).neg())
    amax = amax.float()
    # A tensor divisor: CUDA turns division by a Python scalar into a multiplication.
    scale = amax / torch.full_like(amax, INT8_MAX)
    return scale.clamp_min(torch.finfo(w.dtype).tiny).to(w.dtype)   # clamp_min keeps NaN


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: q int8 shaped like ``w``, scale ``[..., N, 1]`` in ``w.dtype``."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(int8_scale_shape(w.shape), dtype=w.dtype, device=w.device)
    quantize_int8_into(w, q, scale)
    return q, scale


def quantize_int8_into(w: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """Quantize ``w`` into preallocated ``q_out`` and ``scale_out``.

    Raises:
        ValueError: if ``w`` is not floating point, or the outputs do not have the
            shape, dtype and device ``w`` needs.
    """
    check_quantize_outputs(w, q_out, scale_out, scheme="int8", q_dtype=torch.int8,
                           scale_shape=int8_scale_shape(w.shape), scale_dtype=w.dtype)
    scale_out.copy_(int8_scales(w))
    n, k = w.shape[-2:]
    rows = max(1, _CHUNK_BYTES // (4 * k))
    matrices = [(w, q_out, scale_out)] if w.dim() == 2 else zip(w, q_out, scale_out)
    for w2, q2, s2 in matrices:
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            # One float32 temporary: type promotion computes bf16 / float32 in float32.
            y = torch.div(w2[r0:r1], s2[r0:r1].float())
            q2[r0:r1].copy_(y.round_().clamp_(-INT8_MAX, INT8_MAX))


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q * scale`` in ``dtype``, computed in float32."""
    return (q.float() * scale.float()).to(dtype)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ (q * scale).T + bias`` in ``out_dtype``.

    ``torch._weight_int8pack_mm`` where it fits (``use_int8pack_mm``); else the weight
    is converted to ``out_dtype`` (exact: |q| <= 127) for one ``F.linear``, and the
    scale applied to its output rows. Neither path syncs with the host.

    Args:
        x: activations ``[..., K]``.
        q: int8 weight ``[N, K]``; ``scale`` its ``[N, 1]`` scales in ``out_dtype``.
        bias: ``[N]`` or None.
    """
    n, k = q.shape
    x2 = x.reshape(-1, k).to(out_dtype)  # [M, K]
    if use_int8pack_mm(x2, q, scale):
        if x2.data_ptr() % 32 or not x2.is_contiguous():
            x2 = x2.clone(memory_format=torch.contiguous_format)   # fresh: 64-byte aligned
        out = torch._weight_int8pack_mm(x2, q, scale.view(n))
    else:
        out = F.linear(x2, q.to(out_dtype)).mul_(scale.view(1, n))
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*x.shape[:-1], n)


def use_int8pack_mm(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether ``torch._weight_int8pack_mm`` computes ``x2 @ (q * scale).T`` correctly,
    and faster than the fallback, here.

    Only its CPU kernel, for 1 to ``INT8PACK_MAX_ROWS`` rows (decode): bf16 (the
    vectorized one; fp16/fp32 take a scalar loop on x86) with ``K % 16 == 0``: the
    AVX-512 kernel steps K by 16 with aligned loads and reads past the row otherwise
    (garbage, or a crash, at K = 72 or 200). Its rows of ``q`` need 16-byte alignment;
    ``x2`` is realigned by the caller. The CUDA kernel (where torch has one) is a float
    loop per output element, without tensor cores: CUDA takes the ``F.linear`` path.
    """
    m, k = x2.shape
    n = q.shape[0]
    return (0 < m <= INT8PACK_MAX_ROWS and _has_int8pack_mm()
            and x2.device.type == "cpu" and q.device.type == "cpu"
            and x2.dtype == scale.dtype == torch.bfloat16 and k % 16 == 0
            and q.is_contiguous() and q.data_ptr() % 16 == 0
            and max(m * k, n * k, m * n) < _INT32_LIMIT)


@functools.cache
def _has_int8pack_mm() -> bool:
    return hasattr(torch, "_weight_int8pack_mm") and (
        torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CPU"))
