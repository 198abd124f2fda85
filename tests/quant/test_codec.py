import math

import pytest
import torch

from pipeline.quant import QuantParams, dequantize, metrics, quantize


def _round_trip(w, **kw):
    p = QuantParams(**kw)
    q = quantize(w, p)
    return q, dequantize(q, p.sign_bits(), torch.float32)


def test_expected_cos_sim_on_gaussian():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    _, r = _round_trip(w, scale="l2")
    # sqrt(1 - D) with D = 0.0025047 (5-bit Lloyd-Max on N(0,1)); normalization by the block norm costs a hair.
    assert metrics.cos_sim(w, r) == pytest.approx(math.sqrt(1 - 0.0025047), abs=1.5e-4)


def test_lsq_scale_beats_l2_scale():
    torch.manual_seed(0)
    w = torch.randn(512, 1024)
    _, r_l2 = _round_trip(w, scale="l2")
    _, r_ls = _round_trip(w, scale="lsq")
    assert metrics.rel_mse(w, r_ls) < metrics.rel_mse(w, r_l2)


@pytest.mark.parametrize("bits", range(2, 9))
def test_shapes_dtypes_and_padding(bits):
    torch.manual_seed(bits)
    w = torch.randn(9, 300).to(torch.bfloat16)
    q, r = _round_trip(w, bits=bits)
    assert q.codes.shape == (9, 3 * 128 * bits // 8) and q.codes.dtype == torch.uint8
    assert q.scales.shape == (9, 3) and q.scales.dtype == torch.float16
    assert q.codebook.shape == (2**bits,)
    assert r.shape == w.shape
    p = QuantParams(bits=bits)
    assert dequantize(q, p.sign_bits()).dtype == torch.bfloat16
    # more bits, less error
    assert metrics.rel_mse(w, r) < {2: 0.13, 3: 0.04, 4: 0.011, 5: 0.003, 6: 0.0009, 7: 0.0003, 8: 0.0001}[bits]


def test_zero_rows_and_3d_tensors():
    w = torch.zeros(4, 2, 128)
    w[1] = torch.randn(2, 128)
    q, r = _round_trip(w)
    assert q.shape == (4, 2, 128)
    assert torch.equal(r[0], torch.zeros(2, 128)) and torch.isfinite(r).all()
    assert metrics.cos_sim(w[1], r[1]) > 0.998


def test_deterministic_bytes():
    torch.manual_seed(3)
    w = torch.randn(300, 640).to(torch.bfloat16)
    a, b = quantize(w, QuantParams()), quantize(w.clone(), QuantParams())
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_fitted_codebook_option_not_worse():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((256, 1024))
    _, r_g = _round_trip(w, scale="l2")
    _, r_f = _round_trip(w, scale="l2", fit_codebook=True)
    assert metrics.rel_mse(w, r_f) <= metrics.rel_mse(w, r_g) * 1.001


def test_scale_overflow_is_an_error():
    w = torch.full((1, 128), 60000.0)
    with pytest.raises(OverflowError):
        quantize(w, QuantParams())


def test_rejects_integer_and_1d():
    with pytest.raises(TypeError):
        quantize(torch.zeros(4, 128, dtype=torch.int32), QuantParams())
    with pytest.raises(ValueError):
        quantize(torch.zeros(128), QuantParams())
    with pytest.raises(ValueError):
        QuantParams(block_size=96)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_gpu_give_identical_bytes():
    torch.manual_seed(0)
    w = torch.randn(512, 5376).to(torch.bfloat16)
    a, b = quantize(w, QuantParams()), quantize(w.cuda(), QuantParams())
    assert torch.equal(a.codes, b.codes.cpu()) and torch.equal(a.scales, b.scales.cpu())
    p = QuantParams()
    assert torch.equal(dequantize(a, p.sign_bits()), dequantize(b, p.sign_bits()).cpu())
