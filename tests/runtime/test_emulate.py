"""The CPU emulation of the native kernels' fp16 operands (pipeline/runtime/kernels/emulate.py): without rounding it
is the tiled layout's exact float64 product; with it, the error has the size fp16 implies."""

from __future__ import annotations

import pytest
import torch

from pipeline.quant.codec import QuantParams, dequantize, quantize
from pipeline.quant.hadamard import rotate, sign_vector
from pipeline.runtime.kernels import emulate, layout


def _case(bits: int, rows: int = 45, cols: int = 640, n: int = 3, seed: int = 3):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    params = QuantParams(bits=bits)
    q = quantize(w, params)
    signs = sign_vector(params.sign_bits(), 128)
    # Activations with a wide per-block range, as a transformer's are: the power-of-two scales must carry it.
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, cols, dtype=torch.float64)
    return q, params.sign_bits(), signs, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_rotate64_is_the_codec_rotation() -> None:
    _, _, signs, x = _case(5)
    z = emulate.rotate64(x, signs)
    assert _rel(z, rotate(x.float(), signs).double()) < 1e-6


@pytest.mark.parametrize("bits", [4, 5])
def test_exact_operands_give_the_tiled_product(bits: int) -> None:
    q, sign_bits, signs, x = _case(bits)
    rows = q.shape[0]
    z = emulate.rotate64(x, signs)
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    exact = layout.tiled_matvec(z.reshape(x.shape[0], -1), tiles, q.codebook, rows, bits)
    idx = emulate.code_indices(q.codes, q.scales, bits)
    for per in ("block", "row"):
        a = emulate.activation_operand(z, "exact", per)
        for weight in (emulate.tc_weight, emulate.prefill_weight):
            y = emulate.emulated_matvec(a, weight(idx, q.scales, q.codebook, "exact"))
            assert _rel(y, exact) < 1e-12
    ref = x @ dequantize(q, sign_bits, torch.float64).t()
    assert _rel(exact, ref) < 1e-6  # the codec's own float32 steps


@pytest.mark.parametrize("bits", [4, 5])
def test_fp16_operands_err_as_fp16_does(bits: int) -> None:
    q, _, signs, x = _case(bits)
    z = emulate.rotate64(x, signs)
    idx = emulate.code_indices(q.codes, q.scales, bits)
    w_exact = emulate.tc_weight(idx, q.scales, q.codebook, "exact")
    a_exact = emulate.activation_operand(z, "exact")
    exact = emulate.emulated_matvec(a_exact, w_exact)
    err = {}
    for act in emulate.ROUNDINGS:
        for lev in emulate.ROUNDINGS:
            y = emulate.emulated_matvec(
                emulate.activation_operand(z, act), emulate.tc_weight(idx, q.scales, q.codebook, lev)
            )
            err[act, lev] = _rel(y, exact)
    assert err["exact", "exact"] < 1e-12
    for one in (("fp16", "exact"), ("exact", "fp16"), ("fp16", "fp16")):
        assert 1e-5 < err[one] < 1e-3, (one, err[one])  # fp16's unit roundoff is 2^-11 ≈ 4.9e-4
    for split in (("fp16x2", "exact"), ("exact", "fp16x2"), ("fp16x2", "fp16x2")):
        assert err[split] < 1e-6, (split, err[split])


def test_activation_operand_is_fp16_in_range() -> None:
    _, _, signs, x = _case(5)
    z = emulate.rotate64(x, signs)
    xs = emulate.block_pow2(z)
    a = emulate.activation_operand(z, "fp16").reshape(z.shape) / xs
    assert torch.equal(a, a.half().double())
    amax = a.abs().amax(-1)
    assert bool(((amax >= 2**13) & (amax <= 2**14)).all())
    assert torch.equal(torch.log2(xs), torch.round(torch.log2(xs)))  # powers of two: undone exactly


def test_level_table_is_the_kernels_pair_table() -> None:
    """The kernel's table entry: __floats2half2_rn(level * 0.08838834764831845f); 5-bit codebooks are symmetric, so
    the full table equals sign x the magnitude half the kernel stores."""
    cb = quantize(torch.randn(16, 128), QuantParams(bits=5)).codebook
    t = emulate.level_table(cb, "fp16")
    assert torch.equal(t, (cb.float() * 0.08838834764831845).half().double())
    assert torch.equal(t[:16], -t[16:].flip(0))
    assert float((t - cb.double() / 128**0.5).abs().max()) > 0  # the rounding is real


def test_split_operands_keep_22_bits_at_any_weight_scale() -> None:
    """split_mm's weight operand: scaled by pow2_scale, hi + lo carries ~22 bits even for weights of ~1e-3, whose
    remainders unscaled fall into fp16's subnormals (~17 bits); the scale is a power of two, so exact to undo."""
    from pipeline.runtime.kernels import pow2_scale, split_hi_lo

    g = torch.Generator().manual_seed(0)
    for std in (1.0, 2e-3):
        w = torch.randn(64, 512, generator=g) * std
        s = pow2_scale(w)
        assert float(torch.log2(s).frac()) == 0.0 and 2**13 < float((w / s).abs().max()) <= 2**14
        hi, lo = split_hi_lo(w / s)
        scaled = (hi.double() + lo.double()) * s.double()
        assert float((scaled - w.double()).norm() / w.double().norm()) < 2**-21
    hi, lo = split_hi_lo(w)  # the small weights unscaled: remainders in the subnormals
    assert float(((hi.double() + lo.double()) - w.double()).norm() / w.double().norm()) > 2**-20
