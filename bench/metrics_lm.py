"""Output-quality metrics of a language model against a reference: pure functions over logits, no model, no I/O.

KL(P_ref || P) of the next-token distribution is the primary figure; top-1 agreement and perplexity go beside it.
Every figure is token-weighted: windows of unequal length count by how many tokens they predict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def kl_per_position(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) in nats for each position: [N, V] x [N, V] -> [N], computed in float64."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    ref_lp = torch.log_softmax(ref_logits.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    # xlogy-style: positions where p_ref underflows to 0 contribute 0, never 0 * -inf.
    kl = (ref_lp.exp() * (ref_lp - lp)).nan_to_num(nan=0.0).sum(-1)
    return kl.clamp_min(0.0)  # float rounding can leave -1e-17 for identical inputs


def top1_matches(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether the most likely next token is the same as the reference's, per position: [N] bool."""
    return ref_logits.argmax(-1) == logits.argmax(-1)


def nll_per_position(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats) of each target token: logits [N, V], targets [N] -> [N], float64."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return -lp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def windows(n_tokens: int, size: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) windows of `size` tokens; a shorter last window is kept if it predicts anything."""
    if size < 2:
        raise ValueError(f"a window must hold at least 2 tokens, got {size}")
    return [(s, min(s + size, n_tokens)) for s in range(0, n_tokens, size) if min(s + size, n_tokens) - s >= 2]


@dataclass
class Totals:
    """Sums over every predicted token of every window; the means divide by the token count, not the window count."""

    tokens: int = 0
    kl_sum: float = 0.0
    nll_sum: float = 0.0
    top1_sum: int = 0

    def add(self, kl: torch.Tensor, nll: torch.Tensor, top1: torch.Tensor) -> None:
        if not kl.numel() == nll.numel() == top1.numel():
            raise ValueError("kl, nll and top1 must cover the same positions")
        self.tokens += kl.numel()
        self.kl_sum += float(kl.double().sum())
        self.nll_sum += float(nll.double().sum())
        self.top1_sum += int(top1.sum())

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.tokens

    @property
    def top1(self) -> float:
        return self.top1_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x and lower y), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best_y = math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def frontier_gap(peer: tuple[float, float], ours: Sequence[tuple[float, float]]) -> dict[str, float | bool]:
    """How a peer (bpw, kl) stands against our points: matched when one of ours has <= bpw and <= kl.

    Otherwise: kl_ratio = (our best KL at <= the peer's bpw) / peer KL (inf if none of ours is that small), and
    extra_bpw = (our least bpw reaching <= the peer's KL) - peer bpw (inf if none does).
    """
    bpw, kl = peer
    matched = any(b <= bpw and k <= kl for b, k in ours)
    at_bpw = [k for b, k in ours if b <= bpw]
    at_kl = [b for b, k in ours if k <= kl]
    return {
        "matched": matched,
        "kl_ratio": (min(at_bpw) / kl if kl > 0 else math.inf) if at_bpw else math.inf,
        "extra_bpw": (min(at_kl) - bpw) if at_kl else math.inf,
    }
