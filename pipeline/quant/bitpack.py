"""Bit packing of b-bit codes (2..8) into byte planes, per block; one layout for every width (FORMAT.md).

A b-bit code is split into planes of 4, 2 and 1 bits, low bits first (5 = 4+1, 6 = 4+2, 7 = 4+2+1, 8 = 4+4,
3 = 2+1). A plane of width k holds m = 8/k codes per byte: inside a block of B codes, byte j of the plane holds
code j + s*(B/m) in bits [s*k, s*k + k). Unpacking is then shifts and masks over contiguous slices (gguf Q5_0's
nibble plane + high-bit plane, generalized), with no gather, which is what a GPU kernel wants.
"""

from __future__ import annotations

import torch

_PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (4, 4)}


def plane_widths(bits: int) -> tuple[int, ...]:
    if bits not in _PLANES:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return _PLANES[bits]


def packed_block_bytes(bits: int, block_size: int) -> int:
    """Bytes per block of codes: block_size * bits / 8."""
    return block_size * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n_blocks, B] (values < 2**bits) -> uint8 [..., n_blocks, B*bits/8]."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    block = codes.shape[-1]
    planes, shift = [], 0
    for k in plane_widths(bits):
        m = 8 // k
        part = (codes >> shift) & ((1 << k) - 1)
        # [..., B] -> [..., m, B/m]: slot s takes the s-th contiguous run of B/m codes.
        part = part.reshape(*codes.shape[:-1], m, block // m)
        byte = part[..., 0, :].clone()
        for s in range(1, m):
            byte |= part[..., s, :] << (s * k)
        planes.append(byte)
        shift += k
    return torch.cat(planes, dim=-1)


def unpack(packed: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Inverse of pack: uint8 [..., n_blocks, B*bits/8] -> uint8 codes [..., n_blocks, B]."""
    if packed.shape[-1] != packed_block_bytes(bits, block_size):
        raise ValueError(f"expected {packed_block_bytes(bits, block_size)} bytes per block, got {packed.shape[-1]}")
    codes = torch.zeros(*packed.shape[:-1], block_size, dtype=torch.uint8, device=packed.device)
    offset = shift = 0
    for k in plane_widths(bits):
        m = 8 // k
        n = block_size // m
        plane = packed[..., offset : offset + n]
        mask = (1 << k) - 1
        for s in range(m):
            codes[..., s * n : (s + 1) * n] |= ((plane >> (s * k)) & mask) << shift
        offset += n
        shift += k
    return codes
