import numpy as np
import pytest
import torch

from pipeline.quant import lloyd_max

# technique.md's table, computed independently (MSE on N(0,1); positive half of the codebook).
TABLE = {
    2: (0.1174818, [0.4528, 1.5104]),
    3: (0.0345478, [0.2451, 0.7560, 1.3439, 2.1519]),
    4: (0.0095010, None),
    5: (0.0025047, [0.0659, 0.1981, 0.3314, 0.4667, 0.6049, 0.7471, 0.8946, 1.0488, 1.2118, 1.3863, 1.5762,
                    1.7872, 2.0287, 2.3177, 2.6911, 3.2607]),
    6: (0.0006442, None),
}  # fmt: skip
REFERENCE_5BIT_POS = [0.0880, 0.2641, 0.4404, 0.6173, 0.7951, 0.9741, 1.1550, 1.3387, 1.5266, 1.7207, 1.9241,
                      2.1420, 2.3829, 2.6629, 3.0169, 3.5516]  # fmt: skip


@pytest.mark.parametrize("bits", sorted(TABLE))
def test_gaussian_codebook_matches_table(bits):
    mse, pos = TABLE[bits]
    levels = lloyd_max.gaussian_levels(bits)
    assert len(levels) == 2**bits and list(levels) == sorted(levels)
    assert lloyd_max.gaussian_mse(levels) == pytest.approx(mse, abs=1e-6)
    if pos:
        assert np.allclose(levels[2 ** (bits - 1) :], pos, atol=6e-5)
    assert np.allclose(levels, [-v for v in levels[::-1]])


def test_7_and_8_bits_converge_and_keep_improving():
    m7, m8 = (lloyd_max.gaussian_mse(lloyd_max.gaussian_levels(b)) for b in (7, 8))
    assert m8 < m7 < TABLE[6][0]
    # Panter-Dite high-resolution limit: D ~ (sqrt(3) pi / 2) * 4^-b; within a few % at 8 bits.
    assert m8 == pytest.approx(np.sqrt(3) * np.pi / 2 * 4.0**-8, rel=0.05)


def test_reference_shipped_codebook_is_worse():
    ref = np.concatenate([-np.array(REFERENCE_5BIT_POS[::-1]), REFERENCE_5BIT_POS])
    assert lloyd_max.gaussian_mse(ref) == pytest.approx(0.00292, abs=2e-5)
    assert lloyd_max.gaussian_mse(lloyd_max.gaussian_levels(5)) < 0.87 * lloyd_max.gaussian_mse(ref)


def test_empirical_mse_matches_expected():
    torch.manual_seed(0)
    x = torch.randn(2_000_000)
    assert lloyd_max.codebook_mse(x, lloyd_max.gaussian_codebook(5)) == pytest.approx(0.0025047, rel=0.02)


def test_assign_is_nearest_level():
    cb = lloyd_max.gaussian_codebook(3)
    x = torch.linspace(-4, 4, 1001)
    codes = lloyd_max.assign(x, cb)
    brute = (x[:, None] - cb[None, :]).abs().argmin(dim=1)
    assert torch.equal(codes.long(), brute)


def test_fitted_codebook_never_worse_and_helps_heavy_tails():
    torch.manual_seed(0)
    gauss = lloyd_max.gaussian_codebook(5)
    t4 = torch.distributions.StudentT(4.0).sample((200_000,))
    t4 = t4 / t4.std()
    fitted = lloyd_max.fit_codebook(t4, gauss)
    assert lloyd_max.codebook_mse(t4, fitted) < 0.95 * lloyd_max.codebook_mse(t4, gauss)
    g = torch.randn(200_000)
    fitted_g = lloyd_max.fit_codebook(g, gauss)
    assert lloyd_max.codebook_mse(g, fitted_g) <= lloyd_max.codebook_mse(g, gauss)
