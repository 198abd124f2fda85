"""`make bench-quant`: weight-level quality, speed and peak memory of the HLWQ core, one printed line per figure.

Quality is measured side by side on the same tensors; the real-shaped Gemma-4-31B sets keep each matrix's row
length (what the blocks see) and subsample rows so every method runs in seconds on a 2-core CPU.
Run: .venv/bin/python bench/quant.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import asym_minmax_int4, rtn_symmetric
from pipeline.quant import QuantParams, dequantize, hadamard, lloyd_max, metrics, quantize
from pipeline.quant.bitpack import packed_block_bytes
from pipeline.quant.codec import _normalize

REFERENCE_5BIT_POS = [
    0.0880,
    0.2641,
    0.4404,
    0.6173,
    0.7951,
    0.9741,
    1.1550,
    1.3387,
    1.5266,
    1.7207,
    1.9241,
    2.1420,
    2.3829,
    2.6629,
    3.0169,
    3.5516,
]  # fmt: skip  (technique.md: the seed's shipped table)
# One sliding-attention decoder layer of Gemma-4-31B (gemma4-31b.md): 478.7 M params.
LAYER = {"q_proj": (8192, 5376), "k_proj": (4096, 5376), "v_proj": (4096, 5376), "o_proj": (5376, 8192),
         "gate_proj": (21504, 5376), "up_proj": (21504, 5376), "down_proj": (5376, 21504)}  # fmt: skip


def weight_sets(rows: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    t4 = torch.distributions.StudentT(4.0).sample((rows, 4096)) * 0.02
    offs = 0.02 * randn(rows, 4096) + 0.2 * randn(rows, 32).repeat_interleave(128, dim=1)
    sets = {"gaussian": 0.02 * randn(rows, 4096), "student_t4": t4, "offset_blocks": offs}
    for name, (_, cols) in LAYER.items():
        # Synthetic but weight-like: Gaussian with log-normal per-input-channel scales (a few loud channels).
        ch = torch.exp(0.5 * randn(cols))
        sets[f"gemma31b_{name}"] = 0.02 * randn(rows, cols) * ch
    return {k: v.to(torch.bfloat16) for k, v in sets.items()}


def hlwq(**kw: object) -> Callable[[torch.Tensor], torch.Tensor]:
    p = QuantParams(**kw)  # type: ignore[arg-type]

    def run(w: torch.Tensor) -> torch.Tensor:
        return dequantize(quantize(w, p), p.sign_bits(), torch.float32)

    return run


def reference_seed(w: torch.Tensor) -> torch.Tensor:
    """The seed's method: its shipped (unconverged) 5-bit codebook, L2-norm fp16 scale, Hadamard without signs."""
    ones = hadamard.sign_vector(None, 128)
    u, norms = _normalize(hadamard.rotate(w, ones))
    ref = torch.tensor([-v for v in REFERENCE_5BIT_POS[::-1]] + REFERENCE_5BIT_POS)
    levels = lloyd_max.lookup(lloyd_max.assign(u, ref), ref)
    return hadamard.unrotate(levels * (norms.half().float() / math.sqrt(128)).unsqueeze(-1), ones, w.shape[1])


METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hlwq_q5 (default: lsq scale, signs on)": hlwq(),
    "hlwq_q5 l2 scale": hlwq(scale="l2"),
    "hlwq_q5 signs off": hlwq(sign_seed=None),
    "hlwq_q5 fitted codebook": hlwq(fit_codebook=True),
    "seed reference (shipped codebook, no signs, l2)": reference_seed,
    "uniform absmax 5-bit g128": lambda w: rtn_symmetric(w.float(), 5)[0],
    "torchao int4 g128 from bf16": lambda w: asym_minmax_int4(w.float())[0],
    "torchao int4 g128 after hlwq q5": lambda w: asym_minmax_int4(hlwq()(w).to(torch.bfloat16).float())[0],
}


def quality(rows: int) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for set_name, w in weight_sets(rows, gen).items():
        for method, fn in METHODS.items():
            rec = fn(w)
            cos = metrics.cos_sim_rows(w, rec)
            rel = metrics.rel_mse_rows(w, rec)
            row = {"set": set_name, "method": method, "median_cos": float(cos.median()), "min_cos": float(cos.min()),
                   "median_rel_mse": float(rel.median()), "max_rel_mse": float(rel.max())}  # fmt: skip
            out.append(row)
            print(f"quality {set_name:<20} {method:<48} cos median {row['median_cos']:.6f} min {row['min_cos']:.6f}"
                  f"  relMSE median {row['median_rel_mse']:.3e} max {row['max_rel_mse']:.3e}", flush=True)  # fmt: skip
    return out


def _best_of(n: int, fn: Callable[[], object]) -> float:
    best = math.inf
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def speed(scale: float) -> dict[str, float]:
    """Quantize and dequantize one full decoder layer, beside a memory-streaming bound measured in the same run."""
    gen = torch.Generator().manual_seed(1)
    shapes = {k: (max(1, int(r * scale)), c) for k, (r, c) in LAYER.items()}
    n = sum(r * c for r, c in shapes.values())
    p = QuantParams()
    t_q = t_d = 0.0
    out_bytes = 0
    for r, c in shapes.values():
        w = torch.randn(r, c, generator=gen, dtype=torch.bfloat16) * 0.02  # no float32 temp: peak = the quantizer's
        t_q += _best_of(1, lambda w=w: quantize(w, p))
        q = quantize(w, p)
        out_bytes += q.codes.numel() + 2 * q.scales.numel()
        t_d += _best_of(1, lambda q=q: dequantize(q, p.sign_bits()))
    # Streaming bound: bytes that must move (read BF16 in, write packed out) at the bandwidth of a large copy.
    big = torch.empty(256 << 20, dtype=torch.uint8)
    dst = torch.empty_like(big)
    t_copy = _best_of(3, lambda: dst.copy_(big))
    bw = 2 * big.numel() / t_copy  # bytes read + written per second
    bound_q = (2 * n + out_bytes) / bw
    res = {"layer_params": n, "copy_gb_s": bw / 1e9, "quantize_s": t_q, "dequantize_s": t_d, "bound_s": bound_q,
           "quantize_params_per_s": n / t_q, "dequantize_params_per_s": n / t_d, "bound_params_per_s": n / bound_q,
           "quantize_fraction_of_bound": bound_q / t_q, "dequantize_fraction_of_bound": bound_q / t_d}  # fmt: skip
    print(
        f"speed   layer params {n / 1e6:.1f} M, threads {torch.get_num_threads()}, copy bandwidth {bw / 1e9:.2f} GB/s"
    )
    print(f"speed   quantize   {n / t_q / 1e6:8.1f} M params/s ({t_q:.2f} s)")
    print(f"speed   dequantize {n / t_d / 1e6:8.1f} M params/s ({t_d:.2f} s)")
    print(f"speed   streaming bound (read BF16 + write packed) {n / bound_q / 1e6:8.1f} M params/s ({bound_q:.2f} s)")
    print(f"speed   quantize at {bound_q / t_q:.3f} of the bound, dequantize at {bound_q / t_d:.3f} (goal >= 0.333)")
    return res


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _peak_child(scale: float) -> None:
    """Run in a fresh process: quantize the layer tensor by tensor, print the RSS before and the peak during."""
    gen = torch.Generator().manual_seed(2)
    p = QuantParams()
    quantize((0.02 * torch.randn(256, 5376, generator=gen)).to(torch.bfloat16), p)  # warm-up: allocator, codebook
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM so the peak covers the quantization only
    base = _rss("VmRSS")
    largest = 0
    for r, c in LAYER.values():
        r = max(1, int(r * scale))
        w = torch.randn(r, c, generator=gen, dtype=torch.bfloat16) * 0.02  # no float32 temp: peak = the quantizer's
        largest = max(largest, w.numel() * 2)
        q = quantize(w, p)
        del w, q
    print(json.dumps({"baseline": base, "peak": _rss("VmHWM"), "largest_tensor": largest}))


def memory(scale: float) -> dict[str, float]:
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); " \
           f"from bench.quant import _peak_child; _peak_child({scale})"  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    goal = 2 * m["largest_tensor"] + 1e9
    print(
        f"memory  peak RSS while quantizing the layer {m['peak'] / 1e9:.3f} GB (RSS before {m['baseline'] / 1e9:.3f} "
        f"GB, largest tensor {m['largest_tensor'] / 1e9:.3f} GB; goal <= 2 x largest + 1 GB = {goal / 1e9:.3f} GB)"
    )
    print(f"memory  peak above the process baseline {(m['peak'] - m['baseline']) / 1e9:.3f} GB")
    return {**m, "goal": goal}


def summarize(rows: list[dict[str, object]]) -> None:
    """One line per method: the median over all weight sets of the per-set median relMSE."""
    for method in METHODS:
        rels = [float(r["median_rel_mse"]) for r in rows if r["method"] == method]  # type: ignore[arg-type]
        print(f"summary {method:<48} median relMSE over sets {statistics.median(rels):.3e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sets and a quarter layer (a smoke run)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--skip-quality", action="store_true", help="only the speed and memory figures")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"bench-quant: torch {torch.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(f"format: 5-bit codes {packed_block_bytes(5, 128)} B + fp16 scale per 128 weights = 5.125 bits/weight")
    rows = [] if args.skip_quality else quality(64 if args.quick else 512)
    if rows:
        summarize(rows)
    scale = 0.25 if args.quick else 1.0
    res = {"quality": rows, "speed": speed(scale), "memory": memory(scale)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
