"""Native GPU kernels for HLWQ artifacts: y = W·x computed in the rotated basis straight from the packed codes.

4- and 5-bit weights (symmetric codebooks; all that `hlwq convert` writes) are repacked at load into the tiled layout
of layout.py. Decode (≤ 8 tokens): rotate x once into fp16 pairs (a power-of-two scale per block keeps fp16 in range),
then one tensor-core matvec (gemv_tc) that looks up two weights per shared-memory load and applies each block's
scales once (on Hopper, large weights at one token stream through TMA instead, rotating their input themselves:
tc_choose, gemv_tc_rot). Other widths keep FORMAT
v1's codes and a CUDA-core matvec (≤ 4 tokens, fp32 activations). Longer inputs (prefill): dequantize the weight
into the rotated basis (no inverse transform; fp16 from tiles, bf16 otherwise) and let cuBLAS multiply the rotated
activations on tensor cores.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import RuntimeBackendError
from pipeline.runtime.kernels.layout import unit_bytes

BLOCK = 128
SUPPORTED_BITS = (4, 5, 6)
# Launch shape per batch size (rows per CTA, most warps splitting K), chosen by bench/kernel.py on the H200.
LAUNCH: dict[int, tuple[int, int]] = {1: (8, 8), 2: (8, 8), 3: (8, 4), 4: (8, 4)}
TC_MAX_BATCH = 8  # tokens one gemv_tc launch takes
TC_CHUNKED_BATCH = 32  # up to this many tokens, gemv_tc launches in slices of TC_MAX_BATCH


# Stream mode's ring shapes (hlwq.cu), prefetch code -> (slots, units per slot): 2-5 the first kernel, 6-8 the
# lean-issue one.
STREAM_RINGS = {2: (3, 1), 3: (4, 1), 4: (3, 2), 5: (6, 1), 6: (2, 1), 7: (3, 1), 8: (4, 1)}
STREAM_PREFETCH = tuple(STREAM_RINGS)
LEAN_RINGS = (6, 7, 8)
STREAM_MIN_WEIGHTS = 1 << 26  # smaller weights (o_proj 5376x8192: 44M) measured faster on the tile kernel
STREAM_MIN_WEIGHTS_ROTATING = 1 << 25  # ... unless stream mode rotates the input itself (gemv_tc_rot)
STREAM_FULL_WEIGHTS = 100_000_000  # from here stream mode runs 32 warps per SM, below 24
# HLWQ_TC_WARPS: "auto" (that rule), or "24" / "32" warps per SM for every stream launch (A/B runs).
TC_WARPS = os.environ.get("HLWQ_TC_WARPS", "auto").strip().lower()
if TC_WARPS not in {"auto", "24", "32"}:
    raise RuntimeBackendError(f"HLWQ_TC_WARPS must be auto, 24 or 32, not {TC_WARPS!r}")
# HLWQ_TC_STREAM: "auto" (tc_choose's rule), "0" never stream mode, "1" always (A/B runs). HLWQ_TC_LEAN: "1" stream
# mode runs the lean-issue kernel, programmatically launched (the default), "0" the first kernel (A/B runs). Read once
# at import, so a compiled graph never sees the environment.
TC_STREAM = os.environ.get("HLWQ_TC_STREAM", "auto").strip().lower()
if TC_STREAM not in {"auto", "0", "1"}:
    raise RuntimeBackendError(f"HLWQ_TC_STREAM must be auto, 0 or 1, not {TC_STREAM!r}")
TC_LEAN = os.environ.get("HLWQ_TC_LEAN", "1").strip()
if TC_LEAN not in {"0", "1"}:
    raise RuntimeBackendError(f"HLWQ_TC_LEAN must be 0 or 1, not {TC_LEAN!r}")
# HLWQ_TC_ROTATE: "1" a one-token stream-mode matvec rotates its own input (gemv_tc_rot, the default), "0" a
# rotate_pairs launch before it (A/B runs). HLWQ_TC_TRIGGER: "1" that matvec lets the kernel after it launch once it
# has read its input, "0" at its end (A/B runs).
TC_ROTATE = os.environ.get("HLWQ_TC_ROTATE", "1").strip()
TC_TRIGGER = os.environ.get("HLWQ_TC_TRIGGER", "1").strip()
# HLWQ_TC_GLU: "1" a rotating down projection also makes its gelu(gate)·up input (tiled_glu_linear, the default),
# "0" an elementwise kernel before it. HLWQ_TC_NORM: "1" a rotating gate/up projection also joins the attention
# output to the residual and makes its pre-norm (tiled_norm2_linear, the default), "0" inductor's kernel does.
TC_GLU = os.environ.get("HLWQ_TC_GLU", "1").strip()
TC_NORM = os.environ.get("HLWQ_TC_NORM", "1").strip()
for _name, _value in (("HLWQ_TC_ROTATE", TC_ROTATE), ("HLWQ_TC_TRIGGER", TC_TRIGGER), ("HLWQ_TC_GLU", TC_GLU),
                      ("HLWQ_TC_NORM", TC_NORM)):  # fmt: skip
    if _value not in {"0", "1"}:
        raise RuntimeBackendError(f"{_name} must be 0 or 1, not {_value!r}")
ROTATING_PREFETCH = 6  # the one ring that leaves shared memory for the rotated input (hlwq_gemv_tc_rot)
# HLWQ_TC_CLUSTER: CTAs of a rotating matvec (not a norm-making one) share its rotation in clusters of N. "auto":
# pairs from CLUSTER_MIN_BLOCKS input blocks, where they measured faster (kernel_cluster_ab.json); "1" none, "2" / "4"
# / "8" every such launch (A/B runs).
CLUSTER_SIZES = (1, 2, 4, 8)
CLUSTER_MIN_BLOCKS = 128
TC_CLUSTER = os.environ.get("HLWQ_TC_CLUSTER", "auto").strip().lower()
if TC_CLUSTER not in {"auto", *(str(c) for c in CLUSTER_SIZES)}:
    raise RuntimeBackendError(f"HLWQ_TC_CLUSTER must be auto or one of {CLUSTER_SIZES}, not {TC_CLUSTER!r}")
# HLWQ_TC_PARTS: a rotating matvec (not a norm-making one) runs the part-major layout (stream_part_warp), where each
# CTA rotates only the blocks its warps read; it takes precedence over a cluster where it applies. "auto": from
# PARTS_MIN_BLOCKS input blocks; "1" every such launch, "0" none (A/B runs).
PARTS_MIN_BLOCKS = 128
TC_PARTS = os.environ.get("HLWQ_TC_PARTS", "auto").strip().lower()
if TC_PARTS not in {"auto", "0", "1"}:
    raise RuntimeBackendError(f"HLWQ_TC_PARTS must be auto, 0 or 1, not {TC_PARTS!r}")


def ab_switches() -> dict[str, str]:
    """The A/B switches set in this process's environment (HLWQ_TC_*, HLWQ_INDUCTOR_PDL, HLWQ_KERNEL_SOURCE), for a
    benchmark's JSON to say which variant it measured."""
    names = ("HLWQ_INDUCTOR_PDL", "HLWQ_KERNEL_SOURCE")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("HLWQ_TC_") or k in names}


def measured_variant() -> dict[str, Any]:
    """What a benchmark's JSON records of the kernels it measured: the library's name (it follows the source) and the
    A/B switches set."""
    from pipeline.runtime.kernels import build

    return {"kernels": build.library_name(), "switches": ab_switches()}


def tc_launch(warps: int = 12, prefetch: int = 1, stream: bool = False, pdl: bool = False,
              trigger: bool = False, cluster: int = 1, parts: bool = False) -> int:  # fmt: skip
    """gemv_tc's launch word: warps per CTA and blocks prefetched per warp of the tile kernel (one CTA per 16-row tile
    at a time), or stream mode (every warp of the grid takes an equal contiguous run of (tile, block) units, fetched
    by TMA into a shared-memory ring of shape `prefetch`). The tile defaults were the fastest of bench/kernel.py's
    sweep on the H200 for 8 of the 10 31B shapes x bits (bench/results/kernel_bf16_operands.json). `pdl`: a
    programmatic launch (the lean-issue stream kernel only), whose prologue and first weight fetches overlap the
    kernel before it (rotate_pairs lets it start once it has read its input). `trigger` (gemv_tc_rot only): the
    matvec lets its own dependents launch once it has read its input. `cluster` (gemv_tc_rot only): CTAs per
    thread-block cluster sharing the rotation (HLWQ_TC_CLUSTER); `parts` (gemv_tc_rot only): the part-major layout
    where it applies (HLWQ_TC_PARTS)."""
    if stream and prefetch not in STREAM_PREFETCH:
        raise ValueError(f"gemv_tc's stream mode takes prefetch in {STREAM_PREFETCH}, not {prefetch}")
    if pdl and not (stream and prefetch in LEAN_RINGS):
        raise ValueError(f"a programmatic launch (pdl) needs stream mode with prefetch in {LEAN_RINGS}")
    if trigger and not (pdl and prefetch == ROTATING_PREFETCH):
        raise ValueError(f"trigger is gemv_tc_rot's: a programmatic stream launch with prefetch {ROTATING_PREFETCH}")
    if cluster not in CLUSTER_SIZES or (cluster > 1 and not (pdl and prefetch == ROTATING_PREFETCH)):
        raise ValueError(f"cluster (one of {CLUSTER_SIZES}) is gemv_tc_rot's: a programmatic stream launch with "
                         f"prefetch {ROTATING_PREFETCH}")  # fmt: skip
    if parts and not (pdl and prefetch == ROTATING_PREFETCH):
        raise ValueError(f"parts is gemv_tc_rot's: a programmatic stream launch with prefetch {ROTATING_PREFETCH}")
    word = warps | prefetch << 8 | int(stream) << 16 | int(pdl) << 17 | int(trigger) << 18
    return word | (cluster if cluster > 1 else 0) << 20 | int(parts) << 24


def tc_fields(launch: int) -> tuple[int, int, bool, bool]:
    """tc_launch's word -> (warps, prefetch, stream, pdl)."""
    return launch & 255, (launch >> 8) & 15, bool((launch >> 16) & 1), bool((launch >> 17) & 1)


def stream_start(warp: int, units: int, warps: int) -> int:
    """Stream mode: warp w's run is units [stream_start(w), stream_start(w + 1)) (the kernel's arithmetic)."""
    return warp * units // warps


def stream_warps(grid_warps: int, units: int) -> int:
    """The warps that take runs: at most one per unit (the rest of the grid idles), so no run is empty."""
    return min(grid_warps, units)


def stream_owner(unit: int, units: int, warps: int) -> int:
    """The warp whose run holds `unit` (the kernel finds a tile's contributors from its first and last unit)."""
    return ((unit + 1) * warps + units - 1) // units - 1


def stream_parts(n_tiles: int, n_blocks: int, grid_warps: int) -> int:
    """The part-major layout's runs per tile for a grid of `grid_warps` warps (hlwq.cu's stream_parts): as many as
    the grid has warps for, 0 where its longest run would be longer than the contiguous layout's."""
    units = n_tiles * n_blocks
    runs, parts = min(grid_warps, units), min(grid_warps // n_tiles, n_blocks)
    return parts if parts >= 1 and -(-n_blocks // parts) <= -(-units // runs) else 0


def stream_part_warp(j: int, n_tiles: int, parts: int) -> int:
    """The run (stream_start's warp index, of W = n_tiles·parts) that the grid's j-th warp takes in the part-major
    layout: tile j mod n_tiles, part j div n_tiles, so a CTA's warps share one or two parts; W: none."""
    return (j % n_tiles) * parts + j // n_tiles if j < n_tiles * parts else n_tiles * parts


def stream_part_blocks(j0: int, j1: int, n_tiles: int, n_blocks: int, parts: int) -> tuple[int, int]:
    """The input blocks [b0, b1) that the grid's warps [j0, j1) read in the part-major layout (what their CTA
    rotates)."""
    return stream_start(j0 // n_tiles, n_blocks, parts), stream_start((j1 - 1) // n_tiles + 1, n_blocks, parts)


def stream_finisher(t: int, n_blocks: int, units: int, warps: int, parts: int = 0) -> int:
    """The warp that adds the parts of shared tile t (hlwq.cu's stream_finisher): its last owner whose run ends inside
    the tile, so that t is that run's last tile and the wait for the other parts sits at the end of the run. In the
    part-major layout (`parts` > 0) every owner's run is inside the tile: owner t mod parts, spread over the grid."""
    if parts:
        return t * parts + t % parts
    last = stream_owner((t + 1) * n_blocks - 1, units, warps)
    return last if stream_start(last + 1, units, warps) <= (t + 1) * n_blocks else last - 1


# The compact gather (hlwq.cu's stream_gather_compact, up to two tokens): a finisher adds at most this many owners'
# parts in one round; past it, and past two tokens, the batched gather runs.
COMPACT_OWNERS = 12


def compact_item(lane: int, r: int) -> tuple[int, int]:
    """The part that `lane` polls in its r-th float4 of the compact gather: (owner index k from the tile's first
    owner, row group g), whose float4 sits at 4·g in that owner's slot."""
    return (lane >> 3) + 4 * r, lane & 7


def compact_source(k: int, lane: int) -> tuple[int, int]:
    """Where `lane` shuffles owner k's float4 from in the compact gather: (source lane, its register r). Lane 4g, which
    stores rows g and g + 8, gets row group g's."""
    return (k & 3) * 8 + (lane >> 2), k >> 2


def stream_smem_bytes(bits: int, warps: int = 32, prefetch: int = 2, n_blocks: int = 0) -> int:
    """Shared memory of one stream-mode CTA (hlwq.cu's StreamSmem): the 64 KB table, then per warp a ring of
    STREAM_RINGS[prefetch] (slots x units) and one mbarrier per slot; with `n_blocks`, gemv_tc_rot's rotated input
    after them (16-byte aligned, 256 bytes of pairs and a 4-byte scale per block)."""
    slots, units = STREAM_RINGS[prefetch]
    base = 256 * 64 * 4 + warps * (slots * units * unit_bytes(bits) + slots * 8)
    return (base + 15) // 16 * 16 + n_blocks * 260 if n_blocks else base


def stream_default(weights: int = 1 << 30) -> int:
    """tc_choose's stream launch for a weight of `weights` entries: the lean-issue kernel with 2 slots, launched
    programmatically, 32 warps from STREAM_FULL_WEIGHTS and 24 below (bench/results/kernel_stream2_pdl.json, with
    the rotation: 16384x5376 25.22 us at 24 warps vs 26.19 at 32; 21504x5376 29.63 at 32 vs 30.74 at 24).
    HLWQ_TC_LEAN=0: the first kernel, 32 warps and 3 slots, as before."""
    if TC_LEAN == "0":
        return tc_launch(32, 2, stream=True)
    warps = int(TC_WARPS) if TC_WARPS != "auto" else 32 if weights >= STREAM_FULL_WEIGHTS else 24
    return tc_launch(warps, 6, stream=True, pdl=True)


def stream_fits(capability: tuple[int, int], smem_optin: int | None, bits: int, n_blocks: int = 0) -> bool:
    """Whether tc_choose's stream launch can run (with `n_blocks`: rotating an input of that many blocks itself): TMA
    (sm_90+) and room for its shared memory. Without the opt-in figure, the data-centre parts known to give a block
    227 KB (sm_90, sm_100)."""
    if capability < (9, 0):
        return False
    warps, prefetch, _, _ = tc_fields(stream_default())
    need = stream_smem_bytes(bits, warps, ROTATING_PREFETCH if n_blocks else prefetch, n_blocks)
    return need <= (smem_optin or (232448 if capability[0] in (9, 10) else 0))


def tc_choose(tokens: int, rows: int, n_blocks: int, stream_ok: bool, rotating: bool = False) -> int:
    """The launch word of one gemv_tc call: stream_default where bench/kernel.py measured it faster on the H200
    (one token, at least STREAM_MIN_WEIGHTS weights: bench/results/kernel_stream2_pdl.json, 5-bit, kernel alone:
    21504x5376 29.15 us vs 34.03 for the tile kernel, 5376x21504 30.80 vs 35.66, 16384x5376 23.97 vs 25.99,
    5376x16384 25.39 vs 28.81; 5376x8192 17.59 vs 17.10, kept on the tile kernel) on a GPU that can run it
    (`stream_ok`, stream_fits); otherwise the tile kernel. `rotating` (the call can use gemv_tc_rot): from
    STREAM_MIN_WEIGHTS_ROTATING (bench/results/kernel_rot.json: 5376x8192 with its rotation 18.18 us in one launch
    against 18.96 for rotate_pairs + the tile kernel)."""
    weights = rows * n_blocks * BLOCK
    least = STREAM_MIN_WEIGHTS_ROTATING if rotating else STREAM_MIN_WEIGHTS
    stream = {"1": True, "0": False}.get(TC_STREAM, tokens == 1 and weights >= least)
    return stream_default(weights) if stream and stream_ok else tc_launch()


def cluster_for(n_blocks: int) -> int:
    """CTAs per cluster of a rotating matvec whose input has `n_blocks` blocks (HLWQ_TC_CLUSTER); 0 blocks: a launch
    that shares no rotation (the norm-making prologue)."""
    if n_blocks <= 0:
        return 1
    if TC_CLUSTER != "auto":
        return int(TC_CLUSTER)
    return 2 if n_blocks >= CLUSTER_MIN_BLOCKS else 1


def parts_for(n_blocks: int) -> bool:
    """Whether a rotating matvec whose input has `n_blocks` blocks asks for the part-major layout (HLWQ_TC_PARTS);
    0 blocks: a launch that rotates all of its input anyway (the norm-making prologue)."""
    if n_blocks <= 0 or TC_PARTS == "0":
        return False
    return TC_PARTS == "1" or n_blocks >= PARTS_MIN_BLOCKS


def rotating_launch(launch: int, n_blocks: int = 0) -> int | None:
    """gemv_tc_rot's word for a one-token tc_choose word: the same stream launch, its dependents triggered early
    (HLWQ_TC_TRIGGER), its CTAs in clusters by cluster_for(n_blocks) or in the part-major layout by
    parts_for(n_blocks); None where it rotates no input itself (not the 2-slot lean-issue kernel, or
    HLWQ_TC_ROTATE=0)."""
    warps, prefetch, stream, pdl = tc_fields(launch)
    if TC_ROTATE == "0" or not (stream and pdl and prefetch == ROTATING_PREFETCH):
        return None
    cluster = cluster_for(n_blocks)
    return tc_launch(warps, prefetch, stream=True, pdl=True, trigger=TC_TRIGGER == "1", cluster=cluster,
                     parts=parts_for(n_blocks))  # fmt: skip


_STREAM_OK: dict[tuple[int, int, int], bool] = {}


def stream_supported(device: torch.device, bits: int, n_blocks: int = 0) -> bool:
    """stream_fits for a CUDA device, cached per (device, bits, n_blocks)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, bits, n_blocks) not in _STREAM_OK:
        props = torch.cuda.get_device_properties(index)
        optin = getattr(props, "shared_memory_per_block_optin", None)
        _STREAM_OK[index, bits, n_blocks] = stream_fits((props.major, props.minor), optin, bits, n_blocks)
    return _STREAM_OK[index, bits, n_blocks]


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


def pow2_scale(v: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The power of two that puts max |v| (over `dim`, or all of v) in (2^13, 2^14]: fp16's range, exact to undo."""
    amax = (v.abs().amax(dim=dim, keepdim=True) if dim is not None else v.abs().amax()).clamp_min(1e-30)
    return torch.exp2(torch.ceil(torch.log2(amax)) - 14)


def split_hi_lo(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 v -> (fp16(v), fp16(v - fp16(v))): together ~22 significant bits where the remainder stays a normal
    fp16 (v scaled near fp16's top first: pow2_scale)."""
    hi = v.to(torch.float16)
    return hi, (v - hi.float()).to(torch.float16)


def split_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 a [n, K] (rows already scaled by pow2_scale) · w [R, K]ᵀ on fp16 tensor cores at ~fp32 accuracy:
    hi·hi + hi·lo + lo·hi (lo·lo is below fp32's rounding), fp32 accumulation (cuBLAS's fp32 GEMM would be a third
    of the speed and TF32 coarser). w is scaled by a power of two first: weights of ~1e-3 would leave their
    remainders in fp16's subnormals (~17 bits in all instead of ~22)."""
    sw = pow2_scale(w)
    ah, al = split_hi_lo(a)
    wh, wl = split_hi_lo(w / sw)
    y = torch.mm(ah, wh.t(), out_dtype=torch.float32)
    y += torch.mm(ah, wl.t(), out_dtype=torch.float32)
    y += torch.mm(al, wh.t(), out_dtype=torch.float32)
    return y * sw


def _rotates(x2: torch.Tensor, bits: int, n_blocks: int) -> bool:
    """Whether one matvec of x2 [tokens, K] can rotate its own input (gemv_tc_rot): one bf16/fp16 token, the lean
    stream kernel on a GPU with room for the rotated input, HLWQ_TC_ROTATE on."""
    return (
        x2.shape[0] == 1 and x2.dtype != torch.float32 and rotating_launch(stream_default()) is not None
        and stream_supported(x2.device, bits) and stream_supported(x2.device, bits, n_blocks)
    )  # fmt: skip


def _rotating_word(rows: int, n_blocks: int, shared: bool = True) -> int | None:
    """The launch word of a one-token matvec that rotates its own input (gemv_tc_rot), None where tc_choose's rule
    keeps this weight off stream mode; the caller has checked _rotates. `shared`: the rotation can be shared, in
    clusters or the part-major layout (not the norm-making prologue's, whose norm needs all of x in every CTA)."""
    return rotating_launch(tc_choose(1, rows, n_blocks, True, True), n_blocks if shared else 0)


def tiled_glu_linear(gu: torch.Tensor, tiles: torch.Tensor, codebook: torch.Tensor, signs: torch.Tensor, bits: int,
                     rows: int, inv_smooth: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """tiled_linear of gelu(gate, tanh) · up for gu [..., 2K] = [gate | up] (a GLU MLP's down projection). Where the
    matvec rotates its own input and streams (one token, HLWQ_TC_GLU on), it makes that product itself, in the same
    launch: the step's elementwise kernel between the two matvecs is gone."""
    from pipeline.runtime.kernels import ops  # noqa: F401  (registers torch.ops.hlwq.*)

    k, n_blocks = tiles.shape[1] * BLOCK, tiles.shape[1]
    gate, up = gu.split(gu.shape[-1] // 2, dim=-1)
    flat = gu.reshape(-1, gu.shape[-1])
    if TC_GLU == "1" and gu.shape[-1] == 2 * k and _rotates(flat, bits, n_blocks):
        launch = _rotating_word(rows, n_blocks)
        if launch is not None:
            y = torch.ops.hlwq.gemv_tc_rot(flat, signs, inv_smooth, tiles, codebook, bits, rows, launch, True)
            return y.reshape(*gu.shape[:-1], rows)  # type: ignore[no-any-return]
    return tiled_linear(F.gelu(gate, approximate="tanh") * up, tiles, codebook, signs, bits, rows, inv_smooth)


def tiled_norm2_linear(x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, eps: float,
                       tiles: torch.Tensor, codebook: torch.Tensor, signs: torch.Tensor, bits: int, rows: int,
                       inv_smooth: torch.Tensor | None = None,
                       scale: torch.Tensor | None = None) -> list[torch.Tensor] | None:  # fmt: skip
    """[W · rms_norm(h2)·w2, h2] with h2 = (h + rms_norm(x)·w1)·scale (float32 gains and scale; no scale: 1), for
    one token, made inside the rotating matvec (gemv_tc_rot_norm2: the residual join and the pre-norm need no kernel
    of their own); None where that launch cannot run (more tokens, float32 activations, other gains, no rotating
    stream launch, a width over 2 blocks per warp, HLWQ_TC_NORM=0)."""
    from pipeline.runtime.kernels import ops  # noqa: F401  (registers torch.ops.hlwq.*)

    n_blocks = tiles.shape[1]
    flat = x.reshape(-1, x.shape[-1])
    if TC_NORM != "1" or x.shape[-1] != n_blocks * BLOCK or not _rotates(flat, bits, n_blocks):
        return None
    if h.dtype != x.dtype or h.numel() != x.numel() or any(
        t is not None and t.dtype != torch.float32 for t in (w1, w2, scale)
    ):  # fmt: skip
        return None
    launch = _rotating_word(rows, n_blocks, shared=False)
    if launch is None or n_blocks > 2 * tc_fields(launch)[0]:
        return None
    y, h2 = torch.ops.hlwq.gemv_tc_rot_norm2(flat, h.reshape(flat.shape), w1, w2, eps, scale, signs, inv_smooth,
                                             tiles, codebook, bits, rows, launch)  # fmt: skip
    return [y.reshape(*x.shape[:-1], rows), h2.reshape(h.shape)]


def tiled_linear(x: torch.Tensor, tiles: torch.Tensor, codebook: torch.Tensor, signs: torch.Tensor, bits: int,
                 rows: int, inv_smooth: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """hlwq_linear for a weight in the tiled layout (layout.py): x [..., in] -> [..., rows] in x's dtype."""
    from pipeline.runtime.kernels import ops  # noqa: F401  (registers torch.ops.hlwq.*)

    lead = x.shape[:-1]
    padded = tiles.shape[1] * BLOCK
    x2, inv_smooth = _rows_padded(x, inv_smooth, padded)
    n_blocks = tiles.shape[1]
    # A float32 input keeps split hi + lo operands (rounded to fp16 alone it cost 0.15 % top-1 against the reference
    # on the bench model): tile kernel or three GEMMs. bf16 and fp16 inputs hold no more than fp16's 11 bits.
    split = x2.dtype == torch.float32
    stream_ok = not split and stream_supported(x.device, bits)
    rotates = _rotates(x2, bits, n_blocks)
    launch = tc_choose(min(x2.shape[0], TC_MAX_BATCH), rows, n_blocks, stream_ok, rotates)
    rot = rotating_launch(launch, n_blocks) if rotates else None
    if rot is not None:
        y = torch.ops.hlwq.gemv_tc_rot(x2, signs, inv_smooth, tiles, codebook, bits, rows, rot)
    elif x2.shape[0] <= TC_CHUNKED_BATCH:
        # Up to 8 tokens per launch; a few launches re-read the weight but still beat dequantize + cuBLAS, whose
        # fixed cost is a whole fp16 copy of it (batch 16: 2 x 44 us against 220 us, bench/results/kernel.json).
        xp, xs = torch.ops.hlwq.rotate_pairs(x2, signs, inv_smooth)
        n = TC_MAX_BATCH
        parts = [
            torch.ops.hlwq.gemv_tc(xp[a : a + n], xs[a : a + n], tiles, codebook, bits, rows, x.dtype, launch)
            for a in range(0, x2.shape[0], n)
        ]
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
    else:
        # fp16 operands, each row of the rotated activation scaled by a power of two into fp16's range, fp32
        # accumulation and output: bf16 here cost ~4e-4 KL against the reference on the bench model.
        xr = torch.ops.hlwq.rotate(x2, signs, inv_smooth)
        scale = pow2_scale(xr, dim=1)
        if split:
            y = split_mm(xr / scale, torch.ops.hlwq.dequant_tiles(tiles, codebook, bits, rows, torch.float32)) * scale
        else:
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
