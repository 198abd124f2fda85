"""Activation-aware column smoothing (AWQ/SmoothQuant-style equivalent transform), pure math.

A linear y = W x equals (W·diag(s)) (x / s). The codes store W·diag(s), so input channels that carry large
activations (large E[x_i²]) get a larger share of each block's levels; decoding divides column i by s_i again, or a
runtime multiplies the activation by 1/s instead.

    s_i = clamp((E[x_i²] / c_i)^alpha normalized to geometric mean 1, 1/max_ratio, max_ratio)

with c_i the energy of column i summed over every linear that reads the same input (q/k/v; gate/up), so those
linears share one s and it could be folded into the norm that feeds them.
"""

from __future__ import annotations

import torch

# Channels that never saw activation (or have an all-zero column) are floored here instead of producing 0 or inf.
_TINY = 1e-12


def column_energy(weights: list[torch.Tensor]) -> torch.Tensor:
    """c_i = sum over the linears sharing an input of sum_j W_ji² (float32 [C]); every W is [rows, C]."""
    if not weights:
        raise ValueError("column_energy needs at least one weight")
    cols = weights[0].shape[-1]
    out = torch.zeros(cols, dtype=torch.float32, device=weights[0].device)
    for w in weights:
        if w.dim() != 2 or w.shape[1] != cols:
            raise ValueError(f"weights sharing an input must all be [rows, {cols}], got {tuple(w.shape)}")
        out += w.float().pow(2).sum(0)
    return out


def smoothing_vector(act_sq: torch.Tensor, col_sq: torch.Tensor, alpha: float, max_ratio: float) -> torch.Tensor:
    """Per-input-channel multipliers s (float32 [C]), geometric mean 1, each in [1/max_ratio, max_ratio]."""
    if act_sq.shape != col_sq.shape or act_sq.dim() != 1:
        raise ValueError(f"act_sq and col_sq must be one 1-D shape, got {tuple(act_sq.shape)}, {tuple(col_sq.shape)}")
    if not 0.0 <= alpha <= 1.0 or max_ratio < 1.0:
        raise ValueError(f"need 0 <= alpha <= 1 and max_ratio >= 1, got {alpha}, {max_ratio}")
    log_s = alpha * (act_sq.double().clamp_min(_TINY).log() - col_sq.double().clamp_min(_TINY).log())
    log_s -= log_s.mean()  # geometric mean 1: the overall scale stays with the block scales, not with s
    bound = float(torch.tensor(max_ratio, dtype=torch.float64).log())
    return log_s.clamp(-bound, bound).exp().float()


def apply(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W·diag(s): column i of a [rows, C] weight times s_i (in float32)."""
    _check(w, s)
    return w.float() * s.float()


def unapply(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The inverse of apply: column i divided by s_i (in float32)."""
    _check(w, s)
    return w.float() / s.float()


def _check(w: torch.Tensor, s: torch.Tensor) -> None:
    if w.dim() != 2 or s.dim() != 1 or w.shape[1] != s.shape[0]:
        raise ValueError(f"smoothing needs a [rows, C] weight and a [C] vector, got {tuple(w.shape)}, {tuple(s.shape)}")
