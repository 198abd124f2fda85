"""Native kernels against the reference dequantization (GPU only; skipped on CPU). bench/kernel.py times them."""

from __future__ import annotations

import pytest
import torch

from pipeline.quant.codec import QuantParams, dequantize, quantize
from pipeline.quant.hadamard import sign_vector

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


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


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(("rows", "cols"), [(384, 640), (1000, 576), (2048, 5376)])
@pytest.mark.parametrize("n", [1, 2, 8, 9, 20, 40])
def test_tiled_linear_matches_reference(bits: int, rows: int, cols: int, n: int) -> None:
    """The tensor-core path (≤ 8 tokens) and the tiled dequantize + cuBLAS path (more), smoothing vector included."""
    from pipeline.runtime.kernels import layout, tiled_linear

    g = torch.Generator(device="cuda").manual_seed(bits * rows + n + 7)
    w = torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16)
    params = QuantParams(bits=bits)
    smooth = torch.rand(cols, generator=g, device="cuda") + 0.5
    q = quantize(w, params, smooth)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    x = torch.randn(n, cols, generator=g, device="cuda").to(torch.bfloat16)
    ref = x.double() @ dequantize(q, params.sign_bits(), torch.float64).t()
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    inv = (1.0 / q.smooth).float()
    y = tiled_linear(x, tiles, q.codebook, signs, bits, rows, inv)
    err = float((y.double() - ref).norm() / ref.norm())
    # fp16 activations (block-scaled) and levels on tensor cores, fp32 accumulation, bf16 output rounding.
    assert torch.isfinite(y).all()
    assert err < 3e-3


def _tc_inputs(bits: int, rows: int, cols: int, n: int, seed: int):  # type: ignore[no-untyped-def]
    from pipeline.runtime.kernels import layout

    g = torch.Generator(device="cuda").manual_seed(seed)
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
    signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
    xp, xs = torch.ops.hlwq.rotate_pairs(torch.randn(n, cols, generator=g, device="cuda"), signs, None)
    return xp, xs, layout.to_tiles(q.codes, q.scales, bits), q.codebook


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize(
    ("rows", "cols"), [(1000, 5376), (5376, 1024), (300, 640), (16, 128), (16, 256), (48, 1280), (21504, 5376)]
)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize(("warps", "prefetch"), [(8, 3), (16, 4), (24, 2), (32, 2), (32, 6), (24, 7), (28, 8)])
def test_gemv_tc_stream_matches_unsplit(bits: int, rows: int, cols: int, n: int, warps: int, prefetch: int) -> None:
    """Stream mode (equal runs of units per warp, shared tiles summed in warp order by their last contributor)
    against the unsplit kernel, down to a single unit (16x128) and to fewer units than warps (16x256, 48x1280: no
    warp may idle between a tile's owners); deterministic; counters zero again afterwards."""
    from pipeline.runtime.kernels import ops, tc_launch

    xp, xs, tiles, codebook = _tc_inputs(bits, rows, cols, n, seed=bits * rows + n + warps)
    ref = torch.ops.hlwq.gemv_tc(xp, xs, tiles, codebook, bits, rows, torch.float32, tc_launch())
    launch = tc_launch(warps, prefetch, stream=True)
    y = torch.ops.hlwq.gemv_tc(xp, xs, tiles, codebook, bits, rows, torch.float32, launch)
    for _ in range(3):
        assert torch.equal(torch.ops.hlwq.gemv_tc(xp, xs, tiles, codebook, bits, rows, torch.float32, launch), y)
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    assert not ops.tile_counters(xp.device, tiles.shape[0]).any()


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

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(4):
        x.copy_(torch.randn(1, 8192, generator=g, device="cuda", dtype=torch.bfloat16))
        eager = step()
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), seed
