"""`python -m bench.ncu_probe SHAPE`: one 5-bit linear of a 31B shape, run as the runtime runs it at one token, for a
profiler to attach to (nothing is timed here: the kernel benchmark is bench.kernel).

    ncu --kernel-name regex:tc_stream2 --launch-skip 4 --launch-count 1 --section SpeedOfLight \\
        python -m bench.ncu_probe down
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.kernel import SHAPES, probe_weights
from pipeline.runtime import kernels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ncu_probe", description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES), help="a bench.kernel shape")
    ap.add_argument("--bits", type=int, default=5, choices=(4, 5))
    ap.add_argument("--calls", type=int, default=8, help="calls, cycling over 4 weight copies (8)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.ncu_probe: needs a CUDA GPU")
    rows, cols = SHAPES[args.shape]
    dev = torch.device("cuda")
    tiles, codebook, signs, x = probe_weights(rows, cols, args.bits, dev)
    for i in range(args.calls):
        y = kernels.tiled_linear(x, tiles[i % 4], codebook, signs, args.bits, rows)
    torch.cuda.synchronize()
    print(f"{args.shape} {rows}x{cols} {args.bits}-bit: {args.calls} calls, output {tuple(y.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
