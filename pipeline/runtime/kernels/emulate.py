"""The native kernels' operand rounding, emulated on the CPU in float64: which fp16 rounding costs what.

Both GPU paths compute W·x = Σ_b s_b · L[c_b]/√B · z_b with z = H·D·(x / smooth) per 128-block (normalized), and
round operands to fp16 before the tensor cores multiply them (products exact, fp32 accumulation):

    gemv_tc (≤ 32 tokens)   z scaled per (token, block) by a power of two (max |z| in [2^13, 2^14)) -> fp16;
                            table fp16(level/√B) (level · fp32 1/√B, rounded once); s and the power of two in fp32.
    prefill (> 32 tokens)   z scaled per token by a power of two (max |z| in (2^13, 2^14]) -> fp16;
                            weight fp16(level/√B · s) (dequant_tiles: fp32 product, rounded once); cuBLAS, fp32 out.

Each operand is "exact" (float64, no rounding), "fp16" (what the kernels do) or "fp16x2" (a hi + lo pair of fp16,
lo = fp16(v − hi): a candidate fix, two mma per product). The emulation multiplies in float64: the fp32
accumulation's own error (~1e-7) is left out, and so is the lo·lo term a kernel fix would skip (~2^-22 relative).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

BLOCK = 128
NORM_F32 = torch.tensor(0.08838834764831845, dtype=torch.float32)  # the kernels' 1/√128 literal
Rounding = Literal["exact", "fp16", "fp16x2"]
ROUNDINGS: tuple[Rounding, ...] = ("exact", "fp16", "fp16x2")
_HADAMARD: dict[torch.device, torch.Tensor] = {}


def round_operand(v: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """What an operand carries, as float64: v, fp16(v), or fp16(v) + fp16(v − fp16(v))."""
    v = v.double()
    if rounding == "exact":
        return v
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    hi = v.half().double()
    return hi if rounding == "fp16" else hi + (v - hi).half().double()


def hadamard64(device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal 128x128 Walsh-Hadamard matrix (Sylvester order, symmetric), float64."""
    dev = torch.device(device)
    if dev not in _HADAMARD:
        h = torch.ones(1, 1, dtype=torch.float64, device=dev)
        while h.shape[0] < BLOCK:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[dev] = h / math.sqrt(BLOCK)
    return _HADAMARD[dev]


def rotate64(x: torch.Tensor, signs: torch.Tensor, inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """x [n, K] -> z float64 [n, NB, 128] = H·D·(x ⊙ inv_smooth) per block (normalized), K zero-padded to blocks."""
    n, k = x.shape
    xd = x.double() if inv_smooth is None else x.double() * inv_smooth.double()
    pad = (-k) % BLOCK
    if pad:
        xd = torch.nn.functional.pad(xd, (0, pad))
    return (xd.reshape(n, -1, BLOCK) * signs.double()) @ hadamard64(x.device)


def block_pow2(z: torch.Tensor) -> torch.Tensor:
    """rotate_pairs_kernel's scale: per block, the power of two putting max |z| in [2^13, 2^14); 1 for zero blocks."""
    amax = z.abs().amax(-1, keepdim=True)
    _, e = torch.frexp(amax)  # amax = m · 2^e, m in [0.5, 1)
    one = torch.ones_like(amax)
    return torch.where(amax > 0, torch.ldexp(one, e - 14), one)


def row_pow2(z: torch.Tensor) -> torch.Tensor:
    """tiled_linear's prefill scale: per token (all blocks), 2^(ceil(log2 max |z|) − 14)."""
    amax = z.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    return torch.exp2(torch.ceil(torch.log2(amax)) - 14)


def activation_operand(z: torch.Tensor, rounding: Rounding, per: Literal["block", "row"] = "block") -> torch.Tensor:
    """Rotated z [n, NB, 128] -> the activation the tensor cores see, times its power of two: float64 [n, NB*128]."""
    xs = block_pow2(z) if per == "block" else row_pow2(z)
    return (round_operand(z / xs, rounding) * xs).reshape(z.shape[0], -1)


def level_table(codebook: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """gemv_tc's table, float64 [2^bits]: level/√B ("exact") or fp32(level · 1/√B) rounded as the pair table is."""
    if rounding == "exact":
        return codebook.double() / math.sqrt(BLOCK)
    return round_operand(codebook.float() * NORM_F32, rounding)


def tc_weight(codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """gemv_tc's weight, codes [R, NB, 128] (indices) + scales f16 [R, NB] -> float64 [R, NB*128]: table · scale."""
    w = level_table(codebook, rounding)[codes.long()] * scales.double().unsqueeze(-1)
    return w.reshape(codes.shape[0], -1)


def prefill_weight(codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor,
                   rounding: Rounding) -> torch.Tensor:  # fmt: skip
    """dequant_tiles_kernel's weight -> float64 [R, NB*128]: fp32(fp32(level · 1/√B) · scale), then rounded."""
    if rounding == "exact":
        return tc_weight(codes, scales, codebook, "exact")
    w = (codebook.float() * NORM_F32)[codes.long()] * scales.float().unsqueeze(-1)
    return round_operand(w, rounding).reshape(codes.shape[0], -1)


def emulated_matvec(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Operands (activation_operand, tc_weight or prefill_weight) -> y float64 [n, R] = a · wᵀ."""
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"activation has {a.shape[1]} columns, weight {w.shape[1]}")
    return a.double() @ w.double().t()


def code_indices(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """FORMAT v1 codes uint8 [R, NB*B*bits/8] -> code indices uint8 [R, NB, 128] (for tc_weight / prefill_weight)."""
    from pipeline.quant.bitpack import unpack

    rows, nb = scales.shape
    return unpack(codes.reshape(rows, nb, -1), bits, BLOCK)
