"""Scalar Lloyd-Max codebooks: the MSE-optimal levels for N(0,1), and refits on a tensor's own values."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from scipy.special import ndtr, ndtri

_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)

SUPPORTED_BITS = range(2, 9)


def _interval_mass_and_mean(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(lo < X <= hi) and E[X | lo < X <= hi] for X ~ N(0,1), accurate in both tails."""
    # Differences of survival functions keep precision in the upper tail, of cdfs in the lower tail.
    # (scipy.special.ndtr is scipy.stats.norm.cdf without the distribution-object overhead: Lloyd runs 10^4 steps.)
    mass = np.where(lo >= 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))
    return mass, (_pdf(lo) - _pdf(hi)) / mass


def _pdf(t: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.square(t)) * _INV_SQRT_2PI


@cache
def gaussian_levels(bits: int, tol: float = 1e-13, max_iter: int = 200_000) -> tuple[float, ...]:
    """Converged Lloyd-Max levels for N(0,1), ascending, computed (not tabulated) from the normal cdf."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    k = 1 << bits
    levels = ndtri((np.arange(k) + 0.5) / k)  # quantile start: already close, so few iterations
    for _ in range(max_iter):
        edges = np.concatenate(([-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]))
        _, new = _interval_mass_and_mean(edges[:-1], edges[1:])
        new = (new - new[::-1]) / 2  # the optimum is symmetric; enforce it against rounding drift
        done = np.max(np.abs(new - levels)) < tol
        levels = new
        if done:
            break
    return tuple(float(v) for v in levels)


def gaussian_mse(levels: tuple[float, ...] | np.ndarray) -> float:
    """Expected squared error of nearest-level quantization of N(0,1) with these levels."""
    c = np.asarray(levels, dtype=np.float64)
    edges = np.concatenate(([-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]))
    lo, hi = edges[:-1], edges[1:]
    mass, mean = _interval_mass_and_mean(lo, hi)

    # E[(X-c)^2] over each cell = E[X^2] - 2 c E[X] + c^2 P, with E[X^2 1{cell}] = P + lo*pdf(lo) - hi*pdf(hi).
    def tpdf(t: np.ndarray) -> np.ndarray:
        finite = np.isfinite(t)
        return np.where(finite, np.where(finite, t, 0.0) * _pdf(t), 0.0)

    second = mass + tpdf(lo) - tpdf(hi)
    return float(np.sum(second - 2 * c * mean * mass + c * c * mass))


def gaussian_codebook(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(gaussian_levels(bits), dtype=torch.float32, device=device)


def boundaries(codebook: torch.Tensor) -> torch.Tensor:
    """Decision thresholds: midpoints of neighbouring levels, in float32 so every device agrees."""
    return (codebook[1:] + codebook[:-1]) * 0.5


def assign(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ties go to the lower level), as uint8."""
    return torch.bucketize(values, boundaries(codebook)).to(torch.uint8)


def lookup(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Inverse of assign: codes -> level values (float32)."""
    return codebook[codes.long()]


def codebook_mse(values: torch.Tensor, codebook: torch.Tensor) -> float:
    v = values.reshape(-1).to(torch.float32)
    err = v - lookup(assign(v, codebook), codebook)
    return float(err.double().pow(2).mean())


def fit_codebook(values: torch.Tensor, init: torch.Tensor, iters: int = 30, max_samples: int = 1 << 22) -> torch.Tensor:
    """Lloyd iterations on the tensor's own values, started from `init`; never returns a worse codebook than it.

    A deterministic strided subsample bounds the cost on 100M-element tensors.
    """
    v = values.reshape(-1).to(torch.float32)
    if v.numel() > max_samples:
        v = v[:: -(-v.numel() // max_samples)]
    k = init.numel()
    cb = init.clone()
    for _ in range(iters):
        codes = assign(v, cb).long()
        sums = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, codes, v.double())
        counts = torch.bincount(codes, minlength=k).double()
        # Empty cells keep their level, so the codebook stays sorted and complete.
        new = torch.where(counts > 0, sums / counts.clamp(min=1), cb.double()).to(torch.float32)
        new, _ = torch.sort(new)
        if torch.equal(new, cb):
            break
        cb = new
    full = values.reshape(-1)
    return cb if codebook_mse(full, cb) < codebook_mse(full, init) else init.clone()
