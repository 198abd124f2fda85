"""Quantize a weight tensor to HLWQ codes + per-block scales, and the reference dequantization back.

quantize:   w -> blocks of B along each row -> H·D rotation -> unit-normalize -> nearest Lloyd-Max level -> pack
dequantize: unpack -> level * scale / sqrt(B) -> D·H (inverse rotation) -> crop padding -> original dtype
With a smoothing vector s (pipeline.quant.smooth) the codes encode W·diag(s) and decoding divides column i by s_i.
Every reduction is a fixed pairwise tree of elementwise ops, so CPU and GPU produce the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.quant import bitpack, hadamard, lloyd_max, smooth

ScaleKind = Literal["l2", "lsq"]
# Rows per chunk are picked so one chunk's float32 working set stays cache-sized (~1 MiB); on a GPU such chunks are
# launch-bound (a 31B model is ~10^5 of them), so there a chunk is 16 MiB. Rows are independent: bytes are unchanged.
_CHUNK_ELEMS = 1 << 18
_CHUNK_ELEMS_GPU = 1 << 22


@dataclass(frozen=True)
class QuantParams:
    bits: int = 5
    block_size: int = 128
    sign_seed: int | None = 0  # None: no sign diagonal (the reference's behaviour; fails on offset blocks)
    scale: ScaleKind = "lsq"
    fit_codebook: bool = False

    def __post_init__(self) -> None:
        bitpack.plane_widths(self.bits)
        hadamard.check_block_size(self.block_size)
        if self.scale not in ("l2", "lsq"):
            raise ValueError(f"scale must be 'l2' or 'lsq', got {self.scale!r}")

    def sign_bits(self) -> list[int] | None:
        return None if self.sign_seed is None else hadamard.sign_bits(self.block_size, self.sign_seed)


@dataclass(frozen=True)
class Quantized:
    codes: torch.Tensor  # uint8 [rows, n_blocks * B * bits / 8]
    scales: torch.Tensor  # float16 [rows, n_blocks]
    codebook: torch.Tensor  # float32 [2**bits], ascending
    shape: tuple[int, ...]  # original shape
    dtype: torch.dtype  # original dtype
    bits: int
    block_size: int
    smooth: torch.Tensor | None = None  # float32 [C]: the codes encode W·diag(smooth) (FORMAT v2)


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last (power-of-two) dim by halving: the same rounding on every device."""
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x[..., 0]


def _as_rows(w: torch.Tensor) -> torch.Tensor:
    if w.dim() < 2:
        raise ValueError(f"only tensors with 2 or more dims are quantized, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def _chunk_rows(cols: int, device: torch.device | None = None) -> int:
    elems = _CHUNK_ELEMS_GPU if device is not None and device.type == "cuda" else _CHUNK_ELEMS
    return max(1, elems // max(cols, 1))


def _normalize(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated blocks -> (unit-variance values u = y*sqrt(B)/||y||, block L2 norms); zero blocks map to zeros."""
    norms = torch.sqrt(_tree_sum(y * y))
    inv = torch.where(norms > 0, math.sqrt(y.shape[-1]) / norms, torch.zeros_like(norms))
    return y * inv.unsqueeze(-1), norms


def _block_scale(y: torch.Tensor, levels: torch.Tensor, norms: torch.Tensor, kind: ScaleKind) -> torch.Tensor:
    if kind == "l2":
        return norms
    # Least squares: argmin_t ||y - t*q||^2 = <y,q>/<q,q>, stored as s = t*sqrt(B) so decoding is scale-kind free.
    qq = _tree_sum(levels * levels)
    t = _tree_sum(y * levels) / torch.where(qq > 0, qq, torch.ones_like(qq))
    return torch.where(qq > 0, t, torch.zeros_like(t)) * math.sqrt(y.shape[-1])


def sample_normalized(w: torch.Tensor, params: QuantParams, max_values: int = 1 << 22) -> torch.Tensor:
    """Normalized rotated values of a deterministic row subsample, for fitting a per-tensor codebook."""
    rows = _as_rows(w)
    n_cols = -(-rows.shape[1] // params.block_size) * params.block_size
    step = max(1, -(-rows.shape[0] * n_cols // max_values))
    signs = hadamard.sign_vector(params.sign_bits(), params.block_size, w.device)
    u, _ = _normalize(hadamard.rotate(rows[::step], signs))
    return u.reshape(-1)


def quantize(w: torch.Tensor, params: QuantParams, smooth_vec: torch.Tensor | None = None) -> Quantized:
    """Quantize a floating tensor (>= 2 dims; rows = dim 0) on its own device; with `smooth_vec` (float32 [C] for a
    2-D [R, C] weight) the codes encode W·diag(smooth_vec)."""
    if not w.is_floating_point():
        raise TypeError(f"expected a floating tensor, got {w.dtype}")
    shape, dtype = tuple(w.shape), w.dtype
    if smooth_vec is not None:
        smooth_vec = smooth_vec.to(device=w.device, dtype=torch.float32)
        w = smooth.apply(w, smooth_vec)
    rows = _as_rows(w)
    b = params.block_size
    signs = hadamard.sign_vector(params.sign_bits(), b, w.device)
    gauss = lloyd_max.gaussian_codebook(params.bits, w.device)
    candidates = [gauss]
    if params.fit_codebook:
        candidates.insert(0, lloyd_max.fit_codebook(sample_normalized(w, params), gauss))
    for codebook in candidates:
        codes, scales, err, ref = [], [], 0.0, 0.0
        step = _chunk_rows(rows.shape[1], w.device)
        for start in range(0, rows.shape[0], step):
            y = hadamard.rotate(rows[start : start + step], signs)
            u, norms = _normalize(y)
            c = lloyd_max.assign(u, codebook)
            levels = lloyd_max.lookup(c, codebook)
            if len(candidates) > 1:
                # The fitted codebook must not lose to the Gaussian one on this tensor (it was fitted on a sample).
                err += float((u - levels).double().pow(2).sum())
                ref += float((u - lloyd_max.lookup(lloyd_max.assign(u, gauss), gauss)).double().pow(2).sum())
            codes.append(bitpack.pack(c, params.bits).reshape(c.shape[0], -1))
            scales.append(_block_scale(y, levels, norms, params.scale))
        if len(candidates) == 1 or err <= ref:
            break
        candidates = [gauss]
    scale16 = torch.cat(scales).to(torch.float16)
    if not torch.isfinite(scale16).all():
        raise OverflowError("a block scale does not fit in float16 (|block norm| > 65504)")
    return Quantized(torch.cat(codes), scale16, codebook.clone(), shape, dtype, params.bits, b, smooth_vec)


def rotated_blocks(q: Quantized, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of the weight in the rotated basis: float32 [rows, n_blocks, B] = level · scale / √B (the
    blocks before the inverse transform; padding columns included, smoothing not undone)."""
    b = q.block_size
    n_blocks = q.scales.shape[1]
    codebook = q.codebook.to(device=q.codes.device, dtype=torch.float32)
    packed = q.codes[start:stop].reshape(-1, n_blocks, bitpack.packed_block_bytes(q.bits, b))
    levels = lloyd_max.lookup(bitpack.unpack(packed, q.bits, b), codebook)
    return levels * (q.scales[start:stop].to(torch.float32) * (1.0 / math.sqrt(b))).unsqueeze(-1)


def dequantize(q: Quantized, sign_bits: list[int] | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference dequantization: codes + scales + codebook -> tensor of the original shape (and dtype by default)."""
    b = q.block_size
    rows = q.shape[0]
    cols = math.prod(q.shape[1:])
    signs = hadamard.sign_vector(sign_bits, b, q.codes.device)
    out = torch.empty(rows, cols, dtype=dtype or q.dtype, device=q.codes.device)
    step = _chunk_rows(q.scales.shape[1] * b, q.codes.device)
    for start in range(0, rows, step):
        x = hadamard.unrotate(rotated_blocks(q, start, start + step), signs, cols)
        out[start : start + step] = x if q.smooth is None else smooth.unapply(x, q.smooth.to(x.device))
    return out.reshape(q.shape)
