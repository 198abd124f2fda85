"""The quality bench's metrics on hand-checkable values: no model download, no network."""

from __future__ import annotations

import math

import pytest
import torch

from bench.metrics_lm import (
    Totals,
    frontier_gap,
    kl_per_position,
    nll_per_position,
    pareto_front,
    top1_matches,
    windows,
)
from bench.peers import rtn_symmetric


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_identical_logits_have_zero_kl_and_full_agreement() -> None:
    x = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    assert torch.all(kl_per_position(x, x.clone()) == 0)
    assert bool(top1_matches(x, x.clone()).all())


def test_two_token_kl_matches_the_closed_form() -> None:
    # KL([.5,.5] || [.25,.75]) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    kl = kl_per_position(_logits([[0.5, 0.5]]), _logits([[0.25, 0.75]]))
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    # KL is not symmetric: the other direction is .25 ln(.5) + .75 ln(1.5)
    back = kl_per_position(_logits([[0.25, 0.75]]), _logits([[0.5, 0.5]]))
    assert back.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-12)


def test_kl_ignores_a_constant_shift_and_survives_zero_reference_probability() -> None:
    ref = torch.tensor([[2.0, 0.0, -1.0]])
    assert kl_per_position(ref, ref + 7.0).item() == pytest.approx(0.0, abs=1e-12)
    # p_ref(token 1) underflows to exactly 0: it must contribute 0, not NaN
    ref0 = torch.tensor([[0.0, -math.inf, 0.0]], dtype=torch.float64)
    q = _logits([[0.25, 0.5, 0.25]])
    assert kl_per_position(ref0, q).item() == pytest.approx(math.log(2), abs=1e-12)


def test_top1_counts_argmax_agreement() -> None:
    ref = torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    got = torch.tensor([[0.0, 2.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert top1_matches(ref, got).tolist() == [True, False, True]


def test_uniform_model_perplexity_is_the_vocabulary_size() -> None:
    vocab = 37
    t = Totals()
    nll = nll_per_position(torch.zeros(10, vocab), torch.arange(10) % vocab)
    t.add(torch.zeros(10), nll, torch.ones(10, dtype=torch.bool))
    assert t.ppl == pytest.approx(vocab, rel=1e-12)


def test_tiny_bigram_model_perplexity_by_hand() -> None:
    # next-token probabilities by current token; text 0 1 0 2 -> predicts 1|0 (.5), 0|1 (.9), 2|0 (.25)
    table = _logits([[0.25, 0.5, 0.25], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    ids = torch.tensor([0, 1, 0, 2])
    nll = nll_per_position(table[ids[:-1]], ids[1:])
    expected = math.exp(-(math.log(0.5) + math.log(0.9) + math.log(0.25)) / 3)
    t = Totals()
    t.add(torch.zeros(3), nll, torch.ones(3, dtype=torch.bool))
    assert t.ppl == pytest.approx(expected, rel=1e-12)


def test_windows_are_token_weighted_not_averaged() -> None:
    # window A: 3 tokens at NLL ln 2; window B: 1 token at NLL ln 8 -> mean NLL 1.5 ln 2 -> PPL 2**1.5
    t = Totals()
    a = nll_per_position(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    b = nll_per_position(torch.zeros(1, 8), torch.zeros(1, dtype=torch.long))
    t.add(torch.tensor([0.3, 0.3, 0.3]), a, torch.tensor([True, True, False]))
    t.add(torch.tensor([0.7]), b, torch.tensor([True]))
    assert t.tokens == 4
    assert t.ppl == pytest.approx(2**1.5, rel=1e-12)  # an average of window PPLs would give (2 + 8) / 2 = 5
    assert t.mean_kl == pytest.approx((0.9 + 0.7) / 4)
    assert t.top1 == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        t.add(torch.zeros(2), torch.zeros(3), torch.ones(2, dtype=torch.bool))


def test_windows_split_and_drop_a_window_that_predicts_nothing() -> None:
    assert windows(1100, 512) == [(0, 512), (512, 1024), (1024, 1100)]
    assert windows(1025, 512) == [(0, 512), (512, 1024)]  # one token left: nothing to predict
    with pytest.raises(ValueError):
        windows(10, 1)


def test_pareto_front_and_frontier_gap() -> None:
    pts = [(4.5, 0.02), (4.25, 0.05), (5.0, 0.01), (4.6, 0.03), (4.25, 0.04)]
    assert pareto_front(pts) == [4, 0, 2]
    ours = [(4.25, 0.04), (5.25, 0.01)]
    assert frontier_gap((4.5, 0.05), ours)["matched"] is True
    g = frontier_gap((4.5, 0.02), ours)
    assert g["matched"] is False
    assert g["kl_ratio"] == pytest.approx(2.0)
    assert g["extra_bpw"] == pytest.approx(0.75)
    assert frontier_gap((4.0, 0.001), ours) == {"matched": False, "kl_ratio": math.inf, "extra_bpw": math.inf}


def test_rtn_symmetric_counts_a_short_last_group_and_hits_its_grid() -> None:
    # 192 columns at group 128: one group of 128 and one of 64, each with its own fp16 scale
    w = torch.zeros(2, 192)
    w[:, :128] = torch.arange(-7, 9).repeat(8)[:128].float().clamp(max=7) * 0.5  # absmax 3.5 -> scale 0.5
    w[:, 128:] = torch.linspace(-1, 1, 64)
    deq, bits = rtn_symmetric(w, 4, 128)
    assert bits == 2 * 192 * 4 + 2 * 2 * 16
    assert torch.equal(deq[:, :128], w[:, :128])  # already on the grid of its group
    assert (deq[:, 128:] - w[:, 128:]).abs().max() <= 0.5 / 7 + 1e-6  # half a step of scale 1/7


def test_function_preserving_permutation_of_a_tiny_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.lm_source import permute_llama

    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so a wrong gain permutation would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
        permuted = permute_llama(sd, cfg.to_dict())
        model.load_state_dict(permuted)
        after = model(input_ids=ids).logits
    assert not torch.equal(permuted["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])
    assert (after - before).abs().max().item() < 1e-5
