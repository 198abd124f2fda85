"""Native kernels against the reference dequantization (GPU only; skipped on CPU). bench/kernel.py times them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from pipeline.quant.codec import QuantParams, dequantize, quantize
from pipeline.quant.hadamard import sign_vector

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _scratch_empty(device: torch.device) -> bool:
    """Stream mode's scratch ends every launch as it began it: all PART_EMPTY (the next launch's parts announce
    themselves by overwriting it)."""
    from pipeline.runtime.kernels import ops

    assert device in ops._SCRATCH  # the launch used the kept scratch (a fresh one would be empty whatever it did)
    return bool((ops.stream_scratch(device).view(torch.int32) == ops.PART_EMPTY).all())


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize(("rows", "cols"), [(384, 640), (1000, 576), (2048, 5376)])
@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_native_linear_matches_reference(bits: int, rows: int, cols: int, n: int) -> None:
    from pipeline.runtime.kernels import hlwq_linear

    g = torch.Generator(device="cuda").manual_seed(bits * rows + n)
    w = torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16)
    params = QuantParams(bits=bits)
    q = quantize(w, params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    x = torch.randn(n, cols, generator=g, device="cuda").to(torch.bfloat16)
    ref = x.double() @ dequantize(q, params.sign_bits(), torch.float64).t()
    y = hlwq_linear(x, q.codes, q.scales, q.codebook, signs, bits)
    err = float((y.double() - ref).norm() / ref.norm())
    # batch <= 4: fp32 accumulation, bf16 output rounding (~2e-3); larger batches: bf16 operands on tensor cores.
    assert torch.isfinite(y).all()
    assert err < (4e-3 if n <= 4 else 1e-2)


def _smoothed_case(bits: int, rows: int, cols: int, seed: int, std: float = 1.0):  # type: ignore[no-untyped-def]
    """A random weight (of standard deviation `std`) quantized with a smoothing vector: (generator, tiled codes,
    codebook, signs, 1/s, the float64 reference weight in the original basis)."""
    from pipeline.runtime.kernels import layout

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g, device="cuda") * std).to(torch.bfloat16)
    params = QuantParams(bits=bits)
    q = quantize(w, params, torch.rand(cols, generator=g, device="cuda") + 0.5)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    w64 = dequantize(q, params.sign_bits(), torch.float64)
    return g, layout.to_tiles(q.codes, q.scales, bits), q.codebook, signs, (1.0 / q.smooth).float(), w64


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(("rows", "cols"), [(384, 640), (1000, 576), (2048, 5376)])
@pytest.mark.parametrize("n", [1, 2, 8, 9, 20, 40])
def test_tiled_linear_matches_reference(bits: int, rows: int, cols: int, n: int) -> None:
    """The tensor-core path (≤ 8 tokens) and the tiled dequantize + cuBLAS path (more), smoothing vector included."""
    from pipeline.runtime.kernels import tiled_linear

    g, tiles, codebook, signs, inv, w64 = _smoothed_case(bits, rows, cols, seed=bits * rows + n + 7)
    x = torch.randn(n, cols, generator=g, device="cuda").to(torch.bfloat16)
    y = tiled_linear(x, tiles, codebook, signs, bits, rows, inv)
    # fp16 activations (block-scaled) and levels on tensor cores, fp32 accumulation, bf16 output rounding.
    assert torch.isfinite(y).all()
    assert _rel_err(y, x.double() @ w64.t()) < 3e-3


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(("rows", "cols", "std"), [(384, 640, 1.0), (2048, 5376, 1.0), (2048, 5376, 2e-3)])
@pytest.mark.parametrize("n", [1, 3, 8, 20, 40])
def test_tiled_linear_keeps_float32_precision(bits: int, rows: int, cols: int, std: float, n: int) -> None:
    """A float32 input gets split operands (hi + lo fp16 pairs: three products per step in the tile kernel, three
    GEMMs in prefill) and a float32 output: within 1e-5 of the float64 reference, where one fp16 plane is ~5e-4 off;
    weights of ~1e-3 too (prefill scales them before splitting)."""
    from pipeline.runtime.kernels import tiled_linear

    g, tiles, codebook, signs, inv, w64 = _smoothed_case(bits, rows, cols, seed=bits * rows + n + 11, std=std)
    x = torch.randn(n, cols, generator=g, device="cuda") * torch.logspace(-3, 3, cols, device="cuda")
    ref = x.double() @ w64.t()
    y = tiled_linear(x, tiles, codebook, signs, bits, rows, inv)
    assert y.dtype == torch.float32
    assert _rel_err(y, ref) < 1e-5
    half = tiled_linear(x.half(), tiles, codebook, signs, bits, rows, inv)
    assert _rel_err(half, ref) > 1e-4  # the single-plane path this one improves on


def test_one_float32_token_on_a_stream_sized_weight_is_split() -> None:
    """One float32 token on a weight stream mode would take (16384 x 5376) goes to the split tile kernel instead."""
    from pipeline.runtime.kernels import tiled_linear

    g, tiles, codebook, signs, inv, w64 = _smoothed_case(5, 16384, 5376, seed=17)
    x = torch.randn(1, 5376, generator=g, device="cuda")
    y = tiled_linear(x, tiles, codebook, signs, 5, 16384, inv)
    assert y.dtype == torch.float32 and _rel_err(y, x.double() @ w64.t()) < 1e-5


def test_gemv_tc_refuses_a_split_activation_it_cannot_run() -> None:
    from pipeline.errors import RuntimeBackendError
    from pipeline.runtime.kernels import tc_launch

    xp, xs, tiles, codebook = _tc_inputs(5, 64, 256, 1, seed=3)
    split = torch.cat([xp, xp], dim=1)  # a float32 input's two planes
    for launch, dtype in [(tc_launch(), torch.bfloat16), (tc_launch(32, 6, stream=True, pdl=True), torch.float32)]:
        with pytest.raises(RuntimeBackendError, match="split"):
            torch.ops.hlwq.gemv_tc(split, xs, tiles, codebook, 5, 64, dtype, launch)
    with pytest.raises(RuntimeBackendError, match="does not fit"):  # neither K nor 2K columns
        torch.ops.hlwq.gemv_tc(xp[:, :128], xs, tiles, codebook, 5, 64, torch.float32, tc_launch())


def _tc_inputs(bits: int, rows: int, cols: int, n: int, seed: int):  # type: ignore[no-untyped-def]
    from pipeline.runtime.kernels import layout

    g = torch.Generator(device="cuda").manual_seed(seed)
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    x = torch.randn(n, cols, generator=g, device="cuda").to(torch.bfloat16)  # one plane (float32 would be split)
    xp, xs = torch.ops.hlwq.rotate_pairs(x, signs, None)
    return xp, xs, layout.to_tiles(q.codes, q.scales, bits), q.codebook


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(
    ("rows", "cols"), [(1000, 5376), (5376, 1024), (300, 640), (16, 128), (16, 256), (48, 1280), (21504, 5376)]
)
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize(("warps", "prefetch"), [(8, 3), (16, 4), (24, 2), (32, 2), (32, 6), (24, 7), (28, 8)])
def test_gemv_tc_stream_matches_unsplit(bits: int, rows: int, cols: int, n: int, warps: int, prefetch: int) -> None:
    """Stream mode (equal runs of units per warp, shared tiles summed in warp order by their finisher; up to two
    tokens through the compact gather, which parks only the lanes that hold sums) against the unsplit kernel, down
    to a single unit (16x128) and to fewer units than warps (16x256, 48x1280: no warp may idle between a tile's
    owners); deterministic; the scratch empty again afterwards."""
    from pipeline.runtime.kernels import tc_launch

    xp, xs, tiles, codebook = _tc_inputs(bits, rows, cols, n, seed=bits * rows + n + warps)
    ref = torch.ops.hlwq.gemv_tc(xp, xs, tiles, codebook, bits, rows, torch.float32, tc_launch())
    launch = tc_launch(warps, prefetch, stream=True)
    y = torch.ops.hlwq.gemv_tc(xp, xs, tiles, codebook, bits, rows, torch.float32, launch)
    for _ in range(3):
        # Another input in between: a part left behind by one launch would be read as arrived by the next.
        torch.ops.hlwq.gemv_tc(xp.neg(), xs, tiles, codebook, bits, rows, torch.float32, launch)
        assert torch.equal(torch.ops.hlwq.gemv_tc(xp, xs, tiles, codebook, bits, rows, torch.float32, launch), y)
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    assert _scratch_empty(xp.device)


def test_gemv_tc_stream_where_the_run_arithmetic_needs_64_bits() -> None:
    """The stream flush divides in 32 bits where units x (warps + 1) < 2^32 and in 64 bits past it: a weight of 2^20
    units (random tiles, scales 2^-4, 1.4 GB) on a full grid takes the 64-bit path, against the tile kernel."""
    from pipeline.runtime.kernels import layout, stream_warps, tc_launch

    warps, tiles_n, blocks = 32, 16384, 64
    units = tiles_n * blocks
    grid_warps = torch.cuda.get_device_properties(0).multi_processor_count * warps  # one CTA per SM
    if units * (stream_warps(grid_warps, units) + 1) < 1 << 32:
        pytest.skip("this GPU's grid keeps the arithmetic in 32 bits")
    g = torch.Generator(device="cuda").manual_seed(11)
    ub = layout.unit_bytes(5)
    tiles = torch.randint(0, 256, (tiles_n, blocks, ub), generator=g, device="cuda", dtype=torch.uint8)
    tiles[..., ub - 32 :] = torch.full((16,), 2**-4, dtype=torch.float16, device="cuda").view(torch.uint8)
    codebook = quantize(torch.randn(16, 128, device="cuda").to(torch.bfloat16), QuantParams(bits=5)).codebook
    signs = sign_vector(QuantParams(bits=5).sign_bits(), 128, "cuda")
    x = torch.randn(1, blocks * 128, generator=g, device="cuda").to(torch.bfloat16)
    xp, xs = torch.ops.hlwq.rotate_pairs(x, signs, None)
    rows = tiles_n * 16
    ref = torch.ops.hlwq.gemv_tc(xp, xs, tiles, codebook, 5, rows, torch.float32, tc_launch())
    y = torch.ops.hlwq.gemv_tc(xp, xs, tiles, codebook, 5, rows, torch.float32, tc_launch(warps, 6, stream=True))
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    assert _scratch_empty(xp.device)


def _replays_are_eager(step: Callable[[], torch.Tensor], x: torch.Tensor, g: torch.Generator) -> None:
    """Capture `step` (warmed up on a side stream) in a CUDA graph; for four new inputs written into `x`, a replay
    gives the eager step's output bit for bit (no stale input read, no state left between replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(4):
        x.copy_(torch.randn(x.shape, generator=g, device="cuda").to(x.dtype))
        eager = step()
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), seed


@pytest.mark.parametrize(("warps", "prefetch", "pdl"), [(24, 2, False), (32, 6, False), (32, 6, True)])
def test_gemv_tc_stream_in_cuda_graph(warps: int, prefetch: int, pdl: bool) -> None:
    """Replays of a captured rotation + stream-mode launch give the eager result each time, with no memset between
    them; with a programmatic launch the matvec still reads the rotation of this replay's input, not a stale one."""
    from pipeline.runtime.kernels import layout, tc_launch

    g = torch.Generator(device="cuda").manual_seed(12)
    params = QuantParams(bits=5)
    q = quantize(torch.randn(5376, 8192, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, 5)
    launch = tc_launch(warps, prefetch, stream=True, pdl=pdl)
    x = torch.randn(1, 8192, generator=g, device="cuda", dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        xp, xs = torch.ops.hlwq.rotate_pairs(x, signs, None)
        return torch.ops.hlwq.gemv_tc(xp, xs, tiles, q.codebook, 5, 5376, torch.bfloat16, launch)

    _replays_are_eager(step, x, g)


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(("rows", "cols"), [(21504, 5376), (5376, 21504), (300, 640), (16, 128), (48, 1280)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("warps", "trigger"), [(32, True), (24, False)])
def test_gemv_tc_rot_is_rotate_pairs_then_gemv_tc(bits: int, rows: int, cols: int, dtype: torch.dtype, warps: int,
                                                  trigger: bool) -> None:  # fmt: skip
    """The stream matvec that rotates its own input gives rotate_pairs + gemv_tc's result bit for bit (same pairs,
    same sums in the same order), with and without a smoothing vector, down to one unit; the scratch empty after."""
    from pipeline.runtime.kernels import layout, tc_launch

    g = torch.Generator(device="cuda").manual_seed(bits * rows + cols + warps)
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    x = (torch.randn(1, cols, generator=g, device="cuda") * 3).to(dtype)
    launch = tc_launch(warps, 6, stream=True, pdl=True)
    for inv in (None, torch.rand(cols, generator=g, device="cuda") + 0.5):
        xp, xs = torch.ops.hlwq.rotate_pairs(x, signs, inv)
        ref = torch.ops.hlwq.gemv_tc(xp, xs, tiles, q.codebook, bits, rows, dtype, launch)
        rot = tc_launch(warps, 6, stream=True, pdl=True, trigger=trigger)
        y = torch.ops.hlwq.gemv_tc_rot(x, signs, inv, tiles, q.codebook, bits, rows, rot)
        assert y.dtype == dtype and torch.equal(y, ref)
    assert _scratch_empty(x.device)


@pytest.mark.parametrize("glu", [False, True])
def test_gemv_tc_rot_reads_an_unaligned_input(glu: bool) -> None:
    """An input that starts 2 bytes past a 16-byte boundary (a view one element into its buffer) takes the prologue's
    element-wise loads: the same result, bit for bit, as the aligned copy's 16-byte loads."""
    from pipeline.runtime.kernels import layout, tc_launch

    g = torch.Generator(device="cuda").manual_seed(31)
    params = QuantParams(bits=5)
    rows, cols = 512, 5376
    q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, 5)
    width = cols * (2 if glu else 1)
    buf = (torch.randn(1, width + 1, generator=g, device="cuda") * 3).to(torch.bfloat16)
    x = buf[:, 1:]
    assert x.is_contiguous() and x.data_ptr() % 16 == 2
    launch = tc_launch(32, 6, stream=True, pdl=True, trigger=True)
    inv = torch.rand(cols, generator=g, device="cuda") + 0.5
    y = torch.ops.hlwq.gemv_tc_rot(x, signs, inv, tiles, q.codebook, 5, rows, launch, glu)
    ref = torch.ops.hlwq.gemv_tc_rot(x.clone(), signs, inv, tiles, q.codebook, 5, rows, launch, glu)
    assert torch.equal(y, ref)


# (warps, rows, cols, same grid): True where the launch wants a multiple of 8 CTAs, fewer than the GPU holds, so that
# every cluster size gets the unclustered launch's grid (the same runs, so the same sums); False: the whole GPU,
# where clusters may leave SMs idle and fewer warps then split the sums otherwise.
CLUSTER_CASES = [
    (32, 48, 21504, True),  # 8 CTAs
    (32, 144, 21504, True),  # 24
    (32, 192, 5376, True),  # 8, 42 blocks
    (32, 1600, 640, True),  # 8, 5 blocks
    (32, 8192, 128, True),  # 8, one block: fewer than the cluster's CTAs
    (24, 144, 21504, True),  # 32, at the 24 warps of weights under 1e8 (a full-attention o_proj's launch)
    (24, 144, 5376, True),  # 8
    (24, 6144, 128, True),  # 8, one block
    (32, 5376, 21504, False),
    (32, 21504, 5376, False),
    (24, 5376, 16384, False),
]


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(("warps", "rows", "cols", "same_grid"), CLUSTER_CASES)
@pytest.mark.parametrize("cluster", [2, 4, 8])
def test_gemv_tc_rot_in_clusters(bits: int, warps: int, rows: int, cols: int, same_grid: bool, cluster: int) -> None:
    """CTAs in clusters, each rotating 1/cluster of the input blocks and copying the rest from the others' shared
    memory, run as clusters (the launch's plan says so: no silent fallback) and give the unclustered launch's result:
    bit for bit on the same grid, within float32 summation order otherwise. A plain input with a smoothing vector and
    a GLU input."""
    from pipeline.runtime.kernels import layout, ops, tc_launch

    g = torch.Generator(device="cuda").manual_seed(bits * rows + cols + cluster + warps)
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    alone = tc_launch(warps, 6, stream=True, pdl=True, trigger=True)
    clustered = tc_launch(warps, 6, stream=True, pdl=True, trigger=True, cluster=cluster)
    grid_alone, _, _ = ops.gemv_tc_rot_plan(rows, cols, bits, alone, torch.bfloat16)
    grid, used, parts = ops.gemv_tc_rot_plan(rows, cols, bits, clustered, torch.bfloat16)
    assert parts == 0
    assert used == cluster and grid % cluster == 0
    assert grid == grid_alone or not same_grid
    inv = torch.rand(cols, generator=g, device="cuda") + 0.5
    for glu in (False, True):
        x = (torch.randn(1, cols * (2 if glu else 1), generator=g, device="cuda") * 3).to(torch.bfloat16)
        ref = torch.ops.hlwq.gemv_tc_rot(x, signs, inv, tiles, q.codebook, bits, rows, alone, glu)
        y = torch.ops.hlwq.gemv_tc_rot(x, signs, inv, tiles, q.codebook, bits, rows, clustered, glu)
        if grid == grid_alone:
            assert torch.equal(y, ref), glu
        else:
            assert float((y.double() - ref.double()).norm() / ref.double().norm()) < 1e-3, glu
    assert _scratch_empty(x.device)


def test_gemv_tc_rot_runs_without_clusters_below_one_cluster() -> None:
    """A launch that wants fewer CTAs than a cluster holds (16 x 1280: one) runs unclustered, with the same result."""
    from pipeline.runtime.kernels import layout, ops, tc_launch

    g = torch.Generator(device="cuda").manual_seed(41)
    params = QuantParams(bits=5)
    q = quantize(torch.randn(16, 1280, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, 5)
    clustered = tc_launch(32, 6, stream=True, pdl=True, trigger=True, cluster=2)
    assert ops.gemv_tc_rot_plan(16, 1280, 5, clustered, torch.bfloat16) == (1, 1, 0)
    x = torch.randn(1, 1280, generator=g, device="cuda").to(torch.bfloat16)
    alone = tc_launch(32, 6, stream=True, pdl=True, trigger=True)
    want = torch.ops.hlwq.gemv_tc_rot(x, signs, None, tiles, q.codebook, 5, 16, alone)
    assert torch.equal(torch.ops.hlwq.gemv_tc_rot(x, signs, None, tiles, q.codebook, 5, 16, clustered), want)


# (warps, rows, cols): down_proj's launch, a full-attention o_proj at 32 and at its rule's 24 warps (there the parts
# would outrun the contiguous runs: no part-major layout, the cluster then), gate/up's 42 blocks, small and ragged.
PART_CASES = [(32, 5376, 21504), (32, 5376, 16384), (24, 5376, 16384), (32, 21504, 5376), (32, 300, 640),
              (24, 1000, 1152), (32, 16, 128)]  # fmt: skip


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(("warps", "rows", "cols"), PART_CASES)
def test_gemv_tc_rot_in_parts(bits: int, warps: int, rows: int, cols: int) -> None:
    """The part-major layout runs where kernels.stream_parts says it applies (the plan says so, with the grid its
    runs need, and no cluster beside it even when one is asked for), and gives the contiguous launch's result within
    float32 summation order (its runs cut the tiles elsewhere); where it does not apply, the contiguous launch, bit
    for bit. A plain input with a smoothing vector and a GLU input."""
    from pipeline.runtime import kernels
    from pipeline.runtime.kernels import layout, ops, tc_launch

    g = torch.Generator(device="cuda").manual_seed(bits * rows + cols + warps)
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    alone = tc_launch(warps, 6, stream=True, pdl=True, trigger=True)
    word = tc_launch(warps, 6, stream=True, pdl=True, trigger=True, cluster=2, parts=True)
    grid_alone, _, none = ops.gemv_tc_rot_plan(rows, cols, bits, alone, torch.bfloat16)
    grid, cluster, parts = ops.gemv_tc_rot_plan(rows, cols, bits, word, torch.bfloat16)
    n_tiles, n_blocks = -(-rows // 16), cols // 128
    assert none == 0 and parts == kernels.stream_parts(n_tiles, n_blocks, grid_alone * warps)
    if parts:
        assert cluster == 1 and grid == -(-n_tiles * parts // warps)
        word = tc_launch(warps, 6, stream=True, pdl=True, trigger=True, parts=True)
    if (warps, rows, cols) == (32, 5376, 21504) and grid_alone == 132:  # an H200: 12 parts of 14 blocks, 126 CTAs
        assert (parts, grid) == (12, 126)
    inv = torch.rand(cols, generator=g, device="cuda") + 0.5
    for glu in (False, True):
        x = (torch.randn(1, cols * (2 if glu else 1), generator=g, device="cuda") * 3).to(torch.bfloat16)
        ref = torch.ops.hlwq.gemv_tc_rot(x, signs, inv, tiles, q.codebook, bits, rows, alone, glu)
        y = torch.ops.hlwq.gemv_tc_rot(x, signs, inv, tiles, q.codebook, bits, rows, word, glu)
        if parts:
            assert float((y.double() - ref.double()).norm() / ref.double().norm()) < 1e-3, glu
            assert torch.equal(y, torch.ops.hlwq.gemv_tc_rot(x, signs, inv, tiles, q.codebook, bits, rows, word, glu))
        elif cluster == 1:
            assert torch.equal(y, ref), glu
    assert _scratch_empty(x.device)


def test_gemv_tc_rot_refuses_what_it_cannot_run() -> None:
    """A float32 input is split into two fp16 planes (rotate_pairs + the tile kernel); the rotating kernel keeps one,
    so it refuses float32 in one line rather than drop half its bits; so too more than one token, an input that is
    not the weight's width, and a launch word that is not its 2-slot stream launch."""
    from pipeline.errors import RuntimeBackendError
    from pipeline.runtime.kernels import layout, tc_launch

    params = QuantParams(bits=5)
    q = quantize(torch.randn(64, 256, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, 5)
    launch = tc_launch(24, 6, stream=True, pdl=True)
    x = torch.randn(1, 256, device="cuda")
    for bad, word in [(x, launch), (x[:, :128].bfloat16(), launch), (torch.cat([x, x]).bfloat16(), launch),
                      (x.bfloat16(), tc_launch()), (x.bfloat16(), tc_launch(24, 7, stream=True))]:  # fmt: skip
        with pytest.raises(RuntimeBackendError, match="gemv_tc_rot"):
            torch.ops.hlwq.gemv_tc_rot(bad, signs, None, tiles, q.codebook, 5, 64, word)


def test_tiled_linear_one_token_rotates_in_the_matvec() -> None:
    """At one token a stream-mode weight goes through gemv_tc_rot (no rotate_pairs launch) where HLWQ_TC_ROTATE
    allows it, with rotate_pairs + gemv_tc's result."""
    from pipeline.runtime import kernels
    from pipeline.runtime.kernels import layout

    if not kernels.stream_supported(torch.device("cuda"), 5, 42):
        pytest.skip("no stream mode on this GPU")
    g = torch.Generator(device="cuda").manual_seed(5)
    params = QuantParams(bits=5)
    q = quantize(torch.randn(16384, 5376, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, 5)
    x = torch.randn(1, 5376, generator=g, device="cuda").to(torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = kernels.tiled_linear(x, tiles, q.codebook, signs, 5, 16384)
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    launch = kernels.tc_choose(1, 16384, 42, True)
    xp, xs = torch.ops.hlwq.rotate_pairs(x, signs, None)
    assert torch.equal(y, torch.ops.hlwq.gemv_tc(xp, xs, tiles, q.codebook, 5, 16384, torch.bfloat16, launch))
    assert ("rotate_pairs" in names) == ("0" in (kernels.TC_ROTATE, kernels.TC_STREAM, kernels.TC_LEAN))


@pytest.mark.parametrize(("trigger", "cluster", "parts"), [(True, 1, False), (False, 1, False), (True, 2, False),
                                                           (True, 1, True)])  # fmt: skip
def test_gemv_tc_rot_chain_in_cuda_graph(trigger: bool, cluster: int, parts: bool) -> None:
    """Two rotating matvecs in a row, the second reading the first's output, replayed from a CUDA graph: each replay
    gives the eager result for its own input (a dependent launched early still waits for the output it reads), in
    clusters that share the rotation and in the part-major layout too."""
    from pipeline.runtime.kernels import layout, tc_launch

    g = torch.Generator(device="cuda").manual_seed(21)
    params = QuantParams(bits=5)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    weights = []
    for rows, cols in [(8192, 5376), (5376, 8192)]:
        q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
        weights.append((layout.to_tiles(q.codes, q.scales, 5), q.codebook, rows))
    launch = tc_launch(24 if not parts else 32, 6, stream=True, pdl=True, trigger=trigger, cluster=cluster, parts=parts)
    x = torch.randn(1, 5376, generator=g, device="cuda", dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        h = x
        for tiles, codebook, rows in weights:
            h = torch.ops.hlwq.gemv_tc_rot(h, signs, None, tiles, codebook, 5, rows, launch)
        return h

    _replays_are_eager(step, x, g)


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(("rows", "cols"), [(5376, 21504), (300, 640), (16, 128)])
def test_gemv_tc_rot_makes_the_glu_input(bits: int, rows: int, cols: int) -> None:
    """glu: [gate | up] in, gelu(gate, tanh) · up made inside the rotating matvec: the result of feeding that product
    (fp32, rounded to bf16 once, as the compiled step's fused kernel stores it) to the plain rotating matvec, up to
    the tanh's last bits moving a rounding."""
    import torch.nn.functional as F

    from pipeline.runtime.kernels import layout, tc_launch

    g = torch.Generator(device="cuda").manual_seed(bits + rows)
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    gu = (torch.randn(1, 2 * cols, generator=g, device="cuda") * 2).to(torch.bfloat16)
    gate, up = gu.float().split(cols, dim=-1)
    x = (F.gelu(gate, approximate="tanh") * up).to(torch.bfloat16)
    launch = tc_launch(32, 6, stream=True, pdl=True, trigger=True)
    inv = torch.rand(cols, generator=g, device="cuda") + 0.5
    ref = torch.ops.hlwq.gemv_tc_rot(x, signs, inv, tiles, q.codebook, bits, rows, launch)
    y = torch.ops.hlwq.gemv_tc_rot(gu, signs, inv, tiles, q.codebook, bits, rows, launch, True)
    assert float((y.double() - ref.double()).norm() / ref.double().norm()) < 1e-3


def test_tiled_glu_linear_falls_back_where_it_cannot_fuse() -> None:
    """Two tokens (no rotating matvec): gelu(gate)·up, then tiled_linear, exactly."""
    import torch.nn.functional as F

    from pipeline.runtime.kernels import tiled_glu_linear, tiled_linear

    g, tiles, codebook, signs, inv, _ = _smoothed_case(5, 384, 640, seed=5)
    gu = torch.randn(2, 1280, generator=g, device="cuda").to(torch.bfloat16)
    gate, up = gu.split(640, dim=-1)
    want = tiled_linear(F.gelu(gate, approximate="tanh") * up, tiles, codebook, signs, 5, 384, inv)
    assert torch.equal(tiled_glu_linear(gu, tiles, codebook, signs, 5, 384, inv), want)


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(
    ("rows", "cols", "warps", "dtype", "smoothed"),
    [
        (43008, 5376, 32, torch.bfloat16, True),  # 31B's gate/up, its 42 blocks
        (300, 640, 24, torch.float16, False),
        (16, 128, 32, torch.bfloat16, False),  # one block
        (256, 8192, 32, torch.bfloat16, True),  # 64 blocks: two per warp, the most it takes
    ],
)
def test_gemv_tc_rot_norm2_joins_the_residual(bits: int, rows: int, cols: int, warps: int, dtype: torch.dtype,
                                              smoothed: bool) -> None:  # fmt: skip
    """gemv_tc_rot_norm2 against the step's own ops (gemma4_decode.rms_norm, rounded between them as eager rounds,
    then the plain rotating matvec): the new residual within one rounding of its terms (the mean's sum order and
    rsqrt differ, which can move t = rms_norm(x)·w1 to its neighbour), the product within output rounding."""
    from pipeline.runtime.gemma4_decode import rms_norm
    from pipeline.runtime.kernels import layout, tc_launch

    g = torch.Generator(device="cuda").manual_seed(bits + cols)
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    x = (torch.randn(1, cols, generator=g, device="cuda") * 3).to(dtype)
    h = (torch.randn(1, cols, generator=g, device="cuda") * 20).to(dtype)
    w1, w2 = (torch.rand(2, cols, generator=g, device="cuda") + 0.5).to(dtype)
    inv = torch.rand(cols, generator=g, device="cuda") + 0.5 if smoothed else None
    t = rms_norm(x, w1, 1e-6)
    h2 = h + t
    launch = tc_launch(warps, 6, stream=True, pdl=True, trigger=warps == 32)
    ref = torch.ops.hlwq.gemv_tc_rot(rms_norm(h2, w2, 1e-6), signs, inv, tiles, q.codebook, bits, rows, launch)
    y, h_out = torch.ops.hlwq.gemv_tc_rot_norm2(x, h, w1.float(), w2.float(), 1e-6, None, signs, inv, tiles,
                                                q.codebook, bits, rows, launch)  # fmt: skip
    ulp = 2**-7 * (h2.float().abs() + t.float().abs())  # a rounding of the sum and one of t, at most
    assert h_out.dtype == dtype and bool(((h_out.float() - h2.float()).abs() <= ulp).all())
    assert float((y.double() - ref.double()).norm() / ref.double().norm()) < 2e-3


def test_gemv_tc_rot_norm2_refuses_what_it_cannot_run() -> None:
    """More blocks than two per warp, or gains that are not float32: one line each; tiled_norm2_linear falls back
    (None) for two tokens and for such gains."""
    from pipeline.errors import RuntimeBackendError
    from pipeline.runtime import kernels
    from pipeline.runtime.kernels import layout, tc_launch

    params = QuantParams(bits=5)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    q = quantize(torch.randn(64, 8320, device="cuda").to(torch.bfloat16), params)  # 65 blocks
    tiles = layout.to_tiles(q.codes, q.scales, 5)
    x = torch.randn(1, 8320, device="cuda").to(torch.bfloat16)
    ones = torch.ones(8320, device="cuda")
    with pytest.raises(RuntimeBackendError, match="at most 64 blocks"):
        torch.ops.hlwq.gemv_tc_rot_norm2(x, x, ones, ones, 1e-6, None, signs, None, tiles, q.codebook, 5, 64,
                                         tc_launch(32, 6, stream=True, pdl=True))  # fmt: skip
    with pytest.raises(RuntimeBackendError, match="float32 gains"):
        torch.ops.hlwq.gemv_tc_rot_norm2(x, x, ones.bfloat16(), ones, 1e-6, None, signs, None, tiles, q.codebook,
                                         5, 64, tc_launch(32, 6, stream=True, pdl=True))  # fmt: skip
    two = torch.randn(2, 8320, device="cuda").to(torch.bfloat16)
    assert kernels.tiled_norm2_linear(two, two, ones, ones, 1e-6, tiles, q.codebook, signs, 5, 64) is None
    assert kernels.tiled_norm2_linear(x, x, ones.bfloat16(), ones, 1e-6, tiles, q.codebook, signs, 5, 64) is None


def test_fused_projections_match_the_step_ops() -> None:
    """gemma4_decode.project_norm2 (plain, and scaled with another layer's gain: the cross-layer join) and
    project_glu with the fused launches (31B's gate/up and down shapes, smoothed) against the same functions on their
    unfused path: the residual within a rounding, outputs within 2e-3."""
    from pipeline.runtime import gemma4_decode as g4

    g = torch.Generator(device="cuda").manual_seed(8)
    parts_t = []
    for rows, cols in [(43008, 5376), (5376, 21504)]:
        _, tiles, codebook, signs, inv, _ = _smoothed_case(5, rows, cols, seed=rows)
        parts_t.append(((g4.Part("hlwq", rows, cols, 5),), ((tiles, codebook, signs, inv),)))
    (mlp_p, mlp_t), (down_p, down_t) = parts_t
    o = (torch.randn(1, 5376, generator=g, device="cuda") * 3).to(torch.bfloat16)
    h = (torch.randn(1, 5376, generator=g, device="cuda") * 20).to(torch.bfloat16)
    w1, w2 = (torch.rand(2, 5376, generator=g, device="cuda") + 0.5).to(torch.bfloat16)
    scalar = torch.tensor([0.75], device="cuda", dtype=torch.bfloat16)
    w = {
        "a": w1,
        "b": w2,
        "layer_scalar": scalar,
        "f32": {"a": w1.float(), "b": w2.float(), "layer_scalar": scalar.float()},
    }
    # The previous layer's weights: its own gain and scalar for the join (the cross-layer case)
    pw1 = (torch.rand(5376, generator=g, device="cuda") + 0.5).to(torch.bfloat16)
    pscalar = torch.tensor([1.25], device="cuda", dtype=torch.bfloat16)
    pw = {"a": pw1, "layer_scalar": pscalar, "f32": {"a": pw1.float(), "layer_scalar": pscalar.float()}}

    def unfused(d: dict[str, Any]) -> dict[str, Any]:  # the same weights without float32 copies: the unfused path
        return {k: v for k, v in d.items() if k != "f32"} | {"f32": {}}

    for scaled, prev in [(False, None), (True, None), (True, pw)]:
        gu, h2 = g4.project_norm2(mlp_p, mlp_t, o, h, 1e-6, w, "a", "b", prev, scaled=scaled)
        ref_prev = None if prev is None else unfused(prev)
        gu_ref, h2_ref = g4.project_norm2(mlp_p, mlp_t, o, h, 1e-6, unfused(w), "a", "b", ref_prev, scaled=scaled)
        assert bool(((h2.float() - h2_ref.float()).abs() <= 2**-6 * (h2_ref.float().abs() + 8)).all())
        assert float((gu.double() - gu_ref.double()).norm() / gu_ref.double().norm()) < 2e-3
    y = g4.project_glu(down_p, down_t, gu_ref)
    gate, up = gu_ref.split(21504, dim=-1)
    y_ref = g4.project(down_p, down_t, torch.nn.functional.gelu(gate, approximate="tanh") * up)
    assert float((y.double() - y_ref.double()).norm() / y_ref.double().norm()) < 2e-3
