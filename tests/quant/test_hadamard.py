import torch

from pipeline.quant import hadamard


def test_fwht_is_orthonormal_sylvester():
    n = 128
    h = hadamard.fwht(torch.eye(n))
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6)
    # Sylvester order: H[i, j] = (-1)^popcount(i & j) / sqrt(n)
    i = torch.arange(n)
    parity = torch.tensor([[bin(a & b).count("1") % 2 for b in range(n)] for a in range(n)])
    assert torch.allclose(h, (1 - 2 * parity).float() / n**0.5, atol=1e-7)
    assert i.numel() == n


def test_rotate_unrotate_round_trip_with_padding():
    torch.manual_seed(0)
    w = torch.randn(7, 300)
    signs = hadamard.sign_vector(hadamard.sign_bits(128, 0), 128)
    y = hadamard.rotate(w, signs)
    assert y.shape == (7, 3, 128)
    assert torch.allclose(hadamard.unrotate(y, signs, 300), w, atol=1e-5)
    # An orthonormal map keeps every block's norm.
    assert torch.allclose(y.norm(dim=-1), hadamard.to_blocks(w, 128).norm(dim=-1), rtol=1e-5)


def test_sign_bits_are_seeded_and_golden():
    a, b = hadamard.sign_bits(128, 0), hadamard.sign_bits(128, 1)
    assert a == hadamard.sign_bits(128, 0) and a != b
    assert 40 < sum(a) < 88  # about half negative
    hx = hadamard.signs_to_hex(a)
    assert hadamard.signs_from_hex(hx, 128) == a
    # SplitMix64(0)'s first output is 0xE220A8397B1DCDAF (top bit 1), so bit 0 is set. The golden hex lets a
    # decoder in another language check its SplitMix64 against FORMAT.md.
    assert hadamard._splitmix64(0)[1] == 0xE220A8397B1DCDAF and a[0] == 1
    assert hx == GOLDEN_SEED0


def test_signs_fix_common_offset_blocks():
    # A block with a large common offset: without signs H maps it onto one coordinate, which gets clipped.
    from pipeline.quant import QuantParams, dequantize, metrics, quantize

    torch.manual_seed(0)
    w = 5.0 + 0.1 * torch.randn(64, 512)
    errs = {}
    for seed in (None, 0):
        p = QuantParams(sign_seed=seed, scale="l2")
        errs[seed] = metrics.rel_mse(w, dequantize(quantize(w, p), p.sign_bits(), torch.float32))
    assert errs[0] < 0.01 < 0.1 < errs[None]


def test_fwht_is_bit_reproducible_and_exact_on_cpu():
    torch.manual_seed(1)
    x = torch.randn(33, 4, 128)
    assert torch.equal(hadamard.fwht(x), hadamard.fwht(x.clone()))


GOLDEN_SEED0 = "89fa7a730431cc9ee86ec11ab6055e36"


def test_fwht_scratch_gives_the_same_bits():
    """scratch=True only saves a copy: the same result bit for bit, computed in the caller's buffer."""
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    work = x.clone()
    assert torch.equal(hadamard.fwht(work, scratch=True), hadamard.fwht(x))
    assert torch.equal(hadamard.fwht(x.to(torch.bfloat16), scratch=True), hadamard.fwht(x.to(torch.bfloat16)))
