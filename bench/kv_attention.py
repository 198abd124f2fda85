"""One decode token's attention for one of Gemma-4-31B's global layers (4 KV heads of 512, 32 query heads): the lean
decoder's BF16 cache (gemma4_decode.grouped_attention: the compiled torch reduction, and kv_attention's dense kernel)
against the compressed cache (lean_kv.packed_attention, the Triton kernel over the codes), all compiled as the decode
step compiles them, timed by CUDA-graph replay over enough layer copies that L2 cannot serve them; plus a sliding
layer's full ring (torch reduction vs the dense kernel).

    python -m bench.kv_attention --out bench/results/kv_attention.json      # GPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline.quant import kv as kvq
from pipeline.quant import lloyd_max
from pipeline.runtime import lean_kv
from pipeline.runtime.gemma4_decode import grouped_attention
from pipeline.runtime.kernels import kv_attention
from pipeline.shards import atomic_write_json

HKV, GROUP, D, RING = 4, 8, 512, 192
SLIDING_HKV, SLIDING_GROUP, SLIDING_D, SLIDING_RING = 16, 2, 256, 1024
L2_BYTES = 50e6


def _replay_us(fn: Any, copies: int, reps: int = 20) -> float:
    """Mean µs of fn(i) over copies, one CUDA graph holding every copy's call once, replayed reps times."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * copies)


def _bf16_us(q: torch.Tensor, context: int, max_len: int, dense: str = "0") -> float:
    """grouped_attention over a BF16 store of q's layer shape: dense "0" the compiled torch reduction (reads all
    max_len), "1" kv_attention.dense_partials (reads up to the last attended position)."""
    hkv, d = (HKV, D) if q.shape[-1] == D else (SLIDING_HKV, SLIDING_D)
    keys = [torch.randn(hkv, max_len, d, device=q.device, dtype=torch.bfloat16) for _ in range(4)]  # > 4 x L2 at 4k
    mask = torch.arange(max_len, device=q.device) < context
    kv_attention.DENSE = dense
    torch._dynamo.reset()  # the dispatch is decided when grouped_attention is traced
    attend = torch.compile(grouped_attention, dynamic=False)
    return _replay_us(lambda i: attend(q, keys[i % 4], keys[(i + 1) % 4], mask, 1.0), 4)


def sliding_row() -> dict[str, Any]:
    """A sliding layer's full 1024-slot ring (16 KV heads of 256, 2 query heads each): torch reduction vs kernel."""
    q = torch.randn(SLIDING_HKV * SLIDING_GROUP, SLIDING_D, device="cuda", dtype=torch.bfloat16)
    row: dict[str, Any] = {"layer": "sliding", "ring": SLIDING_RING}
    for name, dense in (("bf16_us", "0"), ("bf16_kernel_us", "1")):
        row[name] = round(_bf16_us(q, SLIDING_RING, SLIDING_RING, dense), 2)
    print(json.dumps(row), flush=True)
    return row


def _packed_us(q: torch.Tensor, context: int, max_len: int, bits: int) -> tuple[float, int]:
    """µs per call and the bytes of one layer's packed store (codes + scales, keys and values)."""
    dev = q.device
    signs = kvq.kv_signs(D, 0, dev)
    cb = lloyd_max.gaussian_codebook(bits, dev)
    pk = kvq.quantize_kv(torch.randn(1, HKV, 512, D, device=dev), bits, signs, "lsq", cb)
    reps = max_len // 512 + 1
    codes = pk.codes.repeat(1, 1, reps, 1)[:, :, :max_len].contiguous()
    scales = pk.scales.repeat(1, 1, reps)[:, :, :max_len].contiguous()
    nbytes = 2 * codes.numel() + 2 * scales.numel() * 2
    copies = min(64, max(2, int(4 * L2_BYTES // nbytes) + 1))
    ring = torch.randn(1, HKV, RING, D, device=dev, dtype=torch.bfloat16)
    rot = lean_kv.rotation_matrix(signs)
    stores = [
        (codes.clone(), scales.clone(), codes.clone(), scales.clone(), ring, ring, rot, cb) for _ in range(copies)
    ]
    live = torch.ones(RING, dtype=torch.bool, device=dev)
    mask = torch.cat([torch.arange(max_len, device=dev) < context, live])
    packed = torch.compile(lean_kv.packed_attention, dynamic=False)
    return _replay_us(lambda i: packed(q, stores[i], bits, mask, 1.0), copies), nbytes


def measure(context: int, bits_list: list[int]) -> dict[str, Any]:
    max_len = context + 256
    q = torch.randn(HKV * GROUP, D, device="cuda", dtype=torch.bfloat16)
    row: dict[str, Any] = {"context": context, "max_len": max_len, "bf16_us": round(_bf16_us(q, context, max_len), 2),
                           "bf16_kernel_us": round(_bf16_us(q, context, max_len, "1"), 2)}  # fmt: skip
    row["bf16_gb_per_s"] = round(2 * HKV * context * D * 2 / row["bf16_us"] / 1e3, 1)
    for bits in bits_list:
        us, nbytes = _packed_us(q, context, max_len, bits)
        row[f"q{bits}_us"] = round(us, 2)
        row[f"q{bits}_vs_bf16"] = round(row["bf16_us"] / us, 3)
        row[f"q{bits}_gb_per_s"] = round(nbytes * context / max_len / us / 1e3, 1)
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--sweep",
        help="kernel launch shapes to compare, e.g. 128/512/16/4,64/2048/16/4 "
        "(split positions / max programs / positions per step / warps); default: the shipped one",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench.kv_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    bits = [int(b) for b in args.bits.split(",")]
    result: dict[str, Any] = {
        "what": "one 31B global layer's decode attention, µs per call (CUDA-graph replay, layer copies cycled)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }  # fmt: skip
    shipped = (kv_attention.SPLIT_POSITIONS, kv_attention.MAX_PROGRAMS, kv_attention.BLOCK_N, kv_attention.WARPS)
    result["launch"] = "/".join(map(str, shipped))
    if not args.sweep:
        result["sliding"] = sliding_row()
        result["rows"] = [measure(int(c), bits) for c in args.contexts.split(",")]
    else:
        result["sweep"] = {}
        for shape in args.sweep.split(","):
            split, programs, block, warps = (int(v) for v in shape.split("/"))
            kv_attention.SPLIT_POSITIONS, kv_attention.MAX_PROGRAMS = split, programs
            kv_attention.BLOCK_N, kv_attention.WARPS = block, warps
            torch._dynamo.reset()  # the splits are read when packed_attention is traced
            result["sweep"][shape] = [sliding_row(), *(measure(int(c), bits) for c in args.contexts.split(","))]
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
