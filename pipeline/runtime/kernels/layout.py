"""The tensor-core kernels' tiled layout: a load-time repack of FORMAT v1 codes + scales (4, 5 bits) and its inverse.

Rows are taken 16 at a time (a tile; the last one padded with zero codes and zero scales). A unit is one tile x one
128-block, and the units of a tile lie one after another along K, so a warp walking a tile's blocks reads contiguous
memory. With lane = 4g + q (g = 0..7, q = 0..3), row r = 16t + g + 8h (h = 0, 1) and pair j = 16q + k (k = 0..15):

    nibbles [h][lane][k]  byte:  m(c[r, j]) | m(c[r, j + 64]) << 4                       1024 bytes
    signs   [h][lane]     u32:   bit 15-k = c[r, j] is negative, bit 31-k = c[r, j+64] is  256 bytes (5 bits only)
    scales  [g][h]        f16:   scale[r, block]                                            32 bytes

m(c) is the code itself for 4 bits (the nibble byte is FORMAT v1's nibble-plane byte j) and, for 5 bits, the index of
|level| among the 16 positive levels: the Lloyd-Max codebooks are symmetric (level[c] = -level[31 - c]), so a 5-bit
code is a sign and a 4-bit magnitude. The kernel looks up byte -> (level_j, level_j+64) as one bf16 pair and XORs the
sign bits in; the pair is already the mma A fragment, because the activation is laid out in the same pair order.
Same bytes per weight as FORMAT v1 (+ 1/16 of a row of padding at most).
"""

from __future__ import annotations

import torch

from pipeline.errors import FormatError
from pipeline.quant.bitpack import pack, unpack

BLOCK = 128
TILE_ROWS = 16
TILED_BITS = (4, 5)
_K = torch.arange(16)


def unit_bytes(bits: int) -> int:
    return 1024 + (256 if bits == 5 else 0) + 32


def symmetric(codebook: torch.Tensor) -> bool:
    """level[c] == -level[2^b - 1 - c] exactly: the sign/magnitude split of 5-bit codes loses nothing."""
    return bool(torch.equal(codebook.float().cpu(), -codebook.float().cpu().flip(0)))


def tileable(bits: int, block_size: int, codebook: torch.Tensor) -> bool:
    return block_size == BLOCK and bits in TILED_BITS and (bits == 4 or symmetric(codebook))


def to_tiles(codes: torch.Tensor, scales: torch.Tensor, bits: int, chunk_rows: int = 1024) -> torch.Tensor:
    """FORMAT v1 codes uint8 [R, NB*B*bits/8] + scales f16 [R, NB] -> uint8 [ceil(R/16), NB, unit_bytes(bits)],
    `chunk_rows` rows at a time (a multiple of 16) so the transient stays small next to a loaded model."""
    if bits not in TILED_BITS:
        raise FormatError(f"the tiled layout holds {TILED_BITS}-bit codes, not {bits}-bit")
    rows = scales.shape[0]
    parts = [_to_tiles(codes[i : i + chunk_rows], scales[i : i + chunk_rows], bits) for i in range(0, rows, chunk_rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _to_tiles(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    rows, nb = scales.shape
    c = unpack(codes.reshape(rows, nb, -1), bits, BLOCK)  # [R, NB, 128]
    tiles = -(-rows // TILE_ROWS)
    pad = tiles * TILE_ROWS - rows
    if pad:
        c = torch.cat([c, c.new_zeros(pad, nb, BLOCK)])
        scales = torch.cat([scales, scales.new_zeros(pad, nb)])
    if bits == 5:
        neg = c < 16
        c = torch.where(neg, 15 - c, c - 16)
    nib = (c[..., :64] | (c[..., 64:] << 4)).reshape(tiles, 2, 8, nb, 4, 16)  # [t, h, g, NB, q, k]
    parts = [nib.permute(0, 3, 1, 2, 4, 5).reshape(tiles, nb, 1024)]
    if bits == 5:
        n = neg.reshape(tiles, 2, 8, nb, 2, 4, 16).to(torch.int64)  # [t, h, g, NB, half, q, k]
        weight = (1 << (15 - _K.to(c.device))).to(torch.int64)
        word = (n[..., 0, :, :] * weight).sum(-1) | ((n[..., 1, :, :] * weight).sum(-1) << 16)  # [t, h, g, NB, q]
        word = word.permute(0, 3, 1, 2, 4)  # [t, NB, h, g, q]
        word = (word - ((word >> 31) << 32)).to(torch.int32).contiguous()  # two's complement: the same 4 bytes
        parts.append(word.view(torch.uint8).reshape(tiles, nb, 256))
    sc = scales.to(torch.float16).reshape(tiles, 2, 8, nb).permute(0, 3, 2, 1).contiguous()  # [t, NB, g, h]
    parts.append(sc.view(torch.uint8).reshape(tiles, nb, 32))
    return torch.cat(parts, dim=-1).contiguous()


def _sections(tiles: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A tiled tensor's three sections: nibble bytes uint8 [t, NB, h, g, q, k], negative flags bool
    [t, NB, h, g, q, k, 2] (of pair j's two codes; None for 4 bits), scales f16 [t, NB, g, h]."""
    t, nb, _ = tiles.shape
    nib = tiles[..., :1024].reshape(t, nb, 2, 8, 4, 16)
    neg = None
    if bits == 5:
        words = tiles[..., 1024:1280].contiguous().view(torch.int32).reshape(t, nb, 2, 8, 4, 1).to(torch.int64)
        shifts = (15 - _K.to(tiles.device)).to(torch.int64)
        neg = torch.stack([(words >> shifts) & 1, (words >> (shifts + 16)) & 1], dim=-1).bool()
    scales = tiles[..., -32:].contiguous().view(torch.float16).reshape(t, nb, 8, 2)
    return nib, neg, scales


def from_tiles(tiles: torch.Tensor, rows: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of to_tiles: -> (codes uint8 [R, NB*B*bits/8] in FORMAT v1, scales f16 [R, NB])."""
    t, nb, _ = tiles.shape
    nib, neg, sc = _sections(tiles, bits)
    # [t, NB, h, g, q, k, (j, j+64)] -> rows [t, h, g] x [NB] x codes [(j, j+64) half, q, k]
    c = torch.stack([nib & 15, nib >> 4], dim=-1).permute(0, 2, 3, 1, 6, 4, 5).reshape(t * TILE_ROWS, nb, BLOCK)
    if neg is not None:
        neg = neg.permute(0, 2, 3, 1, 6, 4, 5).reshape(t * TILE_ROWS, nb, BLOCK)
        c = torch.where(neg, 15 - c, c + 16)
    scales = sc.permute(0, 3, 2, 1).reshape(t * TILE_ROWS, nb)[:rows].contiguous()
    codes = pack(c[:rows].contiguous(), bits).reshape(rows, -1)
    return codes, scales


def pair_order(x: torch.Tensor) -> torch.Tensor:
    """What the rotate_pairs kernel writes, in torch: rotated x [n, K] -> [n, K/128, 64, 2] (x_j, x_j+64) pairs."""
    n, k = x.shape
    blocks = x.reshape(n, k // BLOCK, 2, 64)
    return torch.stack([blocks[:, :, 0], blocks[:, :, 1]], dim=-1)


def tiled_matvec(xr: torch.Tensor, tiles: torch.Tensor, codebook: torch.Tensor, rows: int, bits: int) -> torch.Tensor:
    """The kernel's arithmetic in float64 torch, from the tiled bytes alone (the CPU check of the layout): rotated
    x [n, K] -> y [n, R] = Σ_b scale · Σ_j level · x / √B, levels found the kernel's way (pair byte, sign word)."""
    t, nb, _ = tiles.shape
    nib, neg, sc = _sections(tiles, bits)
    nib = nib.long()  # [t, NB, h, g, q, k]
    table = codebook.double()[16:] if bits == 5 else codebook.double()
    lo, hi = table[nib & 15], table[nib >> 4]
    if neg is not None:
        lo = torch.where(neg[..., 0], -lo, lo)
        hi = torch.where(neg[..., 1], -hi, hi)
    xp = pair_order(xr.double()).reshape(xr.shape[0], nb, 4, 16, 2)  # [n, NB, q, k, (j, j+64)]
    part = torch.einsum("tbhgqk,nbqk->nthgb", lo, xp[..., 0]) + torch.einsum("tbhgqk,nbqk->nthgb", hi, xp[..., 1])
    y = (part * sc.double().permute(0, 3, 2, 1)[None]).sum(-1) / BLOCK**0.5  # [n, t, h, g]
    return y.reshape(xr.shape[0], t * TILE_ROWS)[:, :rows]
