"""Column smoothing and bit allocation: pure math."""

from __future__ import annotations

import pytest
import torch

from pipeline.quant import QuantParams, allocate, dequantize, quantize, smooth


def test_apply_unapply_round_trip_and_geometric_mean():
    g = torch.Generator().manual_seed(0)
    act = (torch.rand(300, generator=g) + 0.2) ** 4 * 100
    w = torch.randn(40, 300, generator=g)
    s = smooth.smoothing_vector(act, smooth.column_energy([w, 2 * w[:7]]), 0.25, 16.0)
    assert s.dtype == torch.float32 and s.shape == (300,)
    assert abs(float(s.double().log().mean())) < 1e-6  # geometric mean 1 (no clamp hit here)
    assert torch.allclose(smooth.unapply(smooth.apply(w, s), s), w, rtol=1e-6, atol=1e-6)
    # larger activation energy at equal column energy -> larger multiplier
    assert float(s[act.argmax()]) > float(s[act.argmin()])


def test_clamp_and_zero_channels():
    act = torch.tensor([0.0, 1.0, 1e12, 1.0])
    s = smooth.smoothing_vector(act, torch.ones(4), 0.5, 4.0)
    assert torch.isfinite(s).all() and float(s.max()) <= 4.0 + 1e-6 and float(s.min()) >= 0.25 - 1e-6
    assert smooth.smoothing_vector(act, torch.ones(4), 0.0, 4.0).eq(1.0).all()  # alpha 0: no smoothing


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one 1-D shape"):
        smooth.smoothing_vector(torch.ones(3), torch.ones(4), 0.25, 16.0)
    with pytest.raises(ValueError, match="sharing an input"):
        smooth.column_energy([torch.ones(2, 3), torch.ones(2, 4)])
    with pytest.raises(ValueError, match=r"\[C\] vector"):
        smooth.apply(torch.ones(2, 3), torch.ones(4))


def test_smoothed_codec_decodes_to_the_weight_and_protects_loud_channels():
    """Codes encode W·diag(s); dequantize divides back. With s from activations, the activation-weighted error
    (what the output sees) falls, although the plain weight error may rise."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    act = torch.ones(256)
    act[:4] = 400.0  # a few loud input channels, as in real LMs
    s = smooth.smoothing_vector(act, smooth.column_energy([w]), 0.25, 16.0)
    p = QuantParams(bits=4)
    plain = dequantize(quantize(w, p), p.sign_bits(), torch.float32)
    q = quantize(w, p, s)
    assert q.smooth is not None and torch.equal(q.smooth, s)
    sm = dequantize(q, p.sign_bits(), torch.float32)
    assert torch.nn.functional.cosine_similarity(sm.flatten(), w.flatten(), 0) > 0.99
    out_err = lambda d: float(((d - w) ** 2 * act).sum())  # noqa: E731 - E||(W - Ŵ) x||² for independent x_i
    assert out_err(sm) < 0.5 * out_err(plain)


def _cands(n: int = 12) -> list[allocate.Candidate]:
    return [allocate.Candidate(f"t{i}", 64 * (1 + i % 3), 256, sensitivity=float(1 + 10 * (i % 4)))
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("target", [3.6, 4.3, 5.5, 6.25])
def test_allocation_meets_the_target_without_passing_it(target: float):
    cands = _cands()
    bits = allocate.allocate(cands, target, 128)
    avg = allocate.average_bpw(cands, bits, 128)
    assert avg <= target
    # the greedy stops only when no single step fits: within one step of the most expensive tensor's width change
    step = max(allocate.stored_bits(c, 4, 128) - allocate.stored_bits(c, 3, 128) for c in cands)
    assert avg > target - step / sum(c.rows * c.cols for c in cands)


def test_allocation_follows_sensitivity_and_keeps_fixed_widths():
    cands = [*_cands(), allocate.Candidate("fixed", 64, 256, sensitivity=1e9, fixed_bits=3)]
    bits = allocate.allocate(cands, 5.2, 128)
    assert bits["fixed"] == 3  # an override wins even against a huge sensitivity
    by_sens = sorted(cands[:-1], key=lambda c: c.sensitivity)
    assert bits[by_sens[-1].name] >= bits[by_sens[0].name]
    with pytest.raises(ValueError, match="below"):
        allocate.allocate(cands, 2.5, 128)


def test_distortion_matches_the_reference_table():
    assert allocate.distortion(5) == pytest.approx(0.0025047, rel=1e-4)
    assert allocate.distortion(4) == pytest.approx(0.0095010, rel=1e-4)
