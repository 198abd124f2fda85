"""HLWQLinear on the CPU: the reference forward is F.linear with the reference-dequantized weight, for 4/5/6 bits,
with and without bias, a padded last block, and FORMAT v2 column smoothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from pipeline.quant import QuantParams, dequantize, quantize
from pipeline.runtime import HLWQLinear


@pytest.mark.parametrize(("bits", "in_f", "bias"), [(5, 256, True), (4, 320, False), (6, 128, True)])
def test_reference_forward_is_linear_of_dequantized(bits: int, in_f: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, in_f, generator=g).to(torch.bfloat16)
    qp = QuantParams(bits=bits, block_size=128)
    q = quantize(w, qp)
    b = torch.nn.Parameter(torch.randn(48, generator=g).to(torch.bfloat16), requires_grad=False) if bias else None
    lin = HLWQLinear.from_quantized(q, qp.sign_bits(), bias=b)
    x = torch.randn(3, 5, in_f, generator=g).to(torch.bfloat16)
    expected = F.linear(x, dequantize(q, qp.sign_bits(), torch.bfloat16), b)
    assert torch.equal(lin(x), expected)
    assert lin.codes.shape == (48, -(-in_f // 128) * 128 * bits // 8) and lin.scales.dtype == torch.float16
    assert sorted(lin.state_dict()) == sorted(["codes", "scales", "codebook", *(["bias"] if bias else [])])


def test_smooth_divides_the_columns() -> None:
    """FORMAT v2: codes encode W·diag(s); the reference dequantization divides column i by s_i."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    s = torch.rand(256, generator=g) + 0.5
    qp = QuantParams()
    q = quantize(w * s, qp)
    lin = HLWQLinear.from_quantized(dataclasses.replace(q, smooth=s), qp.sign_bits())
    x = torch.randn(2, 256, generator=g)
    expected = F.linear(x, dequantize(q, qp.sign_bits(), torch.float32) / s)
    assert torch.equal(lin(x), expected)
    # ... and that is W again, up to the 5-bit error (without the division it would be far off)
    assert F.cosine_similarity(lin(x).flatten(), F.linear(x, w).flatten(), 0) > 0.995
    assert F.cosine_similarity(F.linear(x, dequantize(q, qp.sign_bits(), torch.float32)).flatten(),
                               F.linear(x, w).flatten(), 0) < 0.99  # fmt: skip


def test_runtime_is_checked() -> None:
    with pytest.raises(ValueError, match="runtime"):
        HLWQLinear(128, 8, 5, runtime="fast")
