"""gemv_tc's K split on the CPU: the launch word, the choice rule, and the split arithmetic emulated in torch (the
slices of layout.tiled_matvec summed as the kernel's fix-up sums them give the unsplit product)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.quant.codec import QuantParams, quantize
from pipeline.quant.hadamard import rotate, sign_vector
from pipeline.runtime import kernels
from pipeline.runtime.kernels import layout, ops


def test_launch_word_carries_the_split() -> None:
    assert kernels.tc_launch() == 12 | 1 << 8  # split 1 leaves the word as it was before splits
    assert kernels.tc_launch(split=1) == kernels.tc_launch()
    for split in range(1, kernels.TC_MAX_SPLIT + 1):
        word = kernels.tc_launch(8, 2, split)
        assert word & 255 == 8 and (word >> 8) & 15 == 2 and ops.launch_split(word) == split
    for bad in (0, kernels.TC_MAX_SPLIT + 1):
        with pytest.raises(ValueError, match="slices"):
            kernels.tc_launch(split=bad)


@pytest.mark.parametrize(
    ("n_tiles", "n_blocks", "expected"),
    [
        (336, 64, 2),  # 5376 x 8192: 2.5 tiles per SM -> 5 units per SM, slices of 32 blocks
        (336, 168, 2),  # 5376 x 21504
        (336, 128, 2),  # 5376 x 16384
        (1344, 42, 1),  # 21504 x 5376: enough tiles
        (1024, 42, 1),  # 16384 x 5376
        (63, 5, 1),  # too few blocks to split
        (40, 336, 10),  # few tiles, long K: 10 x 40 >= 396 units, slices of 33 blocks
        (40, 120, 5),  # stops where a slice would drop below 2 x 12 blocks
    ],
)
def test_split_rule(n_tiles: int, n_blocks: int, expected: int) -> None:
    assert kernels.tc_split(n_tiles, n_blocks) == expected


def test_split_rule_bounds() -> None:
    for n_tiles, n_blocks, warps in itertools.product((1, 7, 100, 395, 528, 5000), (1, 24, 48, 200, 10_000), (8, 12)):
        s = kernels.tc_split(n_tiles, n_blocks, warps)
        assert 1 <= s <= kernels.TC_MAX_SPLIT
        assert s == 1 or n_blocks // s >= 2 * warps
        assert s == 1 or n_tiles < 4 * 132


@pytest.mark.parametrize(("n_blocks", "split"), [(64, 2), (42, 4), (5, 3), (3, 7), (168, 15)])
def test_slices_partition_k(n_blocks: int, split: int) -> None:
    sl = kernels.tc_slices(n_blocks, split)
    assert sl[0][0] == 0 and sl[-1][1] == n_blocks
    assert all(a[1] == b[0] for a, b in itertools.pairwise(sl))
    sizes = [hi - lo for lo, hi in sl]
    assert max(sizes) - min(sizes) <= 1


def _fixup(partials: torch.Tensor, arrivals: tuple[int, ...]) -> torch.Tensor:
    """The kernel's fix-up: the last slice to arrive adds all partials (fp32) in slice order, its own from registers."""
    last = arrivals[-1]
    total = torch.zeros_like(partials[0])
    for k in range(partials.shape[0]):
        total = total + (partials[last] if k == last else partials[k])
    return total


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize("split", [2, 3, 7])
def test_split_sum_matches_unsplit(bits: int, split: int) -> None:
    rows, cols = 40, 5 * 128
    g = torch.Generator().manual_seed(bits + split)
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=g).to(torch.bfloat16), params)
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    x = torch.randn(3, cols, generator=g, dtype=torch.float64)
    xr = rotate(x.float(), sign_vector(params.sign_bits(), 128)).reshape(3, cols).double()
    full = layout.tiled_matvec(xr, tiles, q.codebook, rows, bits)
    parts = torch.stack([
        layout.tiled_matvec(xr[:, lo * 128 : hi * 128], tiles[:, lo:hi], q.codebook, rows, bits)
        for lo, hi in kernels.tc_slices(tiles.shape[1], split)
    ])  # fmt: skip
    assert torch.allclose(parts.sum(0), full, rtol=1e-12, atol=1e-12)  # empty slices (split > blocks) add zero
    # fp32 partials, as the workspace holds them: every arrival order gives the same bits.
    p32 = parts.float()
    sums = {_fixup(p32, order).numpy().tobytes() for order in itertools.permutations(range(split), min(split, 3))}
    assert len(sums) == 1
    assert float((_fixup(p32, tuple(range(split))).double() - full).norm() / full.norm()) < 1e-6


@pytest.mark.parametrize(("units", "warps"), [(56448, 3168), (21504, 3168), (95, 60), (1, 24), (24, 24), (7, 3)])
def test_stream_runs_partition_the_units(units: int, warps: int) -> None:
    """Stream mode's runs cover every unit once, differ by at most one unit, and stream_owner inverts them (the
    kernel's fix-up counts a tile's contributors as owner(last unit) - owner(first unit) + 1)."""
    runs = [(kernels.stream_start(w, units, warps), kernels.stream_start(w + 1, units, warps)) for w in range(warps)]
    assert runs[0][0] == 0 and runs[-1][1] == units
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    sizes = {hi - lo for lo, hi in runs}
    assert max(sizes) - min(sizes) <= 1
    for w, (lo, hi) in enumerate(runs):
        for u in {lo, hi - 1, (lo + hi) // 2} if hi > lo else ():
            assert kernels.stream_owner(u, units, warps) == w


def test_stream_tiles_summed_in_warp_order_match_unsplit() -> None:
    """The stream fix-up's arithmetic in torch: each warp's run cut at tile edges, the parts of a tile added in warp
    order, equals the whole product (float64, up to rounding)."""
    rows, cols, bits, warps = 80, 1280, 5, 7  # 5 tiles x 10 blocks = 50 units over 7 warps
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16), params)
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    x = rotate(torch.randn(2, cols, dtype=torch.float64), sign_vector(params.sign_bits(), 128)).reshape(2, cols)
    full = layout.tiled_matvec(x, tiles, q.codebook, rows, bits)
    n_tiles, n_blocks = tiles.shape[:2]
    units = n_tiles * n_blocks
    out = torch.zeros_like(full)
    for w in range(warps):
        lo, hi = kernels.stream_start(w, units, warps), kernels.stream_start(w + 1, units, warps)
        for t in range(lo // n_blocks, (hi - 1) // n_blocks + 1 if hi > lo else lo // n_blocks):
            b0, b1 = max(lo, t * n_blocks) - t * n_blocks, min(hi, (t + 1) * n_blocks) - t * n_blocks
            part = tiles.clone()
            keep = torch.zeros(n_tiles, n_blocks, 1, dtype=torch.bool)
            keep[t, b0:b1] = True
            part[..., -32:] = torch.where(keep, part[..., -32:], torch.zeros_like(part[..., -32:]))  # zero scales
            out[:, t * 16 : (t + 1) * 16] += layout.tiled_matvec(x, part, q.codebook, rows, bits)[:, t * 16 : (t + 1) * 16]
    assert torch.allclose(out, full, rtol=1e-9, atol=1e-9)
