"""The compressed KV cache inside the lean decoder: static buffers that one captured decode step can attend.

Per full-attention layer, for max_len positions: bit-packed Lloyd-Max codes [1, H, max_len, d*bits/8] and one float16
scale per (token, head) for keys and for values (exactly what pipeline.quant.kv and HLWQKVLayer produce: same
rotation, signs, codebook and scale kind), plus a ring of `residual + block` slots holding the newest tokens in the
compute dtype. Which positions are packed follows HLWQKVLayer: a forward that starts at T attends positions
< packed_count(T) as codes and the rest exactly; after it, the positions up to packed_count(T + n) are flushed.

- Decode steps write their token into the ring (slot pos mod ring) and attend [packed store ; ring] with a mask built
  on the device (static shapes, no host sync, capturable). Flushing a block from the ring into the packed store is
  eager, between steps, on the host's step count (`settle`), into the same buffers.
- The attention over the packed store stays in the rotated basis: the query is rotated once per head, the packed
  output once, keys and values never (`packed_attention`); scales multiply scores and probabilities, not elements.
- Prefill chunks (eager) go through transformers' layers: `update` hands them the original-basis keys/values of
  positions [0, T + n) (packed part dequantized) and flushes the chunk.
- Gemma-4's k_eq_v (global) layers store their keys too (KVCacheConfig.keys_from_values=False semantics): rebuilding
  keys as rope(value * gain) would un-rotate the whole store every step.
- Sliding-window layers stay BF16 rings (their size is fixed by the window); sliding="compressed" is refused.
- page_tokens does not apply (one static buffer per layer); residual, block, bits, scale and sign_seed do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import RuntimeBackendError
from pipeline.quant import kv as kvq
from pipeline.quant import lloyd_max
from pipeline.runtime.decode import StaticKV
from pipeline.runtime.kernels import kv_attention

if TYPE_CHECKING:  # the decode step imports this module; kv_cache stays optional for a build without it
    from pipeline.runtime.kv_cache import KVCacheConfig

log = logging.getLogger(__name__)


def check_config(kv: KVCacheConfig, model: Any, window: int | None) -> None:
    """Refuse what the lean decoder's cache does not do; say what it does differently."""
    if window is not None and kv.sliding == "compressed":
        raise RuntimeBackendError("the lean decoder keeps sliding-window layers as BF16 rings: use "
                                  "KVCacheConfig(sliding='bf16') (or HF generate with make_cache)")  # fmt: skip
    from pipeline.runtime.kv_cache import keys_from_values

    if kv.keys_from_values and keys_from_values(model):
        log.warning("lean decoder KV cache: the k_eq_v layers store their keys too (keys_from_values=False)")


def rotation_matrix(signs: torch.Tensor) -> torch.Tensor:
    """M [block, block] float32 with kv.rotate(x) = x @ M per block (M = (HD)ᵀ, so kv.unrotate(y) = y @ Mᵀ): a
    decode step rotates a few vectors, one small GEMM instead of log2(block) butterfly stages of launches."""
    return kvq.rotate(torch.eye(signs.numel(), device=signs.device), signs)


def _blockwise(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [..., d] @ m per block of m's size (d a multiple of it)."""
    return torch.matmul(x.unflatten(-1, (-1, m.shape[0])), m).flatten(-2)


def packed_count(total: int, kv: KVCacheConfig) -> int:
    """Positions HLWQKVLayer holds as codes once `total` tokens are stored (whole blocks beyond the residual)."""
    return max(0, (total - kv.residual) // kv.block * kv.block)


def ring_slots(kv: KVCacheConfig) -> int:
    """Ring size for the exact tokens: a decode step attends at most residual + block of them (its own included)."""
    return kv.residual + kv.block


@dataclass
class PackedLayer:
    """One full-attention layer's static store."""

    k_codes: torch.Tensor  # uint8 [1, H, max_len, d*bits/8]
    k_scales: torch.Tensor  # float16 [1, H, max_len]
    v_codes: torch.Tensor
    v_scales: torch.Tensor
    res_k: torch.Tensor  # compute dtype [1, H, ring, d]
    res_v: torch.Tensor
    signs: torch.Tensor  # float32 [rotation block]
    rotation: torch.Tensor  # float32 [block, block]: rotation_matrix(signs)
    codebook: torch.Tensor  # float32 [2**bits]
    bits: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the fused step takes (a tuple of tensors: one compiled graph serves every layer of a shape)."""
        return (self.k_codes, self.k_scales, self.v_codes, self.v_scales, self.res_k, self.res_v, self.rotation,
                self.codebook)  # fmt: skip

    def nbytes(self) -> int:
        held = (self.k_codes, self.k_scales, self.v_codes, self.v_scales, self.res_k, self.res_v)
        return sum(t.numel() * t.element_size() for t in held)

    def packed(self, a: int, b: int) -> tuple[kvq.PackedKV, kvq.PackedKV]:
        """Keys and values of positions a..b-1 of the packed store (views)."""
        d = self.res_k.shape[-1]
        k = kvq.PackedKV(self.k_codes[:, :, a:b], self.k_scales[:, :, a:b], self.bits, d)
        return k, kvq.PackedKV(self.v_codes[:, :, a:b], self.v_scales[:, :, a:b], self.bits, d)

    def dequantized(self, a: int, b: int, k_dtype: torch.dtype,
                    v_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Keys and values of positions a..b-1 of the packed store, dequantized to the original basis."""
        pk, pv = self.packed(a, b)
        return (kvq.dequantize_kv(pk, self.signs, k_dtype, codebook=self.codebook),
                kvq.dequantize_kv(pv, self.signs, v_dtype, codebook=self.codebook))  # fmt: skip

    def write(self, a: int, k: torch.Tensor, v: torch.Tensor, kv: KVCacheConfig) -> None:
        """Quantize k, v [1, H, n, d] (positions a..a+n-1) into the packed store."""
        from pipeline.runtime.kv_cache import quantize_or_refuse

        n = k.shape[2]
        for x, codes, scales in ((k, self.k_codes, self.k_scales), (v, self.v_codes, self.v_scales)):
            p = quantize_or_refuse(x, self.bits, self.signs, kv.scale, self.codebook)
            codes[:, :, a : a + n].copy_(p.codes)
            scales[:, :, a : a + n].copy_(p.scales)


def packed_attention(q: torch.Tensor, store: tuple[torch.Tensor, ...], bits: int, mask: torch.Tensor,
                     scaling: float) -> torch.Tensor:  # fmt: skip
    """One query token over a PackedLayer's tensors: q [Hq, d] (query head h uses KV head h // g, as repeat_kv),
    mask [max_len + ring] True = attend (packed positions, then ring slots) -> [Hq * d] in the ring's dtype.
    Scores and the softmax in float32, as grouped_attention keeps them."""
    k_codes, k_scales, v_codes, v_scales, res_k, res_v, rotation, codebook = store
    hkv, length, d = res_k.shape[1], k_codes.shape[2], res_k.shape[-1]
    qg = q.view(hkv, -1, d).float()
    qr = _blockwise(qg, rotation)  # q·k = (HDq)·(HDk): the packed keys stay rotated
    if kv_attention.supported(q, d, bits):
        return _split_attention(qg, qr, store, bits, mask, scaling)
    kp, vp = kvq.PackedKV(k_codes[0], k_scales[0], bits, d), kvq.PackedKV(v_codes[0], v_scales[0], bits, d)
    kl, vl = kvq.code_levels(kp, codebook), kvq.code_levels(vp, codebook)  # [Hkv, max_len, d]
    rk = res_k[0].float()
    if torch.compiler.is_compiling():  # fused reductions read the codes once (no float32 copy of the store)
        s_packed = (qr.unsqueeze(2) * kl.unsqueeze(1)).sum(-1)
        s_ring = (qg.unsqueeze(2) * rk.unsqueeze(1)).sum(-1)
    else:
        s_packed = torch.matmul(qr, kl.transpose(1, 2))
        s_ring = torch.matmul(qg, rk.transpose(1, 2))
    s = torch.cat([s_packed * kvq.vector_factors(kp).unsqueeze(1), s_ring], dim=-1) * scaling
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    p_packed = p[..., :length] * kvq.vector_factors(vp).unsqueeze(1)
    if torch.compiler.is_compiling():
        out_rot = (p_packed.unsqueeze(-1) * vl.unsqueeze(1)).sum(-2)
    else:
        out_rot = torch.matmul(p_packed, vl)
    # Σ p_i v_i = D Hᵀ Σ p_i (HD v_i): one inverse rotation of the packed part's output
    out = _blockwise(out_rot, rotation.T) + torch.matmul(p[..., length:], res_v[0].float())
    return out.reshape(-1).to(res_v.dtype)


def _split_attention(qg: torch.Tensor, qr: torch.Tensor, store: tuple[torch.Tensor, ...], bits: int,
                     mask: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
    """packed_attention on the GPU: the kernel's per-split partials over the filled packed positions only (their
    count is the mask's packed part, a device value), merged with the ring's exact scores by their maxima."""
    k_codes, k_scales, v_codes, v_scales, res_k, res_v, rotation, codebook = store
    hkv, length = k_codes.shape[1], k_codes.shape[2]
    filled = mask[:length].sum().view(1)
    splits = kv_attention.splits_for(length, hkv)
    q16, cb16 = (qr * scaling).half(), codebook.half()
    o, m, l_ = torch.ops.hlwq.kv_packed_partials(q16, k_codes[0], k_scales[0], v_codes[0], v_scales[0], cb16, filled,
                                                 bits, splits)  # fmt: skip
    s_ring = torch.matmul(qg, res_k[0].float().transpose(1, 2)) * scaling
    s_ring = s_ring.masked_fill(~mask[length:], float("-inf"))  # [Hkv, G, ring]
    top = torch.maximum(m.amax(1), s_ring.amax(-1))  # the ring holds the token itself: finite
    out_rot, den = kv_attention.merge_partials(o, m, l_, top)
    p_ring = torch.exp(s_ring - top.unsqueeze(-1))
    den = den + p_ring.sum(-1)
    out = _blockwise(out_rot, rotation.T) + torch.matmul(p_ring, res_v[0].float())
    return (out / den.unsqueeze(-1)).reshape(-1).to(res_v.dtype)


class PackedStaticKV(StaticKV):
    """StaticKV whose full-attention layers are PackedLayers (sliding layers: StaticKV's BF16 rings).

    The decoder sets, besides StaticKV's indices, `decoding` and `res_idx` (ring slots of the tokens being written)
    before every forward and `start` (host position of a prefill chunk) before each chunk; it calls `commit(total)`
    after each chunk and `settle(total)` before each decode step. `res_pos` [ring] (position held per slot, -1 none)
    and `packed_len` [1] are device tensors the decode masks read.
    """

    def __init__(self, layer_types: list[str], max_len: int, window: int | None, kv: KVCacheConfig,
                 device: torch.device):  # fmt: skip
        super().__init__(layer_types, max_len, window)
        self.kv = kv
        self.res_slots = ring_slots(kv)
        self.layers: dict[int, PackedLayer] = {}
        self.res_idx = torch.zeros(0, dtype=torch.long)
        self.res_pos = torch.full((self.res_slots,), -1, dtype=torch.long, device=device)
        self.packed_len = torch.zeros(1, dtype=torch.long, device=device)
        self.packed_host = 0  # positions packed, as the host knows them
        self.start = 0
        self.decoding = False

    def has(self, layer_idx: int) -> bool:
        return layer_idx in self.layers or super().has(layer_idx)

    def nbytes(self) -> int:
        return super().nbytes() + sum(layer.nbytes() for layer in self.layers.values())

    def reset(self) -> None:
        """A new sequence: nothing packed, the ring empty (old codes stay, masked)."""
        self.res_pos.fill_(-1)
        self.packed_len.zero_()
        self.packed_host = 0

    def _new_layer(self, k: torch.Tensor, v: torch.Tensor) -> PackedLayer:
        _, h, _, d = k.shape
        kv, dev = self.kv, k.device
        codes = (1, h, self.max_len, d * kv.bits // 8)

        def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        signs = kvq.kv_signs(d, kv.sign_seed, dev)
        return PackedLayer(
            zeros(codes, torch.uint8), zeros(codes[:3], torch.float16), zeros(codes, torch.uint8),
            zeros(codes[:3], torch.float16), zeros((1, h, self.res_slots, d), k.dtype),
            zeros((1, h, self.res_slots, d), v.dtype),
            signs, rotation_matrix(signs), lloyd_max.gaussian_codebook(kv.bits, dev), kv.bits,
        )  # fmt: skip

    @torch.compiler.disable
    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if self.sliding(layer_idx):
            return super().update(k, v, layer_idx, *args, **kwargs)
        if v.shape[-1] != k.shape[-1]:
            raise RuntimeBackendError("the lean decoder's compressed cache needs keys and values of one head_dim")
        if layer_idx not in self.layers:
            self.layers[layer_idx] = self._new_layer(k, v)
        layer = self.layers[layer_idx]
        if self.decoding:  # a decode step through transformers' forward (not the fused step)
            layer.res_k.index_copy_(2, self.res_idx, k)
            layer.res_v.index_copy_(2, self.res_idx, v)
            return self._decode_states(layer, k.dtype)
        return self._prefill(layer, k, v)

    def _decode_states(self, layer: PackedLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[whole packed store, original basis ; ring] for the decode mask's layout (slow: transformers' path only)."""
        keys, values = layer.dequantized(0, self.max_len, dtype, dtype)
        return torch.cat([keys, layer.res_k], dim=2), torch.cat([values, layer.res_v], dim=2)

    def _prefill(self, layer: PackedLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk at positions start..start+n-1: hands the attention positions 0..start+n-1 (codes below
        packed_host, exact above, as HLWQKVLayer attends them), then flushes what it would. The states go out as
        kv_cache's tagged stand-ins of a ReadOnlyLayer over this store, so the model's streaming attention
        (use_streaming_attention) reads the codes slice by slice: no dequantized copy of the prefix."""
        from pipeline.runtime.kv_cache import ReadOnlyLayer, _Page, _tagged

        a, t0, n = self.packed_host, self.start, k.shape[2]
        end, b = t0 + n, packed_count(t0 + n, self.kv)
        old = torch.arange(a, t0, device=k.device) % self.res_slots
        exact_k = torch.cat([layer.res_k.index_select(2, old), k], dim=2)  # positions a..end-1
        exact_v = torch.cat([layer.res_v.index_select(2, old), v], dim=2)
        pages = [_Page(0, *layer.packed(0, a))] if a > 0 else []
        view = ReadOnlyLayer.over(self.kv, pages, exact_k, exact_v, end, layer.signs, layer.codebook)
        keys, values = _tagged(view, k), _tagged(view, v)
        if b > a:
            layer.write(a, exact_k[:, :, : b - a], exact_v[:, :, : b - a], self.kv)
        keep = torch.arange(b, end, device=k.device) % self.res_slots
        layer.res_k.index_copy_(2, keep, exact_k[:, :, b - a :])
        layer.res_v.index_copy_(2, keep, exact_v[:, :, b - a :])
        return keys, values

    def commit(self, total: int) -> None:
        """After a prefill chunk (every layer flushed in update): the ring and packed length for `total` tokens."""
        b = packed_count(total, self.kv)  # total - b < residual + block: the ring holds them
        self.packed_host = b
        self.packed_len.fill_(b)
        pos = torch.arange(b, total, device=self.res_pos.device)
        self.res_pos.fill_(-1)
        self.res_pos.index_copy_(0, pos % self.res_slots, pos)

    def settle(self, total: int) -> None:
        """Before a decode step at position `total`: flush the ring's tokens HLWQKVLayer would have packed by then.
        Eager, outside the captured step; every `block` steps it quantizes one block per layer (quantize_kv's
        overflow check syncs with the device then, not on the other steps)."""
        a, b = self.packed_host, packed_count(total, self.kv)
        if b <= a:
            return
        slots = torch.arange(a, b, device=self.res_pos.device) % self.res_slots
        for layer in self.layers.values():
            layer.write(a, layer.res_k.index_select(2, slots), layer.res_v.index_select(2, slots), self.kv)
        self.res_pos.index_fill_(0, slots, -1)
        self.packed_host = b
        self.packed_len.fill_(b)
