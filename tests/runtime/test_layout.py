"""The tensor-core kernels' tiled layout (pipeline/runtime/kernels/layout.py), on the CPU: a lossless repack of FORMAT
v1, and the kernel's arithmetic read from the tiled bytes alone gives the reference product."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import FormatError
from pipeline.quant.codec import QuantParams, dequantize, quantize
from pipeline.quant.hadamard import rotate, sign_vector
from pipeline.runtime.kernels import layout
from pipeline.runtime.linear import HLWQLinear


def _quantized(bits: int, rows: int, cols: int, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    params = QuantParams(bits=bits)
    return quantize(w, params), params.sign_bits()


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(("rows", "cols", "chunk"), [(37, 384, 1024), (64, 256, 16), (100, 576, 32)])
def test_tiles_round_trip(bits: int, rows: int, cols: int, chunk: int) -> None:
    q, _ = _quantized(bits, rows, cols)
    tiles = layout.to_tiles(q.codes, q.scales, bits, chunk_rows=chunk)
    assert tiles.shape == (-(-rows // 16), q.scales.shape[1], layout.unit_bytes(bits))
    codes, scales = layout.from_tiles(tiles, rows, bits)
    assert torch.equal(codes, q.codes) and torch.equal(scales, q.scales)


@pytest.mark.parametrize("bits", [4, 5])
def test_tiled_arithmetic_matches_reference(bits: int) -> None:
    rows, cols = 45, 640
    q, sign_bits = _quantized(bits, rows, cols, seed=3)
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    x = torch.randn(3, cols, dtype=torch.float64)
    ref = x @ dequantize(q, sign_bits, torch.float64).t()
    xr = rotate(x.float(), sign_vector(sign_bits, 128)).reshape(3, cols).double()
    y = layout.tiled_matvec(xr, tiles, q.codebook, rows, bits)
    assert float((y - ref).norm() / ref.norm()) < 1e-6


def test_5bit_sign_plane_is_read() -> None:
    """Flipping one stored sign bit changes exactly one weight's sign: the kernel's layout really carries it."""
    q, _ = _quantized(5, 16, 128, seed=5)
    tiles = layout.to_tiles(q.codes, q.scales, 5)
    flipped = tiles.clone()
    flipped[0, 0, 1024] ^= 1  # word (h=0, lane 0), bit 0 = sign of row 0, position 15
    x = torch.zeros(1, 128, dtype=torch.float64)
    x[0, 15] = 1.0  # pair_order puts rotated-basis position 15 where that bit's weight multiplies it
    a = layout.tiled_matvec(x, tiles, q.codebook, 16, 5)
    b = layout.tiled_matvec(x, flipped, q.codebook, 16, 5)
    assert torch.allclose(a[0, 1:], b[0, 1:]) and torch.isclose(a[0, 0], -b[0, 0]) and a[0, 0] != 0


def test_layout_refuses_what_it_cannot_hold() -> None:
    q, _ = _quantized(6, 16, 128)
    with pytest.raises(FormatError, match="6-bit"):
        layout.to_tiles(q.codes, q.scales, 6)
    assert not layout.tileable(6, 128, q.codebook)
    assert not layout.tileable(5, 64, torch.linspace(-1, 1, 32))
    skewed = torch.linspace(-1, 1, 32)
    skewed[0] = -1.5
    assert not layout.tileable(5, 128, skewed) and layout.tileable(4, 128, skewed)


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_tiled_module_reads_and_saves_format_v1(bits: int) -> None:
    q, sign_bits = _quantized(bits, 40, 384, seed=bits)
    m = HLWQLinear.from_quantized(q, sign_bits)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 384).to(torch.bfloat16)
    y0 = m(x)
    tiled = m.tile_for_kernels()
    assert tiled == (bits in (4, 5))
    assert (m.tiles is not None) == tiled and (m.codes is None) == tiled
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(m(x), y0)  # the CPU reference path reads the tiles back
    assert not m.tile_for_kernels()  # once
