"""FP8 (e4m3fn) weight quantization: the torch reference, which runs on every device.

Conventions (shared with the Triton kernels, which reproduce this file bit for bit):
  1. Weights are ``[N, K]`` or stacked experts ``[E, N, K]``; every scale is float32.
  2. ``scale = max(amax, _MIN_AMAX) / 448`` per tensor (per expert), per row or per tile.
     NaN/Inf in the weight reach the scale, so callers detect them with ``isfinite``.
  3. ``q = clamp(w.float() * (1 / scale), -448, 448).to(float8_e4m3fn)``: the reciprocal is
     computed once in float32 and multiplied, never divided per element.
  4. Quantization runs in row chunks so the float32 temporary stays under ``_CHUNK_BYTES``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator

import torch

from loadfsm.quant.config import Fp8Config
from loadfsm.quant.outputs import check_quantize_outputs

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# An all-zero tensor gets scale _MIN_AMAX / 448: tiny and positive, so 1 / scale is finite.
_MIN_AMAX = 1e-12
# Upper bound on the float32 temporary of one quantization chunk.
_CHUNK_BYTES = 64 << 20
_INF = float("inf")
# Input dtypes a float32 multiply promotes exactly (step 3 needs no ``x.float()`` copy).
_PROMOTED = (torch.bfloat16, torch.float16)
# Per thread: whether ``reference_kernels`` is in force.
_THREAD = threading.local()
# Elements per chunk of the underflow count (see ``flushed_to_zero``).
_COUNT_CHUNK_MIN, _COUNT_CHUNK_MAX = 1 << 18, 1 << 24


def fp8_scale_shape(weight_shape: tuple[int, ...], config: Fp8Config) -> torch.Size:
    """Shape of the scale tensor for a weight of ``weight_shape`` (see module docstring).

    Raises:
        ValueError: if the weight is not 2-D or 3-D.
    """
    if len(weight_shape) not in (2, 3):
        raise ValueError(f"fp8 weights are [N, K] or [E, N, K], got shape {tuple(weight_shape)}")
    *lead, n, k = weight_shape
    if config.granularity == "tensor":
        return torch.Size(lead)
    if config.granularity == "channel":
        return torch.Size([*lead, n, 1])
    bn, bk = config.block_size
    return torch.Size([*lead, math.ceil(n / bn), math.ceil(k / bk)])


def fp8_scales(w: torch.Tensor, config: Fp8Config) -> torch.Tensor:
    """Float32 scales of ``w`` (``[N, K]`` or ``[E, N, K]``) at ``config.granularity``.

    Non-finite values in ``w`` give non-finite scales. No float32 copy of ``w`` is made.
    """
    fp8_scale_shape(w.shape, config)  # validates the rank
    return _scale_from_amax(_amax(w, config))


def _amax(w: torch.Tensor, config: Fp8Config) -> torch.Tensor:
    """``max |w|`` over each scale's elements, a new tensor in ``w``'s dtype."""
    if config.granularity == "tensor":
        return torch.linalg.vector_norm(w, ord=_INF, dim=(-2, -1))
    if config.granularity == "channel":
        return torch.linalg.vector_norm(w, ord=_INF, dim=-1, keepdim=True)
    return _block_amax(w, *config.block_size)


def quantize_fp8(w: torch.Tensor, config: Fp8Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to ``(q, scale)``: q is float8_e4m3fn like ``w``, scale is float32.

    Uses the fused Triton kernels on CUDA when available (bit-identical to the reference).
    """
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(fp8_scale_shape(w.shape, config), dtype=torch.float32, device=w.device)
    quantize_fp8_into(w, q, scale, config)
    return q, scale


def quantize_fp8_into(w: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor,
                      config: Fp8Config) -> None:
    """Quantize ``w`` into the preallocated ``q_out`` and ``scale_out`` (in-place reload).

    Raises:
        ValueError: if ``q_out`` / ``scale_out`` do not have the shape and dtype ``w`` needs.
    """
    _check_outputs(w, q_out, scale_out, config)
    kernels = None if getattr(_THREAD, "reference", False) else cuda_kernels(w)
    if kernels is not None and kernels.supports(w, q_out, scale_out, config):
        kernels.quantize_into(w, q_out, scale_out, config)
        return
    _quantize_reference_into(w, q_out, scale_out, config)


def cuda_kernels(t: torch.Tensor):
    """The fused kernels' module (``triton_fp8``) where they run on ``t``'s device, else
    ``None``; imported at first use, since Triton exists only next to CUDA."""
    if not t.is_cuda:
        return None
    from loadfsm.quant import triton_fp8

    return triton_fp8 if triton_fp8.triton_available(t.device) else None


def warm_fp8_kernels(config: Fp8Config, device: torch.device) -> None:
    """Quantize a small tensor on ``device`` so the first real weight does not wait for
    the kernels: on CUDA, Triton's first launch in a process initializes its driver and
    loads (or compiles) the kernels, about 0.6 s with a warm disk cache."""
    if torch.device(device).type == "cuda":
        quantize_fp8(torch.ones(256, 256, dtype=torch.bfloat16, device=device), config)


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """In this thread, quantize with the torch reference (bit-identical to the kernels):
    a load's first layers use it while another thread readies the kernels, so they
    neither wait for Triton nor launch it from two threads at once."""
    before = getattr(_THREAD, "reference", False)
    _THREAD.reference = True
    try:
        yield
    finally:
        _THREAD.reference = before


def quantize_fp8_reference(w: torch.Tensor,
                           config: Fp8Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8`` forced onto the torch reference path (tests compare kernels to it)."""
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(fp8_scale_shape(w.shape, config), dtype=torch.float32, device=w.device)
    _check_outputs(w, q, scale, config)
    _quantize_reference_into(w, q, scale, config)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, config: Fp8Config,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q * scale`` in ``dtype``; ``q`` is ``[N, K]`` or ``[E, N, K]``."""
    n, k = q.shape[-2:]
    return (q.float() * _expand_scale(scale, config, 0, n, k)).to(dtype)


def sample_rows(w: torch.Tensor, q: torch.Tensor,
                limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Views of the same rows of ``w`` and its FP8 form ``q``, evenly strided, holding
    at most ``limit`` elements (all rows when the tensor is that small); ``None`` when
    ``q`` is not ``w``'s shape, even transposed (a kernel layout stored as ``[K, N]``)."""
    if q.shape != w.shape and q.dim() >= 2 and q.transpose(-1, -2).shape == w.shape:
        q = q.transpose(-1, -2)
    if q.shape != w.shape or w.dim() == 0:
        return None
    w2, q2 = w.reshape(-1, w.shape[-1]), q.reshape(-1, q.shape[-1])
    step = max(1, -(-w2.numel() // limit))
    return w2[::step], q2[::step]


def flushed_to_zero(w: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flushed, nonzero)``: how many nonzero values of ``w`` became zero in its FP8
    form ``q``, and how many were nonzero. Counts stay on the device (no sync), so a
    caller can check them with its other batched verifications.

    Counted in chunks of at most 1/16 of the tensor (2 bytes of temporaries per element
    of a chunk, so at most 1/8 byte per element of ``w`` and never over 32 MiB): the
    Triton path quantizes with no temporaries, and this check must not add a layer's worth.
    """
    w1, q1 = w.reshape(-1), q.view(torch.uint8).reshape(-1)
    numel = w1.numel()
    chunk = max(_COUNT_CHUNK_MIN, min(_COUNT_CHUNK_MAX, numel // 16))
    flushed = nonzero = None
    for i in range(0, numel, chunk):
        # one chunk (a sampled weight's usual case) is counted without slicing or summing up
        w_part, q_part = (w1, q1) if numel <= chunk else (w1[i:i + chunk], q1[i:i + chunk])
        nz = w_part != 0
        zero = (q_part & 0x7F).eq_(0)                   # +0 and -0 in e4m3fn
        counts = zero.mul_(nz).sum(), nz.sum()
        del nz, zero
        if flushed is None:
            flushed, nonzero = counts
        else:
            flushed += counts[0]
            nonzero += counts[1]
    if flushed is None:                                 # an empty tensor
        return (torch.zeros((), dtype=torch.int64, device=w.device),
                torch.zeros((), dtype=torch.int64, device=w.device))
    return flushed, nonzero


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``ref`` in dB (float64)."""
    ref64, test64 = ref.double(), test.double()
    noise = (ref64 - test64).pow(2).sum()
    if noise == 0:
        return _INF
    return (10 * torch.log10(ref64.pow(2).sum() / noise)).item()


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    # clamp_min keeps NaN, so a NaN weight still yields a NaN scale (step 2). The divisor
    # is a tensor on purpose: CUDA turns division by a Python scalar into a multiplication
    # by its reciprocal, which is not the IEEE quotient the kernels compute.
    amax = amax.float().clamp_min(_MIN_AMAX)
    return amax / torch.full_like(amax, FP8_MAX)


def _scaled_clamped(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """Step 3 in float32, before the cast: ``inv_scale`` broadcasts against ``x``. A bf16 or
    fp16 ``x`` against a scale with dims is promoted to float32 inside the multiply (exactly,
    as ``x.float()`` would, without that copy); a 0-d scale would not promote it."""
    if not (inv_scale.dim() and x.dtype in _PROMOTED):
        x = x.float()
    return torch.mul(x, inv_scale).clamp_(-FP8_MAX, FP8_MAX)


def _quantize_with_inv(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """Step 3 for a chunk: ``inv_scale`` broadcasts against ``x``."""
    return _scaled_clamped(x, inv_scale).to(FP8_DTYPE)


def _quantize_reference_into(w, q_out, scale_out, config):
    # Few ops per weight (each is a launch on a GPU, a push runs this for every layer on a
    # CPU): the scale is divided straight into ``scale_out``, a weight under one chunk is
    # quantized in one multiply, and the cast to FP8 is the copy into ``q_out``. No
    # autograd (as the kernels): ``out=`` refuses an input that requires grad.
    if w.requires_grad:
        w = w.detach()
    torch.div(_amax(w, config).float().clamp_min_(_MIN_AMAX), scale_out.fill_(FP8_MAX),
              out=scale_out)
    n, k = w.shape[-2:]
    if config.granularity != "block" and w.numel() * 4 <= _CHUNK_BYTES:
        # the scale as [*lead, 1, 1] (per tensor) or [*lead, n, 1] (per channel)
        rows = (scale_out.view(*scale_out.shape, 1, 1) if config.granularity == "tensor"
                else scale_out)
        q_out.copy_(_scaled_clamped(w, rows.reciprocal()))
        return
    inv = scale_out.reciprocal()
    rows_per_chunk = max(1, _CHUNK_BYTES // (4 * k))
    matrices = [(w, q_out, inv)] if w.dim() == 2 else zip(w, q_out, inv)
    for w2, q2, inv2 in matrices:
        for r0 in range(0, n, rows_per_chunk):
            r1 = min(n, r0 + rows_per_chunk)
            q2[r0:r1].copy_(_scaled_clamped(w2[r0:r1], _expand_scale(inv2, config, r0, r1, k)))


def _expand_scale(scale: torch.Tensor, config: Fp8Config, r0: int, r1: int,
                  k: int) -> torch.Tensor:
    """Scale (or inverse scale) of rows ``r0:r1``, broadcastable against ``[..., r1-r0, k]``."""
    if config.granularity == "tensor":
        return scale[..., None, None]
    if config.granularity == "channel":
        return scale[..., r0:r1, :]
    bn, bk = config.block_size
    first = r0 // bn
    rows = scale[..., first:math.ceil(r1 / bn), :].repeat_interleave(bn, dim=-2)
    rows = rows[..., r0 - first * bn:r1 - first * bn, :]
    return rows.repeat_interleave(bk, dim=-1)[..., :k]


def _block_amax(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """Per-tile ``max |w|``; full tiles and the ragged edge tiles are reduced as views."""
    *lead, n, k = w.shape
    out = w.new_empty((*lead, math.ceil(n / bn), math.ceil(k / bk)))
    for r0, r1, rb in _segments(n, bn):
        for c0, c1, cb in _segments(k, bk):
            # tiles: [..., rows/rb, rb, cols/cb, cb]
            tiles = w[..., r0:r1, c0:c1].unflatten(-1, (-1, cb)).unflatten(-3, (-1, rb))
            out[..., r0 // bn:r0 // bn + (r1 - r0) // rb, c0 // bk:c0 // bk + (c1 - c0) // cb] = (
                torch.linalg.vector_norm(tiles, ord=_INF, dim=(-3, -1)))
    return out


def _segments(n: int, block: int) -> list[tuple[int, int, int]]:
    """``(start, end, tile)`` spans of ``range(n)``: the full tiles, then the ragged tail."""
    full = n // block * block
    spans = [(0, full, block)] if full else []
    return spans + [(full, n, n - full)] if n > full else spans


def _check_outputs(w, q_out, scale_out, config):
    check_quantize_outputs(w, q_out, scale_out, scheme="fp8", q_dtype=FP8_DTYPE,
                           scale_shape=fp8_scale_shape(w.shape, config),
                           scale_dtype=torch.float32)
