"""One decode token's attention over the compressed KV cache's codes (Triton), reading only the filled positions.

The lean decoder's static store holds max_len positions per full-attention layer; packed_len of them are filled. The
kernel splits [0, packed_len) over `splits` programs per KV head (packed_len read on the device, so one captured
graph serves every step) and returns each split's flash-decoding partials in the rotated basis:

    o [Hkv, S, G, d]  Σ_i exp(s_i - m) · f_i · levels(v_i)      s_i = q·levels(k_i) · g_i   (q pre-scaled)
    m [Hkv, S, G]     max_i s_i (-inf for an empty split)       f_i, g_i: the per-vector factors (scale / sqrt d)
    l [Hkv, S, G]     Σ_i exp(s_i - m)

lean_kv.packed_attention merges them with the exact ring and rotates the result back once. Codes are unpacked in
registers with bitpack's plane layout and looked up in a float16 codebook; the query and the probabilities go to the
tensor cores in float16 with float32 accumulation (the BF16 cache's own attention reads bf16 keys and bf16
probabilities). A first version multiplied in float32 FMAs (input_precision "ieee") over fewer, longer splits: at a
32k context it cost 5.7 ms per token more than the BF16 cache (bench/results/kv_cache_lean_kernel_v1.json).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch.library import custom_op

from pipeline.errors import RuntimeBackendError

BLOCK_N = 16  # positions per loop step
SPLIT_POSITIONS = 128  # a split's share of a full store: latency, not bandwidth, bounds one program's loop
MAX_PROGRAMS = 512  # programs per launch (KV heads x splits): ~4 per SM of an H200
MIN_HEAD_DIM = 16  # tl.dot's smallest K
WARPS = 4
# The BF16 cache's decode attention goes through dense_partials for static stores of at least this many positions:
# it reads only up to the last attended one, where the compiled reduction reads all max_len. On every layer it was
# slower at a 4k context (93.81 vs 96.13 tok/s, bench/results/runtime_31b_dense_attention_ab.json: the sliding
# rings, 1024 slots, are short) and faster at 32k (88.27 vs 81.18, two runs); the threshold itself is not measured.
DENSE_MIN_POSITIONS = 16384
# HLWQ_DENSE_ATTENTION: "auto" (the rule above), "1" every layer, "0" none (A/B runs); read once at import.
DENSE = os.environ.get("HLWQ_DENSE_ATTENTION", "auto").strip().lower()
if DENSE not in {"auto", "0", "1"}:
    raise RuntimeBackendError(f"HLWQ_DENSE_ATTENTION must be auto, 0 or 1, not {DENSE!r}")
KV_BITS = (2, 3, 4)


@functools.cache
def _triton() -> Any:
    """The Triton module, or None (CPU-only torch builds have none: the caller keeps its torch path)."""
    try:
        import triton
    except ImportError:
        return None
    return triton


def _head_dim_ok(head_dim: int) -> bool:
    """A power of two (tl.arange) of at least tl.dot's smallest K."""
    return head_dim & (head_dim - 1) == 0 and head_dim >= MIN_HEAD_DIM


def _group_rows(group: int) -> int:
    """Query rows per KV head as the kernels hold them: the group padded to a power of two >= tl.dot's smallest M."""
    return max(16, 1 << (group - 1).bit_length())


def supported(q: torch.Tensor, head_dim: int, bits: int) -> bool:
    """Whether the kernel serves this query: a CUDA tensor, Triton present, a power-of-two head_dim ≥ 16."""
    return q.is_cuda and bits in KV_BITS and _head_dim_ok(head_dim) and _triton() is not None


def splits_for(max_len: int, kv_heads: int) -> int:
    """Splits per KV head: one per SPLIT_POSITIONS of the static store, at most MAX_PROGRAMS in all (a long store's
    splits grow instead); the filled positions are shared out among them on the device."""
    return max(1, min(-(-max_len // SPLIT_POSITIONS), MAX_PROGRAMS // max(1, kv_heads)))


@functools.cache
def _kernel() -> Any:
    """The jitted kernel (Triton imported on first use)."""
    from pipeline.runtime.kernels.kv_attention_triton import split_kernel

    return split_kernel


@functools.cache
def _dense_kernel() -> Any:
    from pipeline.runtime.kernels.kv_attention_triton import dense_split_kernel

    return dense_split_kernel


def dense_supported(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether dense_partials serves this BF16/FP16 cache [..., L, d]: wanted (HLWQ_DENSE_ATTENTION; by default a store
    of >= DENSE_MIN_POSITIONS), CUDA, Triton, a power-of-two head_dim >= 16, keys and values of unit stride along
    head_dim in place, a mask of unit stride."""
    half = keys.dtype in (torch.bfloat16, torch.float16)
    fits = _head_dim_ok(keys.shape[-1]) and keys.stride(-1) == values.stride(-1) == 1 and mask.stride(-1) == 1
    wanted = DENSE == "1" or (DENSE == "auto" and keys.shape[-2] >= DENSE_MIN_POSITIONS)
    return wanted and q.is_cuda and half and fits and _triton() is not None


def _outputs(q: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partials' buffers for q [Hkv, G, d]: o [Hkv, S, G, d], m and l [Hkv, S, G], float32."""
    hkv, g, d = q.shape
    o = torch.empty(hkv, splits, g, d, dtype=torch.float32, device=q.device)
    m = torch.empty(hkv, splits, g, dtype=torch.float32, device=q.device)
    return o, m, torch.empty_like(m)


def merge_partials(o: torch.Tensor, m: torch.Tensor, l_: torch.Tensor,
                   top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The splits' partials on one scale: (Σ_s w_s o_s [Hkv, G, d], Σ_s w_s l_s [Hkv, G]), w_s = exp(m_s - top) for
    top [Hkv, G] >= every m_s (a split that attended nothing, m = -inf, weighs 0). Pure torch: it compiles into the
    decode step around the kernel."""
    w = torch.exp(m - top.unsqueeze(1))
    return (w.unsqueeze(-1) * o).sum(1), (w * l_).sum(1)


@custom_op("hlwq::kv_packed_partials", mutates_args=())
def partials(q: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor,
             v_scales: torch.Tensor, codebook: torch.Tensor, n: torch.Tensor, bits: int,
             splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """q float16 [Hkv, G, d] (rotated, times the attention scaling); codes uint8 [Hkv, L, d*bits/8], scales float16
    [Hkv, L]; codebook float16 [2**bits]; n int64 [1]: positions filled -> (o, m, l) as the module docstring says."""
    hkv, g, d = q.shape
    length = k_codes.shape[1]
    o, m, l_ = _outputs(q, splits)
    _kernel()[(hkv, splits)](
        q.contiguous(), k_codes, k_scales, v_codes, v_scales, codebook, n, o, m, l_, length, d**-0.5,
        G=g, GP=_group_rows(g), D=d, BITS=bits, BN=BLOCK_N, S=splits, num_warps=WARPS,
    )  # fmt: skip
    return o, m, l_


@partials.register_fake
def _(q, k_codes, k_scales, v_codes, v_scales, codebook, n, bits, splits):  # type: ignore[no-untyped-def]
    return _outputs(q, splits)


@custom_op("hlwq::kv_dense_partials", mutates_args=())
def dense_partials(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, n: torch.Tensor,
                   splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """partials over a BF16 cache read in place: q [Hkv, G, d] in the cache dtype (times the scaling), keys/values
    [Hkv, L, d] (unit stride along d), mask [L] bool (attend), n int64 [1]: positions from 0 the splits share (past
    the last attended one nothing is read) -> (o, m, l) as for the codes; m = -inf where a split attends nothing."""
    hkv, g, d = q.shape
    o, m, l_ = _outputs(q, splits)
    _dense_kernel()[(hkv, splits)](
        q.contiguous(), keys, values, mask, n, o, m, l_, keys.stride(0), keys.stride(1), values.stride(0),
        values.stride(1), G=g, GP=_group_rows(g), D=d, BN=BLOCK_N, S=splits, num_warps=WARPS,
    )  # fmt: skip
    return o, m, l_


@dense_partials.register_fake
def _(q, keys, values, mask, n, splits):  # type: ignore[no-untyped-def]
    return _outputs(q, splits)
