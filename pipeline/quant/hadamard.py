"""Blockwise Walsh-Hadamard rotation with a seeded sign diagonal.

The transform is a radix-2 butterfly in float32: every step is one correctly rounded add or subtract, so CPU and
GPU give bit-identical results (a matmul would not: its accumulation order differs between devices).
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64 (Steele et al. 2014); tiny, portable and documented in FORMAT.md."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def sign_bits(block_size: int, seed: int) -> list[int]:
    """Bit i is 1 where the sign diagonal is -1: the top bit of the i-th SplitMix64 output from `seed`."""
    state, bits = seed & _MASK64, []
    for _ in range(block_size):
        state, z = _splitmix64(state)
        bits.append(z >> 63)
    return bits


def signs_to_hex(bits: list[int]) -> str:
    """Pack sign bits little-endian within bytes (bit i -> byte i // 8, bit i % 8) as hex, for the format metadata."""
    out = bytearray(len(bits) // 8)
    for i, b in enumerate(bits):
        out[i // 8] |= b << (i % 8)
    return out.hex()


def signs_from_hex(text: str, block_size: int) -> list[int]:
    raw = bytes.fromhex(text)
    if len(raw) * 8 != block_size:
        raise ValueError(f"sign diagonal has {len(raw) * 8} bits, block size is {block_size}")
    return [(raw[i // 8] >> (i % 8)) & 1 for i in range(block_size)]


def sign_vector(bits: list[int] | None, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """±1 float32 diagonal; all ones when `bits` is None (signs off)."""
    if bits is None:
        return torch.ones(block_size, dtype=torch.float32, device=device)
    return 1.0 - 2.0 * torch.tensor(bits, dtype=torch.float32, device=device)


def check_block_size(block_size: int) -> None:
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 8, got {block_size}")


def fwht(x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform (Sylvester order) over the last dim; it is its own inverse.
    scratch: x (contiguous float32) is a temporary the caller drops, so it serves as a work buffer (one copy less)."""
    n = x.shape[-1]
    check_block_size(n)
    lead = x.shape[:-1]
    # Ping-pong between two buffers: each stage pairs element j with j + h inside runs of 2h: (a, b) -> (a+b, a-b).
    own = scratch and x.dtype == torch.float32 and x.is_contiguous()
    src = x if own else x.to(torch.float32, copy=True).contiguous()
    dst = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    h = 1
    while h < n:
        s, d = src.view(*lead, n // (2 * h), 2, h), dst.view(*lead, n // (2 * h), 2, h)
        torch.add(s[..., 0, :], s[..., 1, :], out=d[..., 0, :])
        torch.sub(s[..., 0, :], s[..., 1, :], out=d[..., 1, :])
        src, dst = dst, src
        h *= 2
    # One rounded multiply by 1/sqrt(n) keeps every device in agreement.
    return src.mul_(1.0 / math.sqrt(n))


def to_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """[rows, cols] -> float32 [rows, n_blocks, block_size], zero-padding each row to a multiple of the block."""
    rows, cols = w.shape
    pad = (-cols) % block_size
    x = w.to(torch.float32)
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, -1, block_size)


def from_blocks(x: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of to_blocks: [rows, n_blocks, block] -> [rows, cols] (padding dropped)."""
    return x.reshape(x.shape[0], -1)[:, :cols]


def rotate(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Rows of `w` [rows, cols] -> rotated blocks H·D·x, float32 [rows, n_blocks, block]."""
    return fwht(to_blocks(w, signs.numel()) * signs)


def unrotate(y: torch.Tensor, signs: torch.Tensor, cols: int) -> torch.Tensor:
    """Exact inverse of rotate: D·H·y, back to float32 [rows, cols]."""
    return from_blocks(fwht(y) * signs, cols)
