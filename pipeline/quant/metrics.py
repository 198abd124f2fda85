"""Error metrics between a reference tensor and its reconstruction, per row and per tensor (float64)."""

from __future__ import annotations

import torch


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64) if x.dim() > 1 else x.reshape(1, -1).to(torch.float64)


def cos_sim_rows(ref: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    a, b = _rows(ref), _rows(rec)
    den = a.norm(dim=1) * b.norm(dim=1)
    # Two all-zero rows are identical: call that 1, not 0/0.
    return torch.where(den > 0, (a * b).sum(dim=1) / den.clamp(min=1e-300), (a.norm(dim=1) == b.norm(dim=1)).double())


def rel_mse_rows(ref: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    a, b = _rows(ref), _rows(rec)
    num, den = (a - b).pow(2).sum(dim=1), a.pow(2).sum(dim=1)
    zero_ref = torch.where(num > 0, torch.full_like(num, torch.inf), torch.zeros_like(num))
    return torch.where(den > 0, num / den.clamp(min=1e-300), zero_ref)


def sqnr_db_rows(ref: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    return -10.0 * torch.log10(rel_mse_rows(ref, rec))


def cos_sim(ref: torch.Tensor, rec: torch.Tensor) -> float:
    return float(cos_sim_rows(ref.reshape(1, -1), rec.reshape(1, -1))[0])


def rel_mse(ref: torch.Tensor, rec: torch.Tensor) -> float:
    return float(rel_mse_rows(ref.reshape(1, -1), rec.reshape(1, -1))[0])


def sqnr_db(ref: torch.Tensor, rec: torch.Tensor) -> float:
    return float(sqnr_db_rows(ref.reshape(1, -1), rec.reshape(1, -1))[0])
