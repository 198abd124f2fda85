"""`python -m bench.trace_stream [SHAPE]`: a timeline of one-token rotating matvec launches, warp by warp: when each
warp started, and how long its prologue (rotation), its loop and its last flush took, finishers apart. It builds a
copy of the kernel source with trace marks patched in (lane 0 of each warp stores its clocks as it goes; nothing else
changes) and runs it in place of the shipped library, in this process only. Not a timing benchmark: bench.kernel is.

    python -m bench.trace_stream down --out bench/results/trace_down.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

SLOTS = 8  # per warp: start ns, start clock, prologue, loop, end clock, end ns, run, lo | hi << 32


def warp_roles(runs_of: np.ndarray, hi: np.ndarray, n_blocks: int, units: int, runs: int,
               parts: int = 0) -> np.ndarray:  # fmt: skip
    """For each traced warp (its run, the end hi of its units): 0 its last tile is its own, 1 it parks a part there,
    2 it is that tile's finisher (stream_flush's roles, by kernels.stream_finisher's rule; `parts`: the part-major
    layout's own finishers, 0 for the last-owner rule)."""
    from pipeline.runtime import kernels

    roles = np.zeros(len(runs_of), dtype=np.int64)
    for i, (w, b) in enumerate(zip(runs_of.tolist(), hi.tolist(), strict=True)):
        t = (b - 1) // n_blocks
        first = kernels.stream_owner(t * n_blocks, units, runs)
        if first == kernels.stream_owner((t + 1) * n_blocks - 1, units, runs):
            continue
        roles[i] = 2 if w == kernels.stream_finisher(t, n_blocks, units, runs, parts) else 1
    return roles


def _stats(v: np.ndarray) -> dict[str, float]:
    if v.size == 0:
        return {}
    q = np.percentile(v, [0, 50, 90, 100])
    return {"min": round(float(q[0]), 3), "p50": round(float(q[1]), 3), "p90": round(float(q[2]), 3),
            "max": round(float(q[3]), 3)}  # fmt: skip


def timeline(raw: np.ndarray, n_blocks: int, units: int, runs: int, parts: int = 0) -> dict[str, Any]:
    """One launch's trace, [warps of the grid, SLOTS] uint64 as the kernel stored it (rows of warps without a run stay
    0), -> its timeline: the launch's span and start skew (globaltimer, µs), the SM clock's rate that the warps' own
    start/end pairs imply, and per phase (prologue, loop, last flush, whole warp) the spread in µs over the warps,
    for finishers and for the others apart."""
    raw = raw[(raw[:, 0] != 0) & (raw[:, 5] != 0)].astype(np.uint64)
    if raw.size == 0:
        raise ValueError("no warp of the trace ran to its end")
    # Offsets in integers first: globaltimer's ~1.7e18 ns would lose ~200 ns in a float64.
    t0 = raw[:, 0].min()
    start_ns, end_ns = (raw[:, 0] - t0).astype(np.float64), (raw[:, 5] - t0).astype(np.float64)
    clock = (raw[:, 1:5] - raw[:, 1:2]).astype(np.float64)  # start, prologue, loop, end: SM cycles after the start
    hi = (raw[:, 7] >> np.uint64(32)).astype(np.int64)
    runs_of = raw[:, 6].astype(np.int64)
    cycles = clock[:, 3]
    # cycles per ns from the longer half of the warps (globaltimer ticks coarsely: short spans would round badly)
    long_ = cycles >= np.percentile(cycles, 50)
    ghz = float(np.median(cycles[long_] / np.maximum(end_ns[long_] - start_ns[long_], 1.0)))
    roles = warp_roles(runs_of, hi, n_blocks, units, runs, parts)
    phases = {"prologue": clock[:, 1], "loop": clock[:, 2] - clock[:, 1], "flush": clock[:, 3] - clock[:, 2],
              "warp": cycles}  # fmt: skip
    out: dict[str, Any] = {
        "warps": int(raw.shape[0]),
        "span_us": round(float(end_ns.max() / 1e3), 3),
        "start_skew_us": round(float(start_ns.max() / 1e3), 3),
        "sm_clock_ghz": round(ghz, 3),
        "finishers": int((roles == 2).sum()),
        "parkers": int((roles == 1).sum()),
    }
    for name, mask in (("finishers", roles == 2), ("others", roles != 2)):
        out[f"{name}_us"] = {k: _stats(v[mask] / ghz / 1e3) for k, v in phases.items()}
        out[f"{name}_us"]["end_after_first_start"] = _stats(end_ns[mask] / 1e3)
    return out


# The trace, patched into a copy of hlwq.cu (the shipped source, and so the measured library, stays as it is): lane 0
# of each warp of tc_stream2_kernel stores its clocks as it goes: stores rather than registers, so that the traced
# kernel keeps the shipped one's registers.
_PRELUDE = """#include <cuda_runtime.h>
#include <stdint.h>
__device__ unsigned long long* hlwq_trace_buf = nullptr;
__device__ __forceinline__ void trace_mark(int slot, unsigned long long v) {
  if (hlwq_trace_buf && (threadIdx.x & 31) == 0)
    hlwq_trace_buf[((size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * TRACE_SLOTS + slot] = v;
}
__device__ __forceinline__ unsigned long long trace_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
""".replace("TRACE_SLOTS", str(SLOTS))
_EPILOGUE = """
extern "C" int hlwq_trace_buffer(void* buf) {
  unsigned long long* p = (unsigned long long*)buf;
  return (int)cudaMemcpyToSymbol(hlwq_trace_buf, &p, sizeof(p));
}
"""
# (where in tc_stream2_kernel, as a regular expression, what goes there; \\g<0> is the text found): the start, after the
# prologue's barrier, around the last flush (whatever its trailing arguments).
_MARKS = [
    (
        r"  const int count = hi - lo;\n(?=  const uint32_t ring_s)",
        "\\g<0>  trace_mark(0, trace_ns());\n  trace_mark(1, clock64());\n",
    ),
    (r"  __syncthreads\(\);\n(?=  if \(ROT && trigger\) pdl_trigger\(\);)", "\\g<0>  trace_mark(2, clock64());\n"),
    (
        r"  stream_flush<T, true, 4>\(acc, t, w, W, U, n_blocks, ws, y, n, R[^;]*;\n"
        r"(?=  if \(CN > 1\) cluster_wait\(\);)",
        "  trace_mark(3, clock64());\n\\g<0>  trace_mark(4, clock64());\n  trace_mark(5, trace_ns());\n"
        "  trace_mark(6, (unsigned long long)w);\n"
        "  trace_mark(7, (unsigned long long)(unsigned)lo | (unsigned long long)hi << 32);\n",
    ),
]


def traced_text(source: str) -> str:
    """hlwq.cu's text -> the traced copy's; ValueError naming the place that the kernel source no longer has once."""
    for where, mark in _MARKS:
        found = len(re.findall(where, source))
        if found != 1:
            raise ValueError(f"bench.trace_stream: hlwq.cu has {found} places for a trace mark at {where[:40]!r}, "
                             "not 1: update _MARKS")  # fmt: skip
        source = re.sub(where, mark, source)
    return _PRELUDE + source + _EPILOGUE


def traced_source(cache: Path) -> Path:
    """The traced copy of the kernel source that would be built (hlwq.cu, or HLWQ_KERNEL_SOURCE), written atomically
    into the kernel cache under its own hash (so two sources traced in turn keep their copies and libraries)."""
    from pipeline.runtime.kernels import build
    from pipeline.shards import atomic_write_text

    text = traced_text(build.source().read_text())
    path = cache / f"hlwq_trace_{hashlib.sha256(text.encode()).hexdigest()[:12]}.cu"
    if not path.exists():
        atomic_write_text(path, text)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trace_stream", description=__doc__.splitlines()[0])
    ap.add_argument("shape", nargs="?", default="down", help="a bench.kernel shape (down)")
    ap.add_argument("--bits", type=int, default=5, choices=(4, 5))
    ap.add_argument("--launches", type=int, default=3, help="launches traced, weights cycled over 4 copies (3)")
    ap.add_argument("--out", help="write the timelines here (JSON)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.trace_stream: needs a CUDA GPU")
    from pipeline.runtime.kernels import build

    traced = build.source()
    os.environ["HLWQ_KERNEL_SOURCE"] = str(traced_source(build.cache_dir()))
    from bench.kernel import SHAPES, probe_weights
    from pipeline.runtime import kernels
    from pipeline.runtime.kernels import ops
    from pipeline.shards import atomic_write_json

    if args.shape not in SHAPES:
        raise SystemExit(f"bench.trace_stream: unknown shape {args.shape!r} (one of {', '.join(sorted(SHAPES))})")
    rows, cols = SHAPES[args.shape]
    dev = torch.device("cuda")
    tiles, codebook, signs, x = probe_weights(rows, cols, args.bits, dev)
    n_tiles, n_blocks = tiles[0].shape[:2]
    launch = kernels.rotating_launch(kernels.tc_choose(1, rows, n_blocks, True, True), n_blocks)
    if launch is None:
        raise SystemExit("bench.trace_stream: this shape does not run the rotating stream matvec at one token")
    grid, cluster, parts = ops.gemv_tc_rot_plan(rows, cols, args.bits, launch, torch.bfloat16)
    # Which finisher rule the traced source has (an A/B may trace an older one): the part-major layout's own, or the
    # last owner's everywhere.
    spread = "if (parts) return t * parts + t % parts;" in traced.read_text()
    warps = launch & 255
    units = n_tiles * n_blocks
    runs = n_tiles * parts if parts else kernels.stream_warps(grid * warps, units)
    lib = build.library()
    buf = torch.zeros(grid * warps * SLOTS, dtype=torch.int64, device=dev)
    ops._check(lib.hlwq_trace_buffer(buf.data_ptr()), "hlwq_trace_buffer")
    for i in range(8):  # warm-up, traced too (and overwritten)
        kernels.tiled_linear(x, tiles[i % 4], codebook, signs, args.bits, rows)
    results = []
    for i in range(args.launches):
        buf.zero_()
        torch.cuda.synchronize()
        kernels.tiled_linear(x, tiles[(i + 1) % 4], codebook, signs, args.bits, rows)
        torch.cuda.synchronize()
        raw = buf.view(grid * warps, SLOTS).cpu().numpy().view(np.uint64)
        results.append(timeline(raw, int(n_blocks), int(units), int(runs), parts if spread else 0))
    ops._check(lib.hlwq_trace_buffer(None), "hlwq_trace_buffer")
    fig = {"shape": [rows, cols], "bits": args.bits, "grid": grid, "warps": warps, "cluster": cluster,
           "parts": parts, "finishers": "t mod parts" if spread and parts else "last owner", "source": str(traced),
           "kernels": build.library_name(), "launches": results}  # fmt: skip
    for r in results:
        print(
            f"{args.shape} q{args.bits}: span {r['span_us']} us, start skew {r['start_skew_us']} us, "
            f"clock {r['sm_clock_ghz']} GHz; finishers {r['finishers_us']}; others {r['others_us']}"
        )
    if args.out:
        atomic_write_json(Path(args.out), fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
