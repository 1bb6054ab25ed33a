"""Fused Triton kernels for FP8 quantization on CUDA, bit-identical to ``fp8.py``.

``quantize_fp8_into`` calls ``quantize_into`` here when ``triton_available`` and ``supports``
say yes. Each kernel follows the steps of ``fp8.py``'s docstring exactly: the scale is
``max(amax, _MIN_AMAX) / 448`` with IEEE division (``tl.div_rn``), the reciprocal is
``div_rn(1, scale)``, and the quantized value is ``clamp(x * inv, -448, 448)`` cast
round-to-nearest-even to e4m3fn.
  - tensor: a partial-amax kernel, then a quantize kernel whose programs each reduce the
    partials to the scale. Two reads of the weight are unavoidable for one global scale.
  - channel: one kernel per group of rows; rows of up to ``_ONE_PASS_K`` elements are read
    once and kept in registers, longer rows are read twice (the second read mostly hits L2).
  - block: one kernel, one program per tile, one read.
Importing this module never fails: without Triton, ``triton_available`` is False.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from loadfsm.quant.config import Fp8Config
from loadfsm.quant.fp8 import _MIN_AMAX, FP8_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_STREAM_BLOCK = 4096  # elements per program step in the per-tensor kernels
_ONE_PASS_K = 16384  # rows up to this many (power-of-two padded) elements stay in registers
_TILE = 8192  # elements per [BLOCK_M, BLOCK_K] tile of the channel kernel
_GROUP_ROWS = 64  # tokens per program of the activation-group kernel


def triton_available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device`` (CUDA with Triton importable)."""
    return torch.device(device).type == "cuda" and triton is not None and torch.cuda.is_available()


def supports(w: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor,
             config: Fp8Config) -> bool:
    """Whether these tensors fit the kernels: contiguous, and power-of-two tiles for blocks."""
    if not (w.is_contiguous() and q_out.is_contiguous() and scale_out.is_contiguous()):
        return False
    if config.granularity == "block":
        return all(b & (b - 1) == 0 and b >= 16 for b in config.block_size)
    return True


def quantize_into(w: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor,
                  config: Fp8Config) -> None:
    """Quantize ``w`` ([N, K] or [E, N, K], contiguous) into ``q_out`` and ``scale_out``."""
    n, k = w.shape[-2:]
    experts = w.shape[0] if w.dim() == 3 else 1
    with _on_device_of(w):
        if config.granularity == "tensor":
            _quantize_tensor(w, q_out, scale_out, experts, n * k)
        elif config.granularity == "channel":
            _quantize_channel(w, q_out, scale_out, experts * n, k)
        else:
            _quantize_block(w, q_out, scale_out, experts, n, k, *config.block_size)


def quantize_groups_into(x: torch.Tensor, q_out: torch.Tensor, scale_t_out: torch.Tensor,
                         group: int) -> None:
    """Activations ``x [M, K]`` (contiguous) quantized per row in groups of ``group``
    columns, each group exactly as the per-row kernel quantizes a row: codes into the
    first M rows of ``q_out [>= M, K]``, scales transposed into ``scale_t_out
    [K / group, >= M]`` (``F.scaled_mm``'s 1x128 operand layout). One launch: a forward's
    host time is most of its cost at prefill sizes."""
    m, k = x.shape
    block_m = min(_GROUP_ROWS, triton.next_power_of_2(m))
    grid = (triton.cdiv(m, block_m), k // group)
    with _on_device_of(x):
        _quantize_groups_kernel[grid](x, q_out, scale_t_out, m, k, scale_t_out.stride(0),
                                      FP8_MAX=FP8_MAX, MIN_AMAX=_MIN_AMAX, BLOCK_M=block_m,
                                      GROUP=group, num_warps=4)


def quantize_rows_into(x: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """``quantize_into`` per channel for activations ``x [M, K]`` (contiguous, like the
    outputs) on the current device, without its checks: a forward's per-token scales."""
    with _on_device_of(x):
        _quantize_channel(x, q_out, scale_out, x.shape[0], x.shape[1])


def _on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current device, which need not be the tensor's: switched
    only when it is another one (the switch costs more host time than some kernels)."""
    if t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _quantize_tensor(w, q_out, scale_out, experts, numel):
    partials = _num_partials(numel, experts)
    span = triton.cdiv(triton.cdiv(numel, partials), _STREAM_BLOCK) * _STREAM_BLOCK
    amax = torch.empty(experts, partials, dtype=torch.float32, device=w.device)
    grid = (partials, experts)
    _amax_kernel[grid](w, amax, numel, span, partials, BLOCK=_STREAM_BLOCK, num_warps=8)
    _quantize_tensor_kernel[grid](w, q_out, amax, scale_out, numel, span, partials,
                                  FP8_MAX=FP8_MAX, MIN_AMAX=_MIN_AMAX, BLOCK=_STREAM_BLOCK,
                                  PARTIALS=triton.next_power_of_2(partials), num_warps=8)


def _quantize_channel(w, q_out, scale_out, rows, k):
    padded_k = triton.next_power_of_2(k)
    one_pass = padded_k <= _ONE_PASS_K
    block_k = padded_k if one_pass else _TILE // 4
    block_m = max(1, min(_TILE // block_k, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_m),)
    _quantize_channel_kernel[grid](w, q_out, scale_out, rows, k, FP8_MAX=FP8_MAX,
                                   MIN_AMAX=_MIN_AMAX, BLOCK_M=block_m, BLOCK_K=block_k,
                                   ONE_PASS=one_pass,
                                   num_warps=8 if block_m * block_k >= _TILE else 4)


def _quantize_block(w, q_out, scale_out, experts, n, k, bn, bk):
    grid = (triton.cdiv(k, bk), triton.cdiv(n, bn), experts)
    _quantize_block_kernel[grid](w, q_out, scale_out, n, k, FP8_MAX=FP8_MAX,
                                 MIN_AMAX=_MIN_AMAX, BLOCK_N=bn, BLOCK_K=bk,
                                 num_warps=8 if bn * bk >= _TILE else 4)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_partials(numel: int, experts: int) -> int:
    """Programs per expert for the amax pass: enough to fill the GPU a few times over."""
    target = max(1, 4 * _sm_count(torch.cuda.current_device()) // experts)
    return max(1, min(target, triton.cdiv(numel, _STREAM_BLOCK)))


if triton is not None:

    @triton.jit
    def _max_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _scaled_clamped(x, inv, FP8_MAX: tl.constexpr):
        # float32 values ready for the round-to-nearest-even cast to e4m3fn
        return tl.minimum(tl.maximum(x * inv, -FP8_MAX), FP8_MAX)

    @triton.jit
    def _scale_and_inv(amax, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr):
        # IEEE division, as torch does; plain `/` may compile to an approximate divide.
        scale = tl.div_rn(tl.maximum(amax, MIN_AMAX, propagate_nan=tl.PropagateNan.ALL),
                          FP8_MAX)
        inv = tl.div_rn(1.0, scale)
        return scale, inv

    @triton.jit
    def _amax_kernel(x_ptr, amax_ptr, numel, span, num_partials, BLOCK: tl.constexpr):
        # grid: (partials, experts); program (p, e) reduces x[e].flat[p*span:(p+1)*span].
        pid, expert = tl.program_id(0), tl.program_id(1)
        base = x_ptr + expert.to(tl.int64) * numel
        start = pid.to(tl.int64) * span
        acc = tl.zeros([BLOCK], tl.float32)
        for off in range(0, span, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            x = tl.load(base + idx, mask=idx < numel, other=0.0)
            acc = _max_nan(acc, tl.abs(x.to(tl.float32)))
        tl.store(amax_ptr + expert * num_partials + pid, tl.reduce(acc, 0, _max_nan))

    @triton.jit
    def _quantize_tensor_kernel(x_ptr, q_ptr, amax_ptr, scale_ptr, numel, span, num_partials,
                                FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
                                BLOCK: tl.constexpr, PARTIALS: tl.constexpr):
        # grid and spans as in _amax_kernel; every program finishes the amax reduction
        # itself (a few KB from L2), so no host-side op sits between the two kernels.
        q_ty = q_ptr.dtype.element_ty
        pid, expert = tl.program_id(0), tl.program_id(1)
        part = tl.arange(0, PARTIALS)
        amax = tl.load(amax_ptr + expert * num_partials + part, mask=part < num_partials,
                       other=0.0)
        scale, inv = _scale_and_inv(tl.reduce(amax, 0, _max_nan), FP8_MAX, MIN_AMAX)
        if pid == 0:
            tl.store(scale_ptr + expert, scale)
        base = expert.to(tl.int64) * numel
        start = pid.to(tl.int64) * span
        for off in range(0, span, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < numel
            x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_ptr + base + idx, _scaled_clamped(x, inv, FP8_MAX).to(q_ty), mask=mask)

    @triton.jit
    def _quantize_channel_kernel(x_ptr, q_ptr, scale_ptr, rows, K, FP8_MAX: tl.constexpr,
                                 MIN_AMAX: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
        # grid: (cdiv(rows, BLOCK_M),); x, q: [rows, K]; scale: [rows]
        q_ty = q_ptr.dtype.element_ty
        row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = row < rows
        row_off = row.to(tl.int64)[:, None] * K
        col = tl.arange(0, BLOCK_K)[None, :]
        if ONE_PASS:
            mask = row_mask[:, None] & (col < K)
            x = tl.load(x_ptr + row_off + col, mask=mask, other=0.0).to(tl.float32)
            scale, inv = _scale_and_inv(tl.reduce(tl.abs(x), 1, _max_nan), FP8_MAX, MIN_AMAX)
            tl.store(scale_ptr + row, scale, mask=row_mask)
            tl.store(q_ptr + row_off + col,
                     _scaled_clamped(x, inv[:, None], FP8_MAX).to(q_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = row_mask[:, None] & (col + k0 < K)
                x = tl.load(x_ptr + row_off + k0 + col, mask=mask, other=0.0)
                acc = _max_nan(acc, tl.abs(x.to(tl.float32)))
            scale, inv = _scale_and_inv(tl.reduce(acc, 1, _max_nan), FP8_MAX, MIN_AMAX)
            tl.store(scale_ptr + row, scale, mask=row_mask)
            for k0 in range(0, K, BLOCK_K):
                mask = row_mask[:, None] & (col + k0 < K)
                x = tl.load(x_ptr + row_off + k0 + col, mask=mask, other=0.0).to(tl.float32)
                tl.store(q_ptr + row_off + k0 + col,
                         _scaled_clamped(x, inv[:, None], FP8_MAX).to(q_ty), mask=mask)

    @triton.jit
    def _quantize_block_kernel(x_ptr, q_ptr, scale_ptr, N, K, FP8_MAX: tl.constexpr,
                               MIN_AMAX: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        # grid: (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N), experts); scale: [E, cdiv(N), cdiv(K)]
        q_ty = q_ptr.dtype.element_ty
        col_block, row_block, expert = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        row = row_block * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        col = col_block * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        mask = (row < N) & (col < K)
        offset = expert.to(tl.int64) * N * K + row.to(tl.int64) * K + col
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        amax = tl.reduce(tl.reduce(tl.abs(x), 1, _max_nan), 0, _max_nan)
        scale, inv = _scale_and_inv(amax, FP8_MAX, MIN_AMAX)
        col_blocks = tl.num_programs(0)
        scale_idx = (expert * tl.num_programs(1) + row_block) * col_blocks + col_block
        tl.store(scale_ptr + scale_idx, scale)
        tl.store(q_ptr + offset, _scaled_clamped(x, inv, FP8_MAX).to(q_ty), mask=mask)

    @triton.jit
    def _quantize_groups_kernel(x_ptr, q_ptr, scale_ptr, M, K, scale_stride,
                                FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
                                BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
        # grid: (cdiv(M, BLOCK_M), K / GROUP); x, q: [M, K] rows of stride K; the scale of
        # row m, group g at scale_ptr[g * scale_stride + m].
        q_ty = q_ptr.dtype.element_ty
        row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        group = tl.program_id(1)
        row_mask = row < M
        offset = row.to(tl.int64)[:, None] * K + group * GROUP + tl.arange(0, GROUP)[None, :]
        mask = row_mask[:, None] & (tl.arange(0, GROUP)[None, :] < GROUP)
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        scale, inv = _scale_and_inv(tl.reduce(tl.abs(x), 1, _max_nan), FP8_MAX, MIN_AMAX)
        tl.store(scale_ptr + group * scale_stride + row, scale, mask=row_mask)
        tl.store(q_ptr + offset, _scaled_clamped(x, inv[:, None], FP8_MAX).to(q_ty), mask=mask)
