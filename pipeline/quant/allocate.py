"""Bit allocation: per-tensor widths that minimize the predicted output error at a target average bits per weight.

Model: tensor t at b bits adds sensitivity_t x D(b) to the output error, D(b) the Lloyd-Max MSE of N(0,1) at b bits
(HLWQ's relative weight error). Greedy on the convex D: start every free tensor at the lowest width, then keep
raising the one with the largest error drop per stored bit until the next step would pass the budget. Fixed tensors
(manifest overrides) keep their width and count against the budget.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import cache

from pipeline.quant import lloyd_max

WIDTHS = (3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class Candidate:
    name: str
    rows: int
    cols: int
    sensitivity: float  # output error per unit of relative weight MSE (>= 0)
    fixed_bits: int | None = None  # an override: not allocated, but counted
    smoothed: bool = False


@cache
def distortion(bits: int) -> float:
    """D(b): MSE of the converged Lloyd-Max quantizer of N(0,1) at b bits."""
    return lloyd_max.gaussian_mse(lloyd_max.gaussian_levels(bits))


def stored_bits(c: Candidate, bits: int, block_size: int) -> int:
    """What the format stores for the tensor: padded codes, an F16 scale per block, the F32 codebook, the smooth."""
    nb = -(-c.cols // block_size)
    return c.rows * nb * (block_size * bits + 16) + 32 * (1 << bits) + (32 * c.cols if c.smoothed else 0)


def allocate(cands: list[Candidate], target_bpw: float, block_size: int,
             widths: tuple[int, ...] = WIDTHS) -> dict[str, int]:  # fmt: skip
    """name -> bits with sum(stored bits) <= target_bpw x sum(params); ValueError when even the lowest width is over."""
    if not cands:
        return {}
    widths = tuple(sorted(widths))
    params = sum(c.rows * c.cols for c in cands)
    budget = target_bpw * params
    bits = {c.name: c.fixed_bits if c.fixed_bits is not None else widths[0] for c in cands}
    used = sum(stored_bits(c, bits[c.name], block_size) for c in cands)
    if used > budget:
        lowest = used / params
        raise ValueError(f"target_bpw {target_bpw} is below the {lowest:.3f} bits per weight of the lowest widths")
    by_name = {c.name: c for c in cands}

    def step(c: Candidate, b: int) -> tuple[float, int] | None:
        i = widths.index(b)
        if i + 1 == len(widths):
            return None
        cost = stored_bits(c, widths[i + 1], block_size) - stored_bits(c, b, block_size)
        gain = max(c.sensitivity, 0.0) * (distortion(b) - distortion(widths[i + 1]))
        return gain / cost, cost

    heap: list[tuple[float, str]] = []
    for c in cands:
        if c.fixed_bits is None and (s := step(c, bits[c.name])) is not None:
            heapq.heappush(heap, (-s[0], c.name))
    while heap:
        _, name = heapq.heappop(heap)
        c = by_name[name]
        s = step(c, bits[name])
        assert s is not None
        if used + s[1] > budget:
            continue  # this step does not fit; a cheaper tensor's step may
        used += s[1]
        bits[name] = widths[widths.index(bits[name]) + 1]
        if (nxt := step(c, bits[name])) is not None:
            heapq.heappush(heap, (-nxt[0], name))
    return bits


def average_bpw(cands: list[Candidate], bits: dict[str, int], block_size: int) -> float:
    params = sum(c.rows * c.cols for c in cands)
    return sum(stored_bits(c, bits[c.name], block_size) for c in cands) / params if params else math.nan
