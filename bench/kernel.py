"""Native kernel microbench on one GPU: correctness against the reference dequantization, then batch 1–16 timings
on Gemma-4-31B shapes next to cuBLAS BF16 and torchao INT4, all by CUDA-graph replay with the weights cycled over
enough copies that L2 cannot serve them. 4/5-bit weights run the tensor-core path from the tiled layout (what the
runtime uses for them); the CUDA-core kernel over FORMAT v1 codes is timed beside it at batch 1, and is the path of
6-bit weights.

    python -m bench.kernel --out bench/results/kernel.json [--quick]

Effective bandwidth counts the bytes a kernel must read for its weights (codes + scales, or the BF16 / INT4 tensors).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline.quant import hadamard
from pipeline.quant.codec import QuantParams, dequantize, quantize
from pipeline.runtime import kernels
from pipeline.runtime.kernels import layout
from pipeline.shards import atomic_write_json

SHAPES = {
    "gate_up": (21504, 5376),
    "down": (5376, 21504),
    "q_global": (16384, 5376),
    "o_sliding": (5376, 8192),
    "o_global": (5376, 16384),
}
TC_VARIANTS = [(w, pf) for w in (8, 12, 16) for pf in (1, 2)]
# (warps, ring shape) of gemv_tc's stream mode: 2 the first kernel (3 slots), 6-8 the lean-issue one (2-4 slots)
STREAM_VARIANTS = [(24, 2), (32, 2), (24, 6), (32, 6), (24, 7), (32, 7), (28, 8)]
L2_BYTES = 60 << 20
VARIANTS = [(r, w) for r in (2, 4, 8) for w in (4, 8)]


def graph_time_us(calls: list[Callable[[], Any]], reps: int = 20) -> float:
    """Median time of one call, from CUDA-graph replays of `reps` passes over `calls` (one per weight copy)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in calls:
                f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (reps * len(calls)))
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(4 * L2_BYTES / nbytes))


def quantized(rows: int, cols: int, bits: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)
    params = QuantParams(bits=bits)
    q = quantize(w, params)
    signs = hadamard.sign_vector(params.sign_bits(), params.block_size, device)
    return {"w": w, "q": q, "signs": signs, "sign_bits": params.sign_bits()}


def probe_weights(rows: int, cols: int, bits: int, device: torch.device,
                  copies: int = 4) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """For a one-token probe of a shape (bench.ncu_probe, bench.trace_stream): one random weight quantized once and
    tiled `copies` times (calls cycle over them, so that L2 cannot serve the weight), its codebook and signs, and a
    bf16 input."""
    d = quantized(rows, cols, bits, device, seed=1)
    q = d["q"]
    tiles = [layout.to_tiles(q.codes.clone(), q.scales.clone(), bits) for _ in range(copies)]
    x = torch.randn(1, cols, device=device, dtype=torch.bfloat16)
    return tiles, q.codebook.to(device), d["signs"], x


def _split4(xr: torch.Tensor, c: torch.Tensor, s: torch.Tensor, codebook: torch.Tensor, bits: int, rpw: int,
            wpc: int) -> None:  # fmt: skip
    for i in range(0, xr.shape[0], 4):
        torch.ops.hlwq.gemv(xr[i : i + 4], c, s, codebook, bits, torch.bfloat16, rpw, wpc)


def _dequant_mm(xb: torch.Tensor, c: torch.Tensor, s: torch.Tensor, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    return xb @ torch.ops.hlwq.dequant(c, s, codebook, bits).t()


def check(device: torch.device) -> list[dict[str, Any]]:
    """Relative error of the native linear vs float64 math on the reference dequantization (fresh random inputs)."""
    rows_out = []
    for bits in kernels.SUPPORTED_BITS:
        for rows, cols in [(384, 640), (1000, 576), (4096, 5376)]:
            d = quantized(rows, cols, bits, device, seed=bits * 1000 + rows)
            q = d["q"]
            ref_w = dequantize(q, d["sign_bits"], torch.float64)
            for n in (1, 2, 3, 4, 7, 16):
                x = torch.randn(n, cols, device=device, dtype=torch.bfloat16)
                ref = x.double() @ ref_w.t()
                y = kernels.hlwq_linear(x, q.codes, q.scales, q.codebook.to(device), d["signs"], bits)
                err = float((y.double() - ref).norm() / ref.norm())
                rows_out.append({"bits": bits, "shape": [rows, cols], "batch": n, "rel_err": err, "path": "cuda_core"})
                if layout.tileable(bits, 128, q.codebook):
                    t = layout.to_tiles(q.codes, q.scales, bits)
                    y = kernels.tiled_linear(x, t, q.codebook.to(device), d["signs"], bits, rows)
                    err = float((y.double() - ref).norm() / ref.norm())
                    rows_out.append({"bits": bits, "shape": [rows, cols], "batch": n, "rel_err": err, "path": "tiled"})
    return rows_out


def bench_shape(name: str, rows: int, cols: int, bits: int, device: torch.device, quick: bool) -> dict[str, Any]:
    d = quantized(rows, cols, bits, device, seed=rows + cols + bits)
    q = d["q"]
    qbytes = q.codes.numel() + q.scales.numel() * 2
    n_copies = copies_for(qbytes)
    codes = [q.codes.clone() for _ in range(n_copies)]
    scales = [q.scales.clone() for _ in range(n_copies)]
    codebook = q.codebook.to(device)
    out: dict[str, Any] = {"shape": [rows, cols], "bits": bits, "weight_bytes": qbytes, "copies": n_copies}

    if layout.tileable(bits, 128, q.codebook):
        out.update(bench_tiled(codes, scales, codebook, d["signs"], rows, cols, bits, qbytes, device, quick))
    else:
        out.update(bench_cuda_core(codes, scales, codebook, d["signs"], cols, bits, qbytes, device, quick))
    out["peers"] = peers(d["w"], rows, cols, device)
    us1, bf16 = out["batches"]["1"]["native_us"], out["peers"]["bf16"]["1"]
    out["batch1"] = {"hlwq_us": us1, "hlwq_tb_s": round(qbytes / us1 / 1e6, 3),
                     "bf16_us": bf16["us"], "bf16_tb_s": bf16["tb_s"]}  # fmt: skip
    return out


def bench_tiled(codes: list[torch.Tensor], scales: list[torch.Tensor], codebook: torch.Tensor, signs: torch.Tensor,
                rows: int, cols: int, bits: int, qbytes: int, device: torch.device,
                quick: bool) -> dict[str, Any]:  # fmt: skip
    """The tensor-core path: launch variants at batch 1 and 8 (tile kernel and stream mode; --quick: the tile
    default and stream mode's shapes), then batches 1-8 (gemv_tc as tiled_linear chooses it) and 16 (dequant_tiles +
    cuBLAS); the CUDA-core kernel's batch-1 time beside it."""
    tiles = [layout.to_tiles(c, s, bits) for c, s in zip(codes, scales, strict=True)]
    stream_ok = kernels.stream_supported(device, bits)
    chosen = {str(n): kernels.tc_choose(n, rows, cols // 128, stream_ok) for n in (1, 8)}
    out: dict[str, Any] = {"path": "tiled (tensor cores)", "launch_chosen": chosen}
    launches = {
        f"w{warps}_pf{pf}": kernels.tc_launch(warps, pf) for warps, pf in (TC_VARIANTS if not quick else [(12, 1)])
    }
    if stream_ok:
        launches |= {f"stream_w{w}_pf{pf}": kernels.tc_launch(w, pf, stream=True) for w, pf in STREAM_VARIANTS}
    variants: dict[str, Any] = {}
    for n in (1, 8):  # the kernel alone (the rotation launch is timed below)
        xp, xs = torch.ops.hlwq.rotate_pairs(torch.randn(n, cols, device=device, dtype=torch.bfloat16), signs, None)
        for key, code in launches.items():
            calls = [functools.partial(torch.ops.hlwq.gemv_tc, xp, xs, t, codebook, bits, rows, torch.bfloat16, code)
                     for t in tiles]  # fmt: skip
            us = graph_time_us(calls)
            variants.setdefault(str(n), {})[key] = {
                "us": round(us, 2),
                "tb_s": round(qbytes / us / 1e6, 3),
            }
    out["tc_variants"] = variants
    if stream_ok:
        out["rotate_then_gemv"] = rotate_then_gemv(tiles, codebook, signs, rows, cols, bits, qbytes, device)
    batches: dict[str, Any] = {}
    for n in (1, 2, 4, 8, 16):
        x = torch.randn(n, cols, device=device, dtype=torch.bfloat16)
        calls = [functools.partial(kernels.tiled_linear, x, t, codebook, signs, bits, rows) for t in tiles]
        us = graph_time_us(calls, reps=20 if n <= kernels.TC_MAX_BATCH else 5)
        batches[str(n)] = {"native_us": round(us, 2), "tb_s": round(qbytes / us / 1e6, 3)}
    xr = torch.ops.hlwq.rotate(torch.randn(1, cols, device=device, dtype=torch.bfloat16), signs, None)
    rpw, wpc = kernels.LAUNCH[1]
    calls = [functools.partial(torch.ops.hlwq.gemv, xr, c, s, codebook, bits, torch.bfloat16, rpw, wpc)
             for c, s in zip(codes, scales, strict=True)]  # fmt: skip
    batches["1"]["cuda_core_gemv_us"] = round(graph_time_us(calls), 2)
    out["batches"] = batches
    x1 = torch.randn(1, cols, device=device, dtype=torch.bfloat16)
    out["rotate_pairs_us"] = round(graph_time_us([functools.partial(torch.ops.hlwq.rotate_pairs, x1, signs, None)]), 2)
    return out


def _rotate_gemv(x: torch.Tensor, tiles: torch.Tensor, codebook: torch.Tensor, signs: torch.Tensor, bits: int,
                 rows: int, launch: int) -> torch.Tensor:  # fmt: skip
    xp, xs = torch.ops.hlwq.rotate_pairs(x, signs, None)
    return torch.ops.hlwq.gemv_tc(xp, xs, tiles, codebook, bits, rows, torch.bfloat16, launch)


def rotate_then_gemv(tiles: list[torch.Tensor], codebook: torch.Tensor, signs: torch.Tensor, rows: int, cols: int,
                     bits: int, qbytes: int, device: torch.device) -> dict[str, Any]:  # fmt: skip
    """One token's rotation then the stream-mode matvec, as the runtime runs them: with a programmatic launch the
    matvec's prologue and first weight fetches overlap the rotation (batch 1); `_rot`: one launch that rotates its
    own input (gemv_tc_rot), `_trigger`: which also lets the next launch start once it has read it."""
    x = torch.randn(1, cols, device=device, dtype=torch.bfloat16)
    out: dict[str, Any] = {}
    for key, launch in {
        "stream_w32_pf2": kernels.tc_launch(32, 2, stream=True),
        "stream_w32_pf6": kernels.tc_launch(32, 6, stream=True),
        "stream_w32_pf6_pdl": kernels.tc_launch(32, 6, stream=True, pdl=True),
        "stream_w24_pf6_pdl": kernels.tc_launch(24, 6, stream=True, pdl=True),
    }.items():
        calls = [functools.partial(_rotate_gemv, x, t, codebook, signs, bits, rows, launch) for t in tiles]
        us = graph_time_us(calls)
        out[key] = {"us": round(us, 2), "tb_s": round(qbytes / us / 1e6, 3)}
    if kernels.stream_supported(device, bits, cols // 128):
        for warps in (32, 24):
            for trigger in (False, True):
                launch = kernels.tc_launch(warps, 6, stream=True, pdl=True, trigger=trigger)
                calls = [functools.partial(torch.ops.hlwq.gemv_tc_rot, x, signs, None, t, codebook, bits, rows, launch)
                         for t in tiles]  # fmt: skip
                us = graph_time_us(calls)
                key = f"stream_w{warps}_pf6_pdl_rot" + ("_trigger" if trigger else "")
                out[key] = {"us": round(us, 2), "tb_s": round(qbytes / us / 1e6, 3)}
    return out


def bench_cuda_core(codes: list[torch.Tensor], scales: list[torch.Tensor], codebook: torch.Tensor,
                    signs: torch.Tensor, cols: int, bits: int, qbytes: int, device: torch.device,
                    quick: bool) -> dict[str, Any]:  # fmt: skip
    """The CUDA-core kernel over FORMAT v1 codes (6-bit weights): launch shapes, then batches 1-16."""
    out: dict[str, Any] = {"path": "cuda core (FORMAT v1 codes)"}
    # Launch shapes (rows per CTA, max warps splitting K) swept at batch 1, 2 and 4; the best one times each batch.
    best: dict[int, tuple[int, int]] = {}
    out["gemv_variants"] = {}
    for n in (1, 2, 4):
        xr = torch.ops.hlwq.rotate(torch.randn(n, cols, device=device, dtype=torch.bfloat16), signs, None)
        variants = {}
        for rpw, wpc in VARIANTS if not quick else [kernels.LAUNCH[n]]:
            calls = [
                (
                    lambda c=c, s=s, rpw=rpw, wpc=wpc, xr=xr: torch.ops.hlwq.gemv(
                        xr, c, s, codebook, bits, torch.bfloat16, rpw, wpc
                    )
                )
                for c, s in zip(codes, scales, strict=True)
            ]
            us = graph_time_us(calls)
            variants[f"{rpw}x{wpc}"] = {"us": round(us, 2), "tb_s": round(qbytes / us / 1e6, 3)}
        name_best = min(variants, key=lambda k: variants[k]["us"])
        best[n] = tuple(int(v) for v in name_best.split("x"))  # type: ignore[assignment]
        out["gemv_variants"][str(n)] = variants
    out["best_variant"] = {str(n): "x".join(map(str, v)) for n, v in best.items()}

    batches: dict[str, Any] = {}
    for n in (1, 2, 4, 8, 16):
        x = torch.randn(n, cols, device=device, dtype=torch.bfloat16)
        xr = torch.ops.hlwq.rotate(x, signs, None)
        row: dict[str, Any] = {}
        rpw, wpc = best[min(n, 4) if n != 3 else 4]
        if n <= 4:
            calls = [
                functools.partial(torch.ops.hlwq.gemv, xr, c, s, codebook, bits, torch.bfloat16, rpw, wpc)
                for c, s in zip(codes, scales, strict=True)
            ]
            row["gemv_us"] = round(graph_time_us(calls), 2)
        else:
            calls = [
                functools.partial(_split4, xr, c, s, codebook, bits, rpw, wpc)
                for c, s in zip(codes, scales, strict=True)
            ]
            row["gemv_split4_us"] = round(graph_time_us(calls), 2)
        xb = xr.to(torch.bfloat16)
        calls = [functools.partial(_dequant_mm, xb, c, s, codebook, bits) for c, s in zip(codes, scales, strict=True)]
        row["dequant_cublas_us"] = round(graph_time_us(calls, reps=5), 2)
        row["native_us"] = row.get("gemv_us", row["dequant_cublas_us"])
        batches[str(n)] = row
    out["batches"] = batches
    out["rotate_us"] = round(graph_time_us([functools.partial(torch.ops.hlwq.rotate, x[:1], signs, None)]), 2)
    return out


def peers(wb: torch.Tensor, rows: int, cols: int, device: torch.device) -> dict[str, Any]:
    """The same shape and the same cycling through cuBLAS BF16 and torchao INT4 (tile_packed_to_4d)."""
    nb = copies_for(wb.numel() * 2)
    ws = [wb.clone() for _ in range(nb)]
    out: dict[str, Any] = {}
    for n in (1, 2, 4, 8, 16):
        x = torch.randn(n, cols, device=device, dtype=torch.bfloat16)
        us = graph_time_us([functools.partial(torch.nn.functional.linear, x, w) for w in ws])
        out.setdefault("bf16", {})[str(n)] = {"us": round(us, 2), "tb_s": round(wb.numel() * 2 / us / 1e6, 3)}
    del ws
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        ibytes = rows * cols // 2 + rows * (cols // 128) * 4
        mods = []
        for _ in range(copies_for(ibytes)):
            lin = torch.nn.Linear(cols, rows, bias=False, device=device, dtype=torch.bfloat16)
            lin.weight.data.copy_(wb)
            quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
            mods.append(lin)
        for n in (1, 2, 4, 8, 16):
            x = torch.randn(n, cols, device=device, dtype=torch.bfloat16)
            us = graph_time_us([functools.partial(m, x) for m in mods])
            out.setdefault("torchao_int4", {})[str(n)] = {"us": round(us, 2), "tb_s": round(ibytes / us / 1e6, 3)}
    except Exception as exc:  # torchao missing or unable on this GPU: recorded, not fatal
        out["torchao_int4"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="one launch variant per shape")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--bits", default="4,5,6")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernel needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, **kernels.measured_variant()},
        "method": "CUDA-graph replay, median of 7 replays; weights cycled over copies totalling >= 4x L2",
    }
    checks = check(device)
    result["check_max_rel_err_gemv"] = max(c["rel_err"] for c in checks if c["batch"] <= 4)
    result["check_max_rel_err_tiled_tc"] = max(
        (c["rel_err"] for c in checks if c["path"] == "tiled" and c["batch"] <= kernels.TC_MAX_BATCH), default=None
    )
    result["check_max_rel_err_prefill"] = max(c["rel_err"] for c in checks if c["batch"] > kernels.TC_MAX_BATCH)
    result["checks"] = checks
    print(f"check: gemv max rel err {result['check_max_rel_err_gemv']:.2e}, "
          f"tiled {result['check_max_rel_err_tiled_tc']:.2e}, "
          f"prefill {result['check_max_rel_err_prefill']:.2e}", flush=True)  # fmt: skip
    result["shapes"] = {}
    for bits in (int(b) for b in args.bits.split(",")):
        for name in args.shapes.split(","):
            rows, cols = SHAPES[name]
            r = bench_shape(name, rows, cols, bits, device, args.quick)
            result["shapes"][f"{name}_q{bits}"] = r
            b1 = r["batch1"]
            for n, v in r.get("tc_variants", {}).items():  # every timed launch of this batch, fastest first
                ranked = sorted(v.items(), key=lambda kv: kv[1]["us"])
                print(f"{name:10s} q{bits} batch {n}: " + ", ".join(f"{key} {t['us']:.2f} us" for key, t in ranked),
                      flush=True)  # fmt: skip
            print(f"{name:10s} q{bits} {rows}x{cols}: hlwq {b1['hlwq_us']:7.2f} us {b1['hlwq_tb_s']:.2f} TB/s "
                  f"{r['path']}"
                  f" | bf16 {b1['bf16_us']:7.2f} us {b1['bf16_tb_s']:.2f} TB/s | int4 "
                  f"{r['peers'].get('torchao_int4', {}).get('1', {})} | batches {r['batches']}",
                  flush=True)  # fmt: skip
            if args.out:
                atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
