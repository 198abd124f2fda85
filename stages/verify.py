"""Stage verify: decode what quantize wrote, compare it with the source tensor, fail under min_cos_sim.

Passed-through tensors must be bit-identical to the source. The per-shard report feeds hlwq_report.json.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from safetensors import safe_open

from pipeline import format as fmt
from pipeline.context import Context
from pipeline.errors import IntegrityError, VerifyError
from pipeline.manifest import params_hash
from pipeline.quant import dequantize, lloyd_max, metrics
from pipeline.shards import atomic_write_json

NAME = "verify"
log = logging.getLogger(__name__)


def fingerprint(ctx: Context, unit: str) -> dict[str, str]:
    q = ctx.state.read("quantize", unit) or {}
    d = ctx.state.read("download", unit) or {}
    inputs = [m.get("sha256", "") for m in q.get("outputs", {}).values()] + [d.get("info", {}).get("sha256", "")]
    return {"inputs": ":".join(inputs), "params": params_hash(ctx.manifest.verify)}


def tensor_metrics(ref: torch.Tensor, rec: torch.Tensor) -> dict[str, float | None]:
    rows_cos = metrics.cos_sim_rows(ref, rec)
    figures = {
        "cos_sim": metrics.cos_sim(ref, rec),
        "rel_mse": metrics.rel_mse(ref, rec),
        "sqnr_db": metrics.sqnr_db(ref, rec),
        "min_row_cos_sim": float(rows_cos.min()),
    }
    # 10 significant digits: float64 sums differ in the last bits with the thread count, reports should not.
    # A figure with no finite value (the SQNR of an exactly reproduced all-zero weight) is null: JSON has no Infinity.
    return {k: float(f"{v:.10g}") if math.isfinite(v) else None for k, v in figures.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality, for every dtype (torch.equal has no FP8 kernel, and calls -0.0 equal to 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def run(ctx: Context, unit: str) -> dict[str, Any]:
    src = ctx.source_shard(unit)
    reader = fmt.ShardReader(ctx.quantized_shard(unit))
    tensors: dict[str, Any] = {}
    with safe_open(str(src), framework="pt") as f:
        for name in reader.names():
            ref = f.get_tensor(name).to(ctx.device)
            if name in reader.quantized:
                qt = reader.get_quantized(name, ctx.device)
                rec = dequantize(qt, reader.layout.sign_bits())
                bits = qt.bits
                # The shard header is written before quantizing, so only the report can say which codebooks a fit
                # replaced (a fit is kept only when it beats the Gaussian levels on the tensor).
                gauss = lloyd_max.gaussian_codebook(bits, qt.codebook.device)
                kind = "gaussian" if torch.equal(qt.codebook, gauss) else "fitted"
                if qt.smooth is not None:
                    # The codes encode W·diag(s): judge the quantizer in that basis (smoothing deliberately moves
                    # error onto quiet input channels, so plain weight cos-sim drops; it is reported beside).
                    sv = qt.smooth
                    plain = tensor_metrics(ref, rec)["cos_sim"]
                    tensors[name] = {"shape": list(ref.shape), "bits": bits, "codebook": kind,
                                     **tensor_metrics(ref.float() * sv, rec.float() * sv), "smooth": True,
                                     "weight_cos_sim": plain}  # fmt: skip
                else:
                    tensors[name] = {"shape": list(ref.shape), "bits": bits, "codebook": kind,
                                     **tensor_metrics(ref, rec)}  # fmt: skip
            else:
                if not same_bits(ref, reader.get(name, ctx.device)):
                    raise IntegrityError(f"{unit}: kept tensor {name} differs from the source")
                tensors[name] = {"shape": list(ref.shape), "bits": None, "dtype": str(ref.dtype).removeprefix("torch.")}
    report = {"unit": unit, "tensors": tensors}
    path = ctx.report_path(unit)
    atomic_write_json(path, report)
    threshold = ctx.manifest.verify.min_cos_sim
    bad = sorted((t["cos_sim"], n) for n, t in tensors.items() if t["bits"] is not None and t["cos_sim"] < threshold)
    if bad:
        raise VerifyError(f"verify {unit}: {bad[0][1]} has cos-sim {bad[0][0]:.6f} < min_cos_sim {threshold} "
                          f"({len(bad)} tensor(s) under the threshold)")  # fmt: skip
    q = [t["cos_sim"] for t in tensors.values() if t["bits"] is not None]
    log.info("verify %s: %d quantized tensors, min cos-sim %.6f", unit, len(q), min(q) if q else float("nan"))
    if ctx.manifest.source.delete_after_verify and ctx.source.kind == "hub":
        src.unlink(missing_ok=True)  # only shards we downloaded; a user's local folder is never touched
    return {"outputs": {str(path.relative_to(ctx.workdir)): {"size": path.stat().st_size}}, "info": {"tensors": len(q)}}
