"""KV-cache vectors to packed codes and back: one key or value vector per (token, head), rotated over head_dim.

quantize_kv:   x [..., d] -> signed Hadamard H·D per block of head_dim -> unit-normalize -> nearest Lloyd-Max level
               -> bit-pack (pipeline.quant.bitpack); one float16 scale per vector
dequantize_kv: unpack -> level * scale / sqrt(d) -> (optionally) D·H back to the original basis

The rotation is orthogonal, so attention can stay in the rotated basis: q·k = (H D q)·(H D k) and
Σ p_i v_i = D Hᵀ Σ p_i (H D v_i); `rotated=True` returns the codes' values without the inverse transform.
A head_dim that is not a power of two is rotated in equal power-of-two blocks (the largest that divides it, >= 8).
quantize_absmax / dequantize_absmax: the plain per-vector absmax INTn peer (no rotation), same packing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.quant import bitpack, hadamard, lloyd_max

ScaleKind = Literal["l2", "lsq"]
KV_BITS = (2, 3, 4)


@dataclass(frozen=True)
class PackedKV:
    codes: torch.Tensor  # uint8 [..., d * bits / 8]
    scales: torch.Tensor  # float16 [...] (one per vector)
    bits: int
    head_dim: int


def rotation_block(head_dim: int) -> int:
    """The Hadamard block for a head_dim: the largest power of two dividing it; refuses below 8."""
    block = head_dim & -head_dim
    if block < 8:
        raise ValueError(f"head_dim {head_dim} has no power-of-two block >= 8 to rotate over")
    return block


def kv_signs(head_dim: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The seeded ±1 diagonal for one rotation block (shared by every head and token)."""
    block = rotation_block(head_dim)
    return hadamard.sign_vector(hadamard.sign_bits(block, seed), block, device)


def _check(bits: int, head_dim: int) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"KV bits must be one of {KV_BITS}, got {bits}")
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 to bit-pack, got {head_dim}")


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """[..., d] -> float32 H·D·x per block of signs.numel() (d a multiple of it)."""
    block = signs.numel()
    y = hadamard.fwht(x.to(torch.float32).unflatten(-1, (-1, block)) * signs, scratch=True)
    return y.flatten(-2)


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Exact inverse of rotate: D·H·y per block, float32."""
    block = signs.numel()
    return hadamard.fwht(y.to(torch.float32).unflatten(-1, (-1, block))).mul_(signs).flatten(-2)


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., d] -> uint8 [..., d*bits/8]: the whole vector is one bitpack block."""
    return bitpack.pack(codes.unsqueeze(-2), bits).squeeze(-2)


def _unpack_codes(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """bitpack.unpack's result (the same bytes, tested) in a few whole-tensor ops per plane instead of one per slot:
    decode reads every cached vector each step, so launches count."""
    codes: torch.Tensor | None = None
    offset = shift = 0
    for k in bitpack.plane_widths(bits):
        m = 8 // k
        n = head_dim // m
        shifts = torch.arange(0, 8, k, dtype=torch.uint8, device=packed.device).unsqueeze(-1)  # [m, 1]
        part = ((packed[..., offset : offset + n].unsqueeze(-2) >> shifts) & ((1 << k) - 1)).flatten(-2)
        codes = part if codes is None else codes | (part << shift)
        offset += n
        shift += k
    assert codes is not None
    return codes


def quantize_kv(x: torch.Tensor, bits: int, signs: torch.Tensor, scale: ScaleKind = "lsq",
                codebook: torch.Tensor | None = None) -> PackedKV:  # fmt: skip
    """Vectors x [..., d] (any float dtype) -> packed Lloyd-Max codes of the rotated vector + one scale each.
    codebook: the N(0,1) levels for `bits` already on x's device (a cache passes its copy: no upload per call)."""
    d = x.shape[-1]
    _check(bits, d)
    y = rotate(x, signs)
    norms = torch.linalg.vector_norm(y, dim=-1)
    inv = torch.where(norms > 0, math.sqrt(d) / norms, torch.zeros_like(norms))
    cb = lloyd_max.gaussian_codebook(bits, x.device) if codebook is None else codebook
    codes = lloyd_max.assign(y * inv.unsqueeze(-1), cb)
    if scale == "l2":
        s = norms
    else:
        # Least squares: argmin_t ||y - t*q||² = <y,q>/<q,q>, stored as t*sqrt(d) so decoding ignores the kind.
        q = lloyd_max.lookup(codes, cb)
        qq = (q * q).sum(-1)
        s = torch.where(qq > 0, (y * q).sum(-1) / qq.clamp(min=1e-30), torch.zeros_like(qq)) * math.sqrt(d)
    s16 = s.to(torch.float16)
    if not torch.isfinite(s16).all():
        raise OverflowError("a KV vector's scale does not fit in float16 (norm > 65504)")
    return PackedKV(_pack_codes(codes, bits), s16, bits, d)


def dequantize_kv(p: PackedKV, signs: torch.Tensor, dtype: torch.dtype = torch.float32, rotated: bool = False,
                  codebook: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Packed codes -> vectors [..., d]: in the rotated basis (rotated=True) or the original one."""
    y = code_levels(p, codebook) * vector_factors(p).unsqueeze(-1)
    return (y if rotated else unrotate(y, signs)).to(dtype)


def code_levels(p: PackedKV, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """The Lloyd-Max levels of the codes, float32 [..., d]: the rotated vectors before their per-vector factor."""
    cb = lloyd_max.gaussian_codebook(p.bits, p.codes.device) if codebook is None else codebook
    return lloyd_max.lookup(_unpack_codes(p.codes, p.bits, p.head_dim), cb)


def vector_factors(p: PackedKV) -> torch.Tensor:
    """float32 [...]: rotated vector = levels * factor. Attention can apply it to a score or a probability (one
    multiply per vector) instead of to every element: q·(f l) = f (q·l), Σ p_i f_i l_i = Σ (p_i f_i) l_i."""
    return p.scales.to(torch.float32) * (1.0 / math.sqrt(p.head_dim))


def quantize_absmax(x: torch.Tensor, bits: int) -> PackedKV:
    """The plain peer: per-vector absmax, a uniform 2**bits-level grid spanning ±absmax, no rotation."""
    d = x.shape[-1]
    _check(bits, d)
    x32 = x.to(torch.float32)
    top = (1 << bits) - 1
    s = x32.abs().amax(-1) * (2.0 / top)  # the step between levels
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round(x32 * inv.unsqueeze(-1) + top / 2).clamp(0, top).to(torch.uint8)
    s16 = s.to(torch.float16)
    if not torch.isfinite(s16).all():
        raise OverflowError("a KV vector's scale does not fit in float16")
    return PackedKV(_pack_codes(codes, bits), s16, bits, d)


def dequantize_absmax(p: PackedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = _unpack_codes(p.codes, p.bits, p.head_dim).to(torch.float32)
    top = (1 << p.bits) - 1
    return ((codes - top / 2) * p.scales.to(torch.float32).unsqueeze(-1)).to(dtype)


def bits_per_element(bits: int, head_dim: int) -> float:
    """Stored bits per cached element: the codes plus one float16 scale per vector."""
    return bits + 16 / head_dim
