"""`python -m bench.stream_digest [LABEL]` (GPU): one sha256 over the outputs of a fixed set of stream launches, so
that two kernel libraries (HLWQ_KERNEL_SOURCE) can be compared bit for bit in an A/B call: the rotating matvec on five
31B shapes, part-major and contiguous, plain and GLU inputs, then the stream matvec at 1, 2 and 3 tokens. Session 13's
A/B calls ran this code as .device/bitequal.py; main's digest there was 45208b1955de84f7...
"""

from __future__ import annotations

import hashlib
import sys

SHAPES = [(5376, 21504), (21504, 5376), (5376, 16384), (1000, 1152), (5376, 8192)]


def digest() -> str:
    import torch

    from pipeline.quant.codec import QuantParams, quantize
    from pipeline.quant.hadamard import sign_vector
    from pipeline.runtime.kernels import (
        layout,
        ops,  # noqa: F401  (registers torch.ops.hlwq)
        tc_launch,
    )

    h = hashlib.sha256()
    for rows, cols in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(rows + cols)
        params = QuantParams(bits=5)
        q = quantize(torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16), params)
        signs = sign_vector(params.sign_bits(), params.block_size, "cuda")
        tiles = layout.to_tiles(q.codes, q.scales, 5)
        inv = torch.rand(cols, generator=g, device="cuda") + 0.5
        for parts in (True, False):
            word = tc_launch(32, 6, stream=True, pdl=True, trigger=True, cluster=2, parts=parts)
            for glu in (False, True):
                x = (torch.randn(1, cols * (2 if glu else 1), generator=g, device="cuda") * 3).to(torch.bfloat16)
                y = torch.ops.hlwq.gemv_tc_rot(x, signs, inv, tiles, q.codebook, 5, rows, word, glu)
                h.update(y.float().cpu().numpy().tobytes())
        for n in (1, 2, 3):
            x = torch.randn(n, cols, generator=g, device="cuda").to(torch.bfloat16)
            xp, xs = torch.ops.hlwq.rotate_pairs(x, signs, None)
            launch = tc_launch(32, 6, stream=True)
            y = torch.ops.hlwq.gemv_tc(xp, xs, tiles, q.codebook, 5, rows, torch.float32, launch)
            h.update(y.cpu().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.stream_digest: needs a CUDA GPU")
    print(args[0] if args else "digest", digest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
