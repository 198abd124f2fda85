"""GPU checks of the quantization core (run on the GPU machine): CPU and GPU give the same bytes on a real-shaped
decoder layer, and GPU quantize/dequantize throughput beside a device-memory copy bound measured in the same run.
Run: python bench/gpu_core.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quant import LAYER
from pipeline.quant import QuantParams, dequantize, quantize


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    p = QuantParams()
    res: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    # 1. Same bytes: 256 rows of every matrix of the layer (the CPU side is the slow one).
    same = True
    for name, (_, cols) in LAYER.items():
        w = (0.02 * torch.randn(256, cols, generator=gen)).to(torch.bfloat16)
        a, b = quantize(w, p), quantize(w.cuda(), p)
        ok = torch.equal(a.codes, b.codes.cpu()) and torch.equal(a.scales, b.scales.cpu())
        ok = ok and torch.equal(dequantize(a, p.sign_bits()), dequantize(b, p.sign_bits()).cpu())
        print(f"cpu==gpu {name:<10} {ok}")
        same &= ok
    res["cpu_gpu_identical"] = same
    # 2. Throughput on one full layer, on the GPU.
    ws = [(0.02 * torch.randn(r, c, device="cuda")).to(torch.bfloat16) for r, c in LAYER.values()]
    n = sum(w.numel() for w in ws)
    for w in ws[:1]:
        quantize(w, p)  # warm-up
    t_q = _timed(lambda: [quantize(w, p) for w in ws])
    qs = [quantize(w, p) for w in ws]
    t_d = _timed(lambda: [dequantize(q, p.sign_bits()) for q in qs])
    out_bytes = sum(q.codes.numel() + 2 * q.scales.numel() for q in qs)
    big = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(big)
    t_copy = min(_timed(lambda: dst.copy_(big)) for _ in range(3))
    bw = 2 * big.numel() / t_copy
    bound = (2 * n + out_bytes) / bw
    res.update(layer_params=n, quantize_s=t_q, dequantize_s=t_d, copy_gb_s=bw / 1e9, bound_s=bound,
               quantize_fraction_of_bound=bound / t_q, dequantize_fraction_of_bound=bound / t_d)  # fmt: skip
    print(
        f"gpu layer {n / 1e6:.1f} M params: quantize {n / t_q / 1e9:.2f} G params/s ({t_q * 1e3:.0f} ms), "
        f"dequantize {n / t_d / 1e9:.2f} G params/s ({t_d * 1e3:.0f} ms)"
    )
    print(f"gpu copy bandwidth {bw / 1e9:.0f} GB/s; streaming bound {n / bound / 1e9:.1f} G params/s; quantize at "
          f"{bound / t_q:.3f} of it, dequantize at {bound / t_d:.3f}")  # fmt: skip
    print(f"gpu peak memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
