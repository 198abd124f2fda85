import torch

from pipeline.runtime.measure import TensorPeak


def test_tensor_peak_counts_live_storages_once():
    """New storages count while alive; views and in-place results add nothing; tensors from before are ignored."""
    before = torch.zeros(1000)
    with TensorPeak() as tp:
        a = torch.ones(1000)  # 4000 B
        view = a[10:20]
        b = a * 2  # 8000 B live
        b.add_(1)
        before.mul_(2)
        del a, b  # the view keeps a's storage
        c = torch.empty(250)  # 5000 B live
    assert tp.peak == 8000
    assert tp.live == 5000
    assert view.shape == (10,) and c.shape == (250,)
