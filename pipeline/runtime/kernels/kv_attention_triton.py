"""The Triton kernel behind kv_attention (imported on first use: CPU-only torch builds have no Triton)."""

import triton
import triton.language as tl


@triton.jit
def plane_codes(row, ok, OFFSET: tl.constexpr, K: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
    """One bit plane of width K at byte OFFSET of the rows at byte pointers row [BN, 1], as codes [BN, D] in code
    order: the plane's D*K/8 bytes load contiguously (no gather), each byte spreads into its 8/K slots, and slot s of
    byte j is code j + s*(D*K/8) (bitpack's layout), which is the row-major order of [slot, byte]."""
    M: tl.constexpr = 8 // K
    P: tl.constexpr = D // M
    b = tl.load(row + OFFSET + tl.arange(0, P)[None, :], mask=ok, other=0).to(tl.int32)  # [BN, P]
    shifts = (tl.arange(0, M) * K)[None, :, None]
    spread = (b[:, None, :] >> shifts) & ((1 << K) - 1)  # [BN, M, P]
    return tl.reshape(spread, [BN, D])


@triton.jit
def codes_of(row, ok, D: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr):
    """Codes [BN, D] of the rows at byte pointers row [BN, 1]: planes low bits first (4 and 2 one plane, 3 = 2 + 1)."""
    if BITS == 4:
        code = plane_codes(row, ok, 0, 4, D, BN)
    elif BITS == 3:
        code = plane_codes(row, ok, 0, 2, D, BN) | (plane_codes(row, ok, D // 4, 1, D, BN) << 2)
    else:
        code = plane_codes(row, ok, 0, 2, D, BN)
    return code


@triton.jit
def split_range(n_ptr, s, S: tl.constexpr, BN: tl.constexpr):
    """Split s of S: positions [lo, hi) of [0, n), n read on the device, in whole steps of BN."""
    n = tl.sum(tl.load(n_ptr + tl.arange(0, 1)), 0).to(tl.int32)  # a scalar (the interpreter's too)
    per = tl.cdiv(tl.cdiv(n, S), BN) * BN
    lo = s * per
    return lo, tl.minimum(lo + per, n)


@triton.jit
def split_start(q_ptr, h, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """KV head h's query rows q [GP, D] (the group padded to tl.dot's 16 rows with zeros) and the online softmax's
    empty state: max -inf, sum 0, accumulator 0."""
    g = tl.arange(0, GP)
    q = tl.load(q_ptr + (h * G + g[:, None]) * D + tl.arange(0, D)[None, :], mask=(g < G)[:, None], other=0.0)
    return q, tl.full([GP], float("-inf"), tl.float32), tl.zeros([GP], tl.float32), tl.zeros([GP, D], tl.float32)


@triton.jit
def softmax_step(m_i, l_i, sc, EMPTY_BLOCKS: tl.constexpr):
    """Online softmax over one block of scores sc [GP, BN]: (new max, p, new l, alpha: the old accumulator's factor).
    EMPTY_BLOCKS: a block may attend nothing (a masked ring), so a row with nothing attended yet keeps max -inf and
    p = 0 (its shift is 0, not -inf - -inf); without, every block attends its first position: no guard."""
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new) if EMPTY_BLOCKS else m_new
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(sc - m_use[:, None])
    return m_new, p, l_i * alpha + tl.sum(p, 1), alpha


@triton.jit
def store_partials(o_ptr, m_ptr, l_ptr, h, s, acc, m_i, l_i, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                   S: tl.constexpr):  # fmt: skip
    """Split (h, s)'s o [G, D], m [G], l [G] (rows of the padded group past G dropped)."""
    g = tl.arange(0, GP)
    gm = g < G
    at = (h * S + s) * G + g
    tl.store(o_ptr + at[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :], acc, mask=gm[:, None])
    tl.store(m_ptr + at, m_i, mask=gm)
    tl.store(l_ptr + at, l_i, mask=gm)


@triton.jit
def split_kernel(q_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, cb_ptr, n_ptr, o_ptr, m_ptr, l_ptr, L, factor,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr,
                 S: tl.constexpr):  # fmt: skip
    """Program (h, s): KV head h, positions [s*per, (s+1)*per) ∩ [0, n), per = n / S in whole steps of BN.
    fp16 operands on tensor cores, fp32 accumulation (the BF16 cache's attention rounds its keys to bf16)."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    lo, hi = split_range(n_ptr, s, S, BN)
    RB: tl.constexpr = D * BITS // 8
    q, m_i, l_i, acc = split_start(q_ptr, h, G, GP, D)  # q fp16
    for start in range(lo, hi, BN):
        pos = start + tl.arange(0, BN)
        ok = pos < hi
        rows = (h * L + pos).to(tl.int64)
        kl = tl.load(cb_ptr + codes_of(kc_ptr + rows[:, None] * RB, ok[:, None], D, BITS, BN))
        sc = tl.dot(q, tl.trans(kl))  # [GP, BN]
        ks = tl.load(ks_ptr + rows, mask=ok, other=0.0).to(tl.float32) * factor
        sc = tl.where(ok[None, :], sc * ks[None, :], float("-inf"))
        m_i, p, l_i, alpha = softmax_step(m_i, l_i, sc, False)
        vs = tl.load(vs_ptr + rows, mask=ok, other=0.0).to(tl.float32) * factor
        vl = tl.load(cb_ptr + codes_of(vc_ptr + rows[:, None] * RB, ok[:, None], D, BITS, BN))
        acc = acc * alpha[:, None] + tl.dot((p * vs[None, :]).to(tl.float16), vl)
    store_partials(o_ptr, m_ptr, l_ptr, h, s, acc, m_i, l_i, G, GP, D, S)


@triton.jit
def dense_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, n_ptr, o_ptr, m_ptr, l_ptr, sk_h, sk_l, sv_h, sv_l,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                       S: tl.constexpr):  # fmt: skip
    """split_kernel over a BF16 cache (the lean decoder's static buffers, read in place): positions [0, n) shared out
    as there, each one attended where mask is set (a sliding ring's slots are not a prefix)."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    lo, hi = split_range(n_ptr, s, S, BN)
    d = tl.arange(0, D)
    q, m_i, l_i, acc = split_start(q_ptr, h, G, GP, D)
    for start in range(lo, hi, BN):
        pos = start + tl.arange(0, BN)
        inside = pos < hi
        ok = inside & (tl.load(mask_ptr + pos, mask=inside, other=0) != 0)
        k = tl.load(
            k_ptr + h.to(tl.int64) * sk_h + pos[:, None].to(tl.int64) * sk_l + d[None, :],
            mask=inside[:, None],
            other=0.0,
        )
        sc = tl.where(ok[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        m_i, p, l_i, alpha = softmax_step(m_i, l_i, sc, True)
        v = tl.load(
            v_ptr + h.to(tl.int64) * sv_h + pos[:, None].to(tl.int64) * sv_l + d[None, :],
            mask=inside[:, None],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    store_partials(o_ptr, m_ptr, l_ptr, h, s, acc, m_i, l_i, G, GP, D, S)
