"""The native kernels as torch custom ops (`torch.ops.hlwq.*`), so they run inside torch.compile graphs and CUDA-graph
captures: each op launches on the current stream through the ctypes library and has a fake (shape-only) kernel.

    rotate(x, signs, inv_smooth)         x [..., K] -> float32 [..., K]: per 128-block H·D·(x / s)
    gemv(xr, codes, scales, codebook, …) float32 [n, K] (n <= 4) -> [n, R] in out_dtype, straight from packed codes
    dequant(codes, scales, codebook, …)  -> bfloat16 [R, K], the weight in the rotated basis (for prefill on cuBLAS)
    gather_pinned(table, ids)            rows of an embedding table kept in pinned host memory, graph-capturable
    rotate_pairs(x, signs, inv_smooth)   x [n, K] -> (fp16 [n, K] in gemv_tc's pair order, fp32 block scales); a
                                         float32 x: fp16 [n, 2K], each row's hi then lo plane (~22 bits)
    gemv_tc(xp, xs, tiles, codebook, …)  [n <= 8, K] -> [n, R] on tensor cores from the tiled layout (layout.py),
                                         per 16-row tile or in stream mode (tc_launch) with an in-kernel fix-up
    gemv_tc_rot(x, signs, inv_smooth, …) one token [1, K] -> [1, R]: stream mode rotating its own input (no
                                         rotate_pairs launch); glu: from [gate | up]
    gemv_tc_rot_norm2(x, h, w1, w2, …)   the same from rms_norm(h2)·w2, h2 = (h + rms_norm(x)·w1)·scale, and h2
    dequant_tiles(tiles, codebook, …)    -> float16 (or float32) [R, K] in the rotated basis, from the tiled layout
"""

from __future__ import annotations

import ctypes

import torch
from torch.library import custom_op

from pipeline.errors import RuntimeBackendError
from pipeline.runtime import kernels
from pipeline.runtime.kernels.build import library

BLOCK = 128
MAX_GEMV_BATCH = 4
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeBackendError(f"HLWQ kernel {what} failed with CUDA error {rc}")


@custom_op("hlwq::rotate", mutates_args=())
def rotate(x: torch.Tensor, signs: torch.Tensor, inv_smooth: torch.Tensor | None) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    rc = library().hlwq_rotate(x2.data_ptr(), signs.data_ptr(), _ptr(inv_smooth), out.data_ptr(), x2.numel() // k, k,
                               _DTYPE_CODES[x.dtype], _stream())  # fmt: skip
    _check(rc, "rotate")
    return out


@rotate.register_fake
def _(x: torch.Tensor, signs: torch.Tensor, inv_smooth: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


@custom_op("hlwq::gemv", mutates_args=())
def gemv(xr: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, bits: int,
         out_dtype: torch.dtype, rows_per_warp: int = 8, warps_per_cta: int = 8) -> torch.Tensor:  # fmt: skip
    n, k = xr.shape
    r = codes.shape[0]
    y = torch.empty(n, r, dtype=out_dtype, device=xr.device)
    rc = library().hlwq_gemv(codes.data_ptr(), scales.data_ptr(), codebook.data_ptr(), xr.data_ptr(), y.data_ptr(), n,
                             r, k, bits, rows_per_warp, warps_per_cta, _DTYPE_CODES[out_dtype], _stream())  # fmt: skip
    _check(rc, "gemv")
    return y


@gemv.register_fake
def _(xr: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, bits: int,
      out_dtype: torch.dtype, rows_per_warp: int = 8, warps_per_cta: int = 8) -> torch.Tensor:  # fmt: skip
    return torch.empty(xr.shape[0], codes.shape[0], dtype=out_dtype, device=xr.device)


@custom_op("hlwq::dequant", mutates_args=())
def dequant(codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    r, n_blocks = scales.shape
    w = torch.empty(r, n_blocks * BLOCK, dtype=torch.bfloat16, device=codes.device)
    rc = library().hlwq_dequant(codes.data_ptr(), scales.data_ptr(), codebook.data_ptr(), w.data_ptr(), r,
                                n_blocks * BLOCK, bits, _stream())  # fmt: skip
    _check(rc, "dequant")
    return w


@dequant.register_fake
def _(codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    r, n_blocks = scales.shape
    return torch.empty(r, n_blocks * BLOCK, dtype=torch.bfloat16, device=codes.device)


@custom_op("hlwq::gather_pinned", mutates_args=())
def gather_pinned(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of a pinned host table [V, D] for device ids [n] -> device [n, D]: a kernel reads host memory directly."""
    flat = ids.reshape(-1).contiguous()
    out = torch.empty(flat.numel(), table.shape[1], dtype=table.dtype, device=ids.device)
    row_bytes = table.shape[1] * table.element_size()
    _check(library().hlwq_gather_pinned(table.data_ptr(), flat.data_ptr(), out.data_ptr(), flat.numel(), row_bytes,
                                        _stream()), "gather_pinned")  # fmt: skip
    return out.view(*ids.shape, table.shape[1])


@gather_pinned.register_fake
def _(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.empty(*ids.shape, table.shape[1], dtype=table.dtype, device=ids.device)


def _pair_columns(x: torch.Tensor) -> int:
    """rotate_pairs' fp16 columns per row: a float32 x gets a lo plane beside the hi one."""
    return x.shape[-1] * (2 if x.dtype == torch.float32 else 1)


@custom_op("hlwq::rotate_pairs", mutates_args=())
def rotate_pairs(x: torch.Tensor, signs: torch.Tensor, inv_smooth: torch.Tensor | None) -> list[torch.Tensor]:
    """x [n, K] -> [float16 [n, K] in gemv_tc's pair order, float32 [n, K/128] power-of-two block scales]. A float32
    x keeps ~22 bits: float16 [n, 2K], each row's pairs (hi) then their remainders (lo), for the tile kernel."""
    n, k = x.shape
    x2 = x.contiguous()
    out = torch.empty(n, _pair_columns(x), dtype=torch.float16, device=x.device)
    xs = torch.empty(n, k // BLOCK, dtype=torch.float32, device=x.device)
    rc = library().hlwq_rotate_pairs(x2.data_ptr(), signs.data_ptr(), _ptr(inv_smooth), out.data_ptr(), xs.data_ptr(),
                                     n, k, _DTYPE_CODES[x.dtype], _stream())  # fmt: skip
    _check(rc, "rotate_pairs")
    return [out, xs]


@rotate_pairs.register_fake
def _(x: torch.Tensor, signs: torch.Tensor, inv_smooth: torch.Tensor | None) -> list[torch.Tensor]:
    n, k = x.shape
    return [torch.empty(n, _pair_columns(x), dtype=torch.float16, device=x.device),
            torch.empty(n, k // BLOCK, dtype=torch.float32, device=x.device)]  # fmt: skip


def launch_streamed(launch: int) -> bool:
    """Whether a tc_launch word asks for stream mode (bit 16)."""
    return kernels.tc_fields(launch)[2]


_WARPS: dict[torch.device, int] = {}


def resident_warps(device: torch.device) -> int:
    """The most warps that can be resident on `device` at once: stream mode's scratch holds two parts per warp."""
    if device not in _WARPS:
        p = torch.cuda.get_device_properties(device)
        _WARPS[device] = p.multi_processor_count * p.max_threads_per_multi_processor // 32
    return _WARPS[device]


# Stream mode's scratch (two fp32 partial tiles per resident warp), one per device: a stream kernel touches it only
# after griddepcontrol.wait, so launches on one stream take turns (two launches that may run at the same time on
# different streams must not share it; the runtime issues gemv_tc on one stream at a time); a per-call buffer would go
# back to the allocator while a kernel that lets its dependents start early (gemv_tc_rot) still sums in it. Every word
# starts and ends each launch PART_EMPTY (hlwq.cu: a parked part is there once none of its words is), so a call
# costs no memset launch. Never freed: a captured CUDA graph keeps the pointer it was captured with.
_SCRATCH: dict[torch.device, torch.Tensor] = {}
PART_EMPTY = 0x7FBADBAD


def stream_scratch(device: torch.device) -> torch.Tensor:
    """fp32 [resident warps, 2, 128] of PART_EMPTY on `device` (see _SCRATCH); inside a graph capture without one
    yet, its own."""
    if device not in _SCRATCH:
        ws = torch.empty(resident_warps(device), 2, 128, dtype=torch.float32, device=device)
        ws.view(torch.int32).fill_(PART_EMPTY)
        if torch.cuda.is_current_stream_capturing():
            return ws  # from the graph's pool: not kept past this capture
        _SCRATCH[device] = ws
    return _SCRATCH[device]


def _stream_scratch_for(device: torch.device, bits: int, launch: int, n_blocks: int = 0) -> torch.Tensor:
    """Stream mode's scratch, after checking that the launch can run here (cached per device: no query per call);
    `n_blocks`: the input a rotating launch holds."""
    warps, prefetch, _, _ = kernels.tc_fields(launch)
    if prefetch not in kernels.STREAM_RINGS:
        raise RuntimeBackendError(f"gemv_tc's launch word {launch:#x} has no stream ring for prefetch {prefetch}")
    if not kernels.stream_supported(device, bits, n_blocks):
        need = kernels.stream_smem_bytes(bits, warps, prefetch, n_blocks) / 1024
        raise RuntimeBackendError(f"gemv_tc's stream mode needs sm_90+ (TMA) and {need:.0f} KB of shared memory")
    return stream_scratch(device)


@custom_op("hlwq::gemv_tc", mutates_args=())
def gemv_tc(xp: torch.Tensor, xs: torch.Tensor, tiles: torch.Tensor, codebook: torch.Tensor, bits: int, rows: int,
            out_dtype: torch.dtype, launch: int) -> torch.Tensor:  # fmt: skip
    """rotate_pairs output (xp [n <= 8, K], xs) x tiled codes (layout.py) -> [n, rows] on tensor cores; `launch` is
    kernels.tc_launch's word. Stream mode uses the device's scratch (it ends the call as it began it: no argument is
    mutated). A split xp ([n, 2K], a float32 input's) runs on the tile kernel with three products per step, into a
    float32 y."""
    n = xp.shape[0]
    k = tiles.shape[1] * BLOCK
    if xp.shape[1] not in (k, 2 * k) or tuple(xs.shape) != (n, k // BLOCK):
        raise RuntimeBackendError(f"gemv_tc: rotate_pairs output {tuple(xp.shape)} does not fit {k} weight columns")
    y = torch.empty(n, rows, dtype=out_dtype, device=xp.device)
    ws = None
    split = xp.shape[1] == 2 * k
    if split and (launch_streamed(launch) or out_dtype != torch.float32):
        raise RuntimeBackendError("gemv_tc takes a split (float32) activation on the tile kernel into float32")
    launch = launch & ~(1 << 19) | int(split) << 19  # bit 19: the kernel reads a lo plane after each row's hi one
    if launch_streamed(launch):
        ws = _stream_scratch_for(xp.device, bits, launch)
    rc = library().hlwq_gemv_tc(tiles.data_ptr(), codebook.data_ptr(), xp.data_ptr(), xs.data_ptr(), y.data_ptr(),
                                _ptr(ws), n, rows, k, bits, launch, _DTYPE_CODES[out_dtype],
                                _stream())  # fmt: skip
    _check(rc, "gemv_tc")
    return y


@gemv_tc.register_fake
def _(xp: torch.Tensor, xs: torch.Tensor, tiles: torch.Tensor, codebook: torch.Tensor, bits: int, rows: int,
      out_dtype: torch.dtype, launch: int) -> torch.Tensor:  # fmt: skip
    # Only y is visible: stream mode's scratch lives inside the real kernel call.
    return torch.empty(xp.shape[0], rows, dtype=out_dtype, device=xp.device)


def gemv_tc_rot_plan(rows: int, k: int, bits: int, launch: int, dtype: torch.dtype,
                     pre: int = 0) -> tuple[int, int, int]:  # fmt: skip
    """What gemv_tc_rot would launch on the current device for these arguments, without launching: (CTAs, cluster
    size, 1 for none, parts per tile, 0 for the contiguous layout), so that a test or benchmark can tell a clustered or
    part-major launch from its fallback."""
    grid, cluster, parts = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    lib = library()
    if not hasattr(lib, "hlwq_gemv_tc_rot_plan"):
        raise RuntimeBackendError("this kernel library has no hlwq_gemv_tc_rot_plan (an older HLWQ_KERNEL_SOURCE)")
    rc = lib.hlwq_gemv_tc_rot_plan(rows, k, bits, launch, _DTYPE_CODES[dtype], pre, ctypes.byref(grid),
                                   ctypes.byref(cluster), ctypes.byref(parts))  # fmt: skip
    _check(rc, "gemv_tc_rot_plan")
    return grid.value, cluster.value, parts.value


def _rot_launch(x: torch.Tensor, signs: torch.Tensor, inv_smooth: torch.Tensor | None, tiles: torch.Tensor,
                codebook: torch.Tensor, bits: int, rows: int, launch: int, pre: int = 0, width: int = 1,
                norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor | None]
                | None = None) -> torch.Tensor:  # fmt: skip
    """hlwq_gemv_tc_rot for the ops below: x [1, width·K]; `norm` = (h, w1, w2, eps, h_out, scale) for pre 2."""
    if x.dtype == torch.float32:
        raise RuntimeBackendError("gemv_tc_rot takes bf16 or fp16: a float32 input is split (rotate_pairs + gemv_tc)")
    k = tiles.shape[1] * BLOCK
    if tuple(x.shape) != (1, width * k):
        raise RuntimeBackendError(f"gemv_tc_rot takes one token of {width * k} columns, not {tuple(x.shape)}")
    warps, prefetch, stream, _ = kernels.tc_fields(launch)
    if not stream or prefetch != kernels.ROTATING_PREFETCH:
        raise RuntimeBackendError(f"gemv_tc_rot's launch word {launch:#x} is not a 2-slot stream launch")
    if inv_smooth is not None:  # read 16 bytes at a time: contiguous float32, 16-byte aligned
        inv_smooth = inv_smooth.float().contiguous()
        if inv_smooth.data_ptr() % 16:
            inv_smooth = inv_smooth.clone()
    h = w1 = w2 = h_out = scale = None
    eps = 0.0
    if norm is not None:
        h, w1, w2, eps, h_out, scale = norm
        if k // BLOCK > 2 * warps:
            raise RuntimeBackendError(f"gemv_tc_rot_norm2 takes at most {2 * warps} blocks, not {k // BLOCK}")
    x2 = x.contiguous()
    y = torch.empty(1, rows, dtype=x.dtype, device=x.device)
    ws = _stream_scratch_for(x.device, bits, launch, k // BLOCK)
    rc = library().hlwq_gemv_tc_rot(tiles.data_ptr(), codebook.data_ptr(), x2.data_ptr(), signs.data_ptr(),
                                    _ptr(inv_smooth), y.data_ptr(), ws.data_ptr(), rows, k, bits,
                                    launch, _DTYPE_CODES[x.dtype], pre, _ptr(h), _ptr(w1), _ptr(w2), eps, _ptr(h_out),
                                    _ptr(scale), _stream())  # fmt: skip
    _check(rc, "gemv_tc_rot")
    return y


@custom_op("hlwq::gemv_tc_rot", mutates_args=())
def gemv_tc_rot(x: torch.Tensor, signs: torch.Tensor, inv_smooth: torch.Tensor | None, tiles: torch.Tensor,
                codebook: torch.Tensor, bits: int, rows: int, launch: int,
                glu: bool = False) -> torch.Tensor:  # fmt: skip
    """One token x [1, K] (K whole blocks) -> [1, rows] in x's dtype: rotate_pairs then gemv_tc in one stream-mode
    launch (kernels.rotating_launch's word), the rotated input kept in shared memory. Same result, bit for bit. With
    `glu`, x is [1, 2K] = [gate | up] and the input gelu(gate, tanh)·up, made in the same launch (rounded to x's
    dtype once, as the compiled step's fused kernel stores it)."""
    return _rot_launch(x, signs, inv_smooth, tiles, codebook, bits, rows, launch, int(glu), 2 if glu else 1)


@gemv_tc_rot.register_fake
def _(x: torch.Tensor, signs: torch.Tensor, inv_smooth: torch.Tensor | None, tiles: torch.Tensor,
      codebook: torch.Tensor, bits: int, rows: int, launch: int, glu: bool = False) -> torch.Tensor:  # fmt: skip
    return torch.empty(1, rows, dtype=x.dtype, device=x.device)


@custom_op("hlwq::gemv_tc_rot_norm2", mutates_args=())
def gemv_tc_rot_norm2(x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, eps: float,
                      scale: torch.Tensor | None, signs: torch.Tensor, inv_smooth: torch.Tensor | None,
                      tiles: torch.Tensor, codebook: torch.Tensor, bits: int, rows: int,
                      launch: int) -> list[torch.Tensor]:  # fmt: skip
    """One token: h2 = (h + rms_norm(x)·w1)·scale (scale optional), then [W · rms_norm(h2)·w2, h2] (each step rounded
    to x's dtype, as the step's eager ops round them; w1, w2 float32 [K], scale float32 [1]) in one rotating
    stream-mode launch: a residual join and the next projection's pre-norm made inside the matvec that reads them."""
    if h.shape != x.shape or h.dtype != x.dtype or w1.shape != (x.shape[1],) or w2.shape != (x.shape[1],):
        raise RuntimeBackendError(f"gemv_tc_rot_norm2: h {tuple(h.shape)} and gains must match x {tuple(x.shape)}")
    if any(t is not None and t.dtype != torch.float32 for t in (w1, w2, scale)):  # a cast here: a launch per call
        raise RuntimeBackendError("gemv_tc_rot_norm2 takes float32 gains (cast them once, where the layer is planned)")
    if scale is not None and scale.numel() != 1:
        raise RuntimeBackendError(f"gemv_tc_rot_norm2's scale is one number, not {tuple(scale.shape)}")
    h_out = torch.empty_like(x)
    norm = (h.contiguous(), w1.contiguous(), w2.contiguous(), float(eps), h_out,
            None if scale is None else scale.contiguous())  # fmt: skip
    return [_rot_launch(x, signs, inv_smooth, tiles, codebook, bits, rows, launch, 2, 1, norm), h_out]


@gemv_tc_rot_norm2.register_fake
def _(x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, eps: float, scale: torch.Tensor | None,
      signs: torch.Tensor, inv_smooth: torch.Tensor | None, tiles: torch.Tensor, codebook: torch.Tensor, bits: int,
      rows: int, launch: int) -> list[torch.Tensor]:  # fmt: skip
    return [torch.empty(1, rows, dtype=x.dtype, device=x.device), torch.empty_like(x)]


@custom_op("hlwq::dequant_tiles", mutates_args=())
def dequant_tiles(tiles: torch.Tensor, codebook: torch.Tensor, bits: int, rows: int,
                  dtype: torch.dtype = torch.float16) -> torch.Tensor:  # fmt: skip
    """The tiled weight -> float16 (or float32) [rows, K] in the rotated basis (for prefill on cuBLAS)."""
    if dtype not in (torch.float16, torch.float32):
        raise RuntimeBackendError(f"dequant_tiles writes float16 or float32, not {dtype}")
    k = tiles.shape[1] * BLOCK
    w = torch.empty(rows, k, dtype=dtype, device=tiles.device)
    _check(library().hlwq_dequant_tiles(tiles.data_ptr(), codebook.data_ptr(), w.data_ptr(), rows, k, bits,
                                        _DTYPE_CODES[dtype], _stream()), "dequant_tiles")  # fmt: skip
    return w


@dequant_tiles.register_fake
def _(tiles: torch.Tensor, codebook: torch.Tensor, bits: int, rows: int,
      dtype: torch.dtype = torch.float16) -> torch.Tensor:  # fmt: skip
    return torch.empty(rows, tiles.shape[1] * BLOCK, dtype=dtype, device=tiles.device)
