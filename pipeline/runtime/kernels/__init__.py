"""Native GPU kernels for HLWQ artifacts: y = W·x computed in the rotated basis straight from the packed codes.

4- and 5-bit weights (symmetric codebooks; all that `hlwq convert` writes) are repacked at load into the tiled layout
of layout.py. Decode (≤ 8 tokens): rotate x once into fp16 pairs (a power-of-two scale per block keeps fp16 in range),
then one tensor-core matvec (gemv_tc) that looks up two weights per shared-memory load and applies each block's
scales once; for weights of few 16-row tiles it can also split K across CTAs (tc_split, HLWQ_TC_SPLIT; off until
measured). Other widths keep FORMAT v1's codes and a CUDA-core matvec (≤ 4 tokens, fp32 activations). Longer inputs
(prefill): dequantize the weight into the rotated basis (no inverse transform; fp16 from tiles, bf16 otherwise) and
let cuBLAS multiply the rotated activations on tensor cores.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import RuntimeBackendError

BLOCK = 128
SUPPORTED_BITS = (4, 5, 6)
# Launch shape per batch size (rows per CTA, most warps splitting K), chosen by bench/kernel.py on the H200.
LAUNCH: dict[int, tuple[int, int]] = {1: (8, 8), 2: (8, 8), 3: (8, 4), 4: (8, 4)}
TC_MAX_BATCH = 8  # tokens one gemv_tc launch takes
TC_CHUNKED_BATCH = 32  # up to this many tokens, gemv_tc launches in slices of TC_MAX_BATCH


TC_MAX_SPLIT = 15  # the launch word's 4 bits
# HLWQ_TC_SPLIT: "1" (default) never splits K; "auto" applies tc_split; 2..15 forces that split (for A/B runs).
# Read once at import, so a compiled graph never sees the environment.
TC_SPLIT_MODE = os.environ.get("HLWQ_TC_SPLIT", "1").strip().lower()
if TC_SPLIT_MODE != "auto" and TC_SPLIT_MODE not in {str(s) for s in range(1, TC_MAX_SPLIT + 1)}:
    raise ValueError(f"HLWQ_TC_SPLIT must be 'auto' or 1..{TC_MAX_SPLIT}, not {TC_SPLIT_MODE!r}")


STREAM_PREFETCH = (2, 3, 4, 5)  # stream mode ring shapes (hlwq.cu: 3x1, 4x1, 3x2, 6x1 slots x units)
# HLWQ_TC_STREAM: "0" (default) or "1", the launch tiled_linear uses (for A/B runs; read once at import).
TC_STREAM = os.environ.get("HLWQ_TC_STREAM", "0").strip()
if TC_STREAM not in {"0", "1"}:
    raise ValueError(f"HLWQ_TC_STREAM must be 0 or 1, not {TC_STREAM!r}")


def tc_launch(warps: int = 12, prefetch: int = 1, split: int = 1, stream: bool = False) -> int:
    """gemv_tc's launch word: warps per CTA, blocks prefetched per warp, K slices per 16-row tile, or stream mode
    (every warp of the grid takes an equal contiguous run of (tile, block) units; `prefetch` units in flight per warp
    through shared memory). The warps/prefetch defaults were the fastest of bench/kernel.py's sweep on the H200 for 8
    of the 10 31B shapes x bits (bench/results/kernel_bf16_operands.json); split 1 leaves the word as it was before
    splits existed."""
    if not 1 <= split <= TC_MAX_SPLIT:
        raise ValueError(f"gemv_tc splits K into 1..{TC_MAX_SPLIT} slices, not {split}")
    if stream and (split > 1 or prefetch not in STREAM_PREFETCH):
        raise ValueError(f"gemv_tc's stream mode takes no K split and prefetch in {STREAM_PREFETCH}")
    return warps | prefetch << 8 | (split if split > 1 else 0) << 12 | int(stream) << 16


def stream_start(warp: int, units: int, warps: int) -> int:
    """Stream mode: warp w's run is units [stream_start(w), stream_start(w + 1)) (the kernel's arithmetic)."""
    return warp * units // warps


def stream_owner(unit: int, units: int, warps: int) -> int:
    """The warp whose run holds `unit` (the kernel finds a tile's contributors from its first and last unit)."""
    return ((unit + 1) * warps + units - 1) // units - 1


def default_launch() -> int:
    """The launch word tiled_linear uses (HLWQ_TC_STREAM picks stream mode)."""
    return tc_launch(24, 2, stream=True) if TC_STREAM == "1" else tc_launch()


def tc_split(n_tiles: int, n_blocks: int, warps: int = 12, sms: int = 132) -> int:
    """K slices per tile for gemv_tc (unmeasured rule; bench/kernel.py times the alternatives). Enough tiles keep
    every SM busy unsplit; otherwise the smallest split giving ~3 (tile, slice) units per SM, as long as a slice
    keeps >= 2 blocks per warp (shorter slices leave the prefetch pipeline mostly filling and draining)."""
    if n_tiles >= 4 * sms:
        return 1
    split = 1
    while n_tiles * split < 3 * sms and split < TC_MAX_SPLIT and n_blocks // (split + 1) >= 2 * warps:
        split += 1
    return split


def tc_slices(n_blocks: int, split: int) -> list[tuple[int, int]]:
    """The kernel's K slices: slice s takes blocks [s*n_blocks//split, (s+1)*n_blocks//split)."""
    return [(s * n_blocks // split, (s + 1) * n_blocks // split) for s in range(split)]


_SMS: dict[int, int] = {}


def _split_for(n_tiles: int, n_blocks: int, device: torch.device) -> int:
    """HLWQ_TC_SPLIT applied to one weight."""
    if TC_SPLIT_MODE == "1":
        return 1
    if TC_SPLIT_MODE != "auto":
        return int(TC_SPLIT_MODE)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return tc_split(n_tiles, n_blocks, sms=_SMS[index])


def check_supported(bits: int, block_size: int) -> None:
    if block_size != BLOCK or bits not in SUPPORTED_BITS:
        raise RuntimeBackendError(
            f"the native runtime runs {SUPPORTED_BITS}-bit codes in {BLOCK}-blocks; this tensor has {bits} bits in "
            f"{block_size}-blocks (use runtime 'reference')"
        )


def _rows_padded(x: torch.Tensor, inv_smooth: torch.Tensor | None,
                 padded: int) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """x [..., k] -> [rows, padded] (zero columns up to whole blocks) and 1/s padded with ones to match."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if padded != k:
        x2 = F.pad(x2, (0, padded - k))
        if inv_smooth is not None:
            inv_smooth = F.pad(inv_smooth, (0, padded - k), value=1.0)
    return x2, inv_smooth


def hlwq_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor,
                signs: torch.Tensor, bits: int, inv_smooth: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x [..., in] -> [..., out] in x's dtype; `inv_smooth` (1/s per input column) is applied before the rotation."""
    from pipeline.runtime.kernels import ops

    lead = x.shape[:-1]
    x2, inv_smooth = _rows_padded(x, inv_smooth, scales.shape[1] * BLOCK)
    xr = torch.ops.hlwq.rotate(x2, signs, inv_smooth)
    if x2.shape[0] <= ops.MAX_GEMV_BATCH:
        rows, wpc = LAUNCH[x2.shape[0]]
        y = torch.ops.hlwq.gemv(xr, codes, scales, codebook, bits, x.dtype, rows, wpc)
    else:
        w = torch.ops.hlwq.dequant(codes, scales, codebook, bits)
        y = (xr.to(torch.bfloat16) @ w.t()).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, codes.shape[0])


def tiled_linear(x: torch.Tensor, tiles: torch.Tensor, codebook: torch.Tensor, signs: torch.Tensor, bits: int,
                 rows: int, inv_smooth: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """hlwq_linear for a weight in the tiled layout (layout.py): x [..., in] -> [..., rows] in x's dtype."""
    from pipeline.runtime.kernels import ops  # noqa: F401  (registers torch.ops.hlwq.*)

    lead = x.shape[:-1]
    padded = tiles.shape[1] * BLOCK
    x2, inv_smooth = _rows_padded(x, inv_smooth, padded)
    if x2.shape[0] <= TC_CHUNKED_BATCH:
        # Up to 8 tokens per launch; a few launches re-read the weight but still beat dequantize + cuBLAS, whose
        # fixed cost is a whole fp16 copy of it (batch 16: 2 x 44 us against 220 us, bench/results/kernel.json).
        xp, xs = torch.ops.hlwq.rotate_pairs(x2, signs, inv_smooth)
        n = TC_MAX_BATCH
        split = _split_for(tiles.shape[0], tiles.shape[1], x.device) if TC_STREAM == "0" else 1
        launch = tc_launch(split=split) if split > 1 else default_launch()
        parts = [
            torch.ops.hlwq.gemv_tc(xp[a : a + n], xs[a : a + n], tiles, codebook, bits, rows, x.dtype, launch)
            for a in range(0, x2.shape[0], n)
        ]
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
    else:
        # fp16 operands, each row of the rotated activation scaled by a power of two into fp16's range, fp32
        # accumulation and output: bf16 here cost ~4e-4 KL against the reference on the bench model.
        xr = torch.ops.hlwq.rotate(x2, signs, inv_smooth)
        scale = torch.exp2(torch.ceil(torch.log2(xr.abs().amax(dim=1, keepdim=True).clamp_min(1e-30))) - 14)
        w = torch.ops.hlwq.dequant_tiles(tiles, codebook, bits, rows)
        y = (torch.mm((xr / scale).to(torch.float16), w.t(), out_dtype=torch.float32) * scale).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, rows)


def inv_smooth(module: Any) -> torch.Tensor | None:
    """1/s of an HLWQLinear with column smoothing (None without), cached on the module for its device."""
    inv = getattr(module, "_hlwq_inv_smooth", None)
    smooth = getattr(module, "smooth", None)
    if smooth is not None and (inv is None or inv.device != smooth.device):
        inv = (1.0 / smooth.float()).contiguous()
        module._hlwq_inv_smooth = inv
    return inv if smooth is not None else None


def native_linear(x: torch.Tensor, module: Any) -> torch.Tensor:
    """HLWQLinear.forward for runtime "native" (buffers per the module contract; 1/smooth cached on the module)."""
    check_supported(module.bits, module.block_size)
    inv = inv_smooth(module)
    if module.tiles is not None:
        return tiled_linear(x, module.tiles, module.codebook, module.signs, module.bits, module.out_features, inv,
                            getattr(module, "bias", None))  # fmt: skip
    return hlwq_linear(x, module.codes, module.scales, module.codebook, module.signs, module.bits, inv,
                       getattr(module, "bias", None))  # fmt: skip
