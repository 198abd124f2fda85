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
