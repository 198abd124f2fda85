import math

import pytest
import torch

from pipeline.quant import metrics


def test_hand_checkable_values():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    rec = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert metrics.cos_sim_rows(ref, rec).tolist() == [1.0, 0.0]
    assert metrics.rel_mse_rows(ref, rec).tolist() == [0.0, 2.0]
    # whole tensor: <ref, rec> = 25, |ref|^2 = 26, |rec|^2 = 26
    assert metrics.cos_sim(ref, rec) == pytest.approx(25 / 26)
    assert metrics.rel_mse(ref, rec) == pytest.approx(2 / 26)
    assert metrics.sqnr_db(ref, rec) == pytest.approx(-10 * math.log10(2 / 26))


def test_zero_rows():
    z = torch.zeros(1, 4)
    assert metrics.cos_sim_rows(z, z).tolist() == [1.0]
    assert metrics.rel_mse_rows(z, z).tolist() == [0.0]
    assert metrics.cos_sim_rows(z, torch.ones(1, 4)).tolist() == [0.0]
