import math

import pytest
import torch

from pipeline.quant import kv, lloyd_max


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


def fixed_vectors() -> torch.Tensor:
    x = torch.linspace(-1, 1, 16) + torch.sin(torch.arange(16.0))
    return torch.stack([x, x.flip(-1) * 3])


# Codes and scales of fixed_vectors(), frozen when the KV layout was defined (sign seed 0, lsq scale / absmax).
GOLDEN = {
    2: ([108, 154, 214, 155, 154, 97, 89, 5], [4.01171875, 13.578125]),
    3: ([221, 49, 108, 38, 150, 207, 101, 198, 179, 142, 77, 16], [4.26953125, 13.1875]),
    4: ([162, 122, 73, 92, 127, 136, 183, 138, 90, 148, 103, 5, 170, 98, 89, 70], [3.84765625, 11.609375]),
}
GOLDEN_ABSMAX = {
    2: ([165, 161, 214, 217, 103, 151, 74, 90], [1.23828125, 3.71484375]),
    3: ([22, 151, 252, 231, 210, 216, 219, 63, 214, 148, 27, 75], [0.53076171875, 1.591796875]),
    4: ([195, 167, 120, 86, 131, 194, 246, 234, 174, 111, 44, 56, 101, 135, 122, 60], [0.2476806640625, 0.74267578125]),
}


@pytest.mark.parametrize("bits", kv.KV_BITS)
def test_golden_bytes(bits):
    p = kv.quantize_kv(fixed_vectors(), bits, kv.kv_signs(16, 0))
    assert p.codes.flatten().tolist() == GOLDEN[bits][0]
    assert p.scales.tolist() == GOLDEN[bits][1]
    a = kv.quantize_absmax(fixed_vectors(), bits)
    assert a.codes.flatten().tolist() == GOLDEN_ABSMAX[bits][0]
    assert a.scales.tolist() == GOLDEN_ABSMAX[bits][1]


@pytest.mark.parametrize("bits", kv.KV_BITS)
def test_codes_match_a_plain_reference(bits):
    """Codes = nearest Lloyd-Max level of sqrt(d)·H·D·x/||x||, with H the explicit Sylvester matrix."""
    d = 64
    x = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(bits))
    signs = kv.kv_signs(d, 7)
    p = kv.quantize_kv(x, bits, signs, scale="l2")
    y = (x.double() * signs.double()) @ sylvester(d).T
    u = y * math.sqrt(d) / y.norm(dim=-1, keepdim=True)
    cb = lloyd_max.gaussian_codebook(bits).double()
    ref = (u.unsqueeze(-1) - cb).abs().argmin(-1)
    codes = kv._unpack_codes(p.codes, bits, d)
    assert (codes.long() != ref).float().mean() < 1e-3  # only exact ties at a threshold may differ
    assert torch.allclose(p.scales.float(), x.norm(dim=-1), rtol=1e-3)


@pytest.mark.parametrize("bits", kv.KV_BITS)
@pytest.mark.parametrize("d", [64, 128, 96])
def test_round_trip_error_and_rotated_basis(bits, d):
    x = torch.randn(4, 2, 33, d, generator=torch.Generator().manual_seed(d + bits), dtype=torch.float64).float()
    signs = kv.kv_signs(d, 0)
    p = kv.quantize_kv(x, bits, signs)
    assert p.codes.shape == (4, 2, 33, d * bits // 8) and p.codes.dtype == torch.uint8
    assert p.scales.shape == (4, 2, 33) and p.scales.dtype == torch.float16
    back = kv.dequantize_kv(p, signs)
    rel = float((back - x).pow(2).sum() / x.pow(2).sum())
    expected = {2: 0.1175, 3: 0.0345, 4: 0.0095}[bits]  # Lloyd-Max MSE on N(0,1)
    assert rel < expected * 1.25
    rot = kv.dequantize_kv(p, signs, rotated=True)
    q = torch.randn(d)
    # q·k == (HDq)·(HDk): the rotated basis loses nothing.
    assert torch.allclose(back @ q, rot @ kv.rotate(q, signs), atol=1e-4)
    assert torch.allclose(kv.unrotate(rot, signs), back, atol=1e-5)


def test_lsq_scale_not_worse_than_l2():
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0))
    signs = kv.kv_signs(64, 0)
    err = {s: float((kv.dequantize_kv(kv.quantize_kv(x, 3, signs, s), signs) - x).pow(2).mean()) for s in ("l2", "lsq")}
    assert err["lsq"] < err["l2"]


@pytest.mark.parametrize("bits", kv.KV_BITS)
def test_absmax_round_trip(bits):
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    back = kv.dequantize_absmax(kv.quantize_absmax(x, bits))
    step = x.abs().amax(-1, keepdim=True) * 2 / ((1 << bits) - 1)
    assert ((back - x).abs() <= step / 2 + 1e-3).all()
    assert torch.allclose(back.abs().amax(-1), x.abs().amax(-1), rtol=1e-3)  # the grid spans ±absmax


def test_zero_vectors_and_bad_input():
    signs = kv.kv_signs(32, 0)
    z = torch.zeros(2, 32)
    assert torch.equal(kv.dequantize_kv(kv.quantize_kv(z, 3, signs), signs), z)
    assert torch.equal(kv.dequantize_absmax(kv.quantize_absmax(z, 3)), z)
    with pytest.raises(ValueError, match="KV bits"):
        kv.quantize_kv(z, 5, signs)
    with pytest.raises(ValueError, match="power-of-two block"):
        kv.rotation_block(36)
    with pytest.raises(OverflowError):
        kv.quantize_kv(torch.full((1, 32), 2e4), 3, signs)
    assert kv.rotation_block(72) == 8 and kv.rotation_block(512) == 512
    assert kv.bits_per_element(3, 128) == 3.125


@pytest.mark.parametrize("bits", kv.KV_BITS)
def test_fast_unpack_is_bitpack_unpack(bits):
    from pipeline.quant import bitpack

    codes = torch.randint(0, 1 << bits, (3, 7, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = kv._pack_codes(codes, bits)
    assert torch.equal(packed, bitpack.pack(codes.unsqueeze(-2), bits).squeeze(-2))
    assert torch.equal(kv._unpack_codes(packed, bits, 256), codes)
