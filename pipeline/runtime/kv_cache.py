"""A compressed KV cache that `generate` really uses: keys and values rotated per head over head_dim by a seeded
signed Hadamard, stored as bit-packed Lloyd-Max codes (2, 3 or 4 bits) with one float16 scale per (token, head);
the newest `residual` tokens stay in the compute dtype and are flushed into the packed store in blocks.

Two ways to read it back:
- streaming (what `make_cache` sets up): the model's attention goes through `hlwq_kv_attention`, which walks the
  packed pages in slices with an online softmax, entirely in the rotated basis (q·k = (HDq)·(HDk), Σ p_i v_i =
  D Hᵀ Σ p_i (HD v_i)): one rotation of the queries and one of the output per layer, never a dequantized copy of the
  whole cache, so decode and long prefill transients stay bounded by the slice size.
- reference (a cache used with any stock attention): `update` returns the whole cache dequantized to the original
  basis, as transformers' own QuantizedCache does.
Gemma-4's attention_k_eq_v layers (its global layers) derive keys and values from one projection: their pages store
the values only and rebuild each key as rope(value * k_norm gain) when read (`KeyFromValue`), half the bytes.
Layers: full attention compressed; sliding-window layers compressed too (`sliding="compressed"`, pages older than the
window dropped) or kept as transformers' BF16 sliding layer (`sliding="bf16"`); Gemma-4's KV-sharing layers hold
nothing (transformers' DummyLayer; releases without it leave them out of the cache), they read the tagged states of
the layer they share.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from transformers import cache_utils
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from pipeline.errors import RuntimeBackendError
from pipeline.quant import kv as kvq
from pipeline.quant import lloyd_max

log = logging.getLogger(__name__)

ATTN_PREFIX = "hlwq_kv_"
# Elements per attention slice, which bound the transient of a layer's attention whatever the context: scores
# (float32, 64 MiB) and dequantized keys or values (float32, 16 MiB each; ~6x that in the dequantization chain).
_SCORE_BUDGET = 1 << 24
_KV_BUDGET = 1 << 22
_NEG = -1e30  # masked score; finite so fully masked slices never produce NaN in the online softmax


@dataclass(frozen=True)
class KVCacheConfig:
    bits: int = 3
    residual: int = 128  # newest tokens kept in the compute dtype
    block: int = 128  # tokens flushed at a time (residual holds residual..residual+block-1 between forwards)
    sliding: Literal["compressed", "bf16"] = "compressed"
    scale: kvq.ScaleKind = "lsq"
    sign_seed: int = 0
    page_tokens: int = 4096  # packed tokens per page of a full-attention layer
    keys_from_values: bool = True  # k_eq_v layers store values only (given the model: make_cache)

    def __post_init__(self) -> None:
        if self.bits not in kvq.KV_BITS:
            raise ValueError(f"kv_cache.bits must be one of {kvq.KV_BITS}, got {self.bits}")
        if self.residual < 0 or self.block < 1 or self.page_tokens < self.block:
            raise ValueError("kv_cache: residual must be >= 0, block >= 1, page_tokens >= block")
        if self.sliding not in ("compressed", "bf16") or self.scale not in ("l2", "lsq"):
            raise ValueError("kv_cache: sliding must be 'compressed' or 'bf16', scale 'l2' or 'lsq'")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d] rotated by cos, sin [B|1, T, d] in the rotate-half convention (Llama, Gemma): float32."""
    cos, sin = cos.unsqueeze(1).to(torch.float32), sin.unsqueeze(1).to(torch.float32)
    x = x.to(torch.float32)
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1).mul_(sin).addcmul_(x, cos)


@dataclass(frozen=True)
class KeyFromValue:
    """Keys rebuilt from values. Gemma-4's attention_k_eq_v layers take both from one projection x: key =
    rope(k_norm(x)), value = v_norm(x), the same RMS norm with a gain only on k_norm: key_t = rope_t(value_t * gain)."""

    gain: torch.Tensor  # [d] k_norm's weight
    table: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (start, n) -> cos, sin [1, n, d] at positions
    tolerance: float = 0.03  # relative L2 error per vector tolerated by `matches` (bf16 states: ~0.005)

    def keys(self, values: torch.Tensor, start: int) -> torch.Tensor:
        """values [B, H, T, d] at positions start.. -> their keys, float32."""
        cos, sin = self.table(start, values.shape[-2])
        return rope(values.to(torch.float32) * self.gain.to(torch.float32), cos, sin)

    def matches(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> bool:
        """Whether keys are the rebuilt ones at positions start.. (False e.g. for left-padded batches, whose
        position ids are not the cache positions)."""
        k = keys.to(torch.float32)
        err = torch.linalg.vector_norm(k - self.keys(values, start), dim=-1)
        return bool((err <= self.tolerance * torch.linalg.vector_norm(k, dim=-1)).all())


def _rope_table(rotary: Any, layer_type: str, device: torch.device, start: int,
                n: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    pos = torch.arange(start, start + n, device=device).unsqueeze(0)
    return rotary(torch.empty(0, device=device), pos, layer_type)  # float32 (the model's own in its dtype)


def keys_from_values(model: Any) -> dict[int, KeyFromValue]:
    """Layer index -> KeyFromValue for the model's layers whose keys are rope(value * k_norm gain): Gemma-4's
    attention_k_eq_v layers (no v_proj, a gainless v_norm); empty for any other model."""
    text = model.get_decoder() if hasattr(model, "get_decoder") else None
    rotary = getattr(text, "rotary_emb", None)
    out: dict[int, KeyFromValue] = {}
    for layer in getattr(text, "layers", None) or []:
        attn: Any = getattr(layer, "self_attn", None)
        if (rotary is None or not getattr(attn, "use_alternative_attention", False) or attn.is_kv_shared_layer
                or attn.v_proj is not None or getattr(attn.v_norm, "with_scale", True)):  # fmt: skip
            continue
        gain = attn.k_norm.weight.detach()
        out[attn.layer_idx] = KeyFromValue(gain, partial(_rope_table, rotary, attn.layer_type, gain.device))
    return out


def quantize_or_refuse(x: torch.Tensor, bits: int, signs: torch.Tensor, scale: kvq.ScaleKind,
                       codebook: torch.Tensor | None) -> kvq.PackedKV:  # fmt: skip
    """kv.quantize_kv, its float16-scale overflow said as the runtime's one-line error (the caches' shared guard)."""
    try:
        return kvq.quantize_kv(x, bits, signs, scale, codebook)
    except OverflowError as e:
        raise RuntimeBackendError(
            f"compressed KV cache: {e}; this model needs a BF16 cache (no kv_cache / --kv-bits)"
        ) from e


@dataclass
class _Page:
    start: int  # absolute position of its first token
    k: kvq.PackedKV | None  # None: keys rebuilt from the values (KeyFromValue)
    v: kvq.PackedKV

    @property
    def length(self) -> int:
        return int(self.v.scales.shape[-1])

    @property
    def end(self) -> int:
        return self.start + self.length

    def nbytes(self) -> int:
        packed = (p for p in (self.k, self.v) if p is not None)
        return sum(t.numel() * t.element_size() for p in packed for t in (p.codes, p.scales))


def _cat_packed(a: kvq.PackedKV, b: kvq.PackedKV) -> kvq.PackedKV:
    return kvq.PackedKV(torch.cat([a.codes, b.codes], dim=-2), torch.cat([a.scales, b.scales], dim=-1), a.bits,
                        a.head_dim)  # fmt: skip


def _slice_packed(p: kvq.PackedKV, a: int, b: int) -> kvq.PackedKV:
    return kvq.PackedKV(p.codes[..., a:b, :], p.scales[..., a:b], p.bits, p.head_dim)


def _owned(p: kvq.PackedKV) -> kvq.PackedKV:
    """p with storage of its own: a page kept as a view of a larger flush would keep that whole flush alive (the
    tokens topped up into the previous page, and for sliding layers every evicted page cut from it)."""
    c, s = p.codes, p.scales
    if c.untyped_storage().nbytes() == c.nbytes and s.untyped_storage().nbytes() == s.nbytes:
        return p
    fmt = torch.contiguous_format
    return kvq.PackedKV(c.clone(memory_format=fmt), s.clone(memory_format=fmt), p.bits, p.head_dim)


class HLWQKVLayer(DynamicLayer):
    """One layer's cache: packed pages [B, H, T, d*bits/8] + float16 scales [B, H, T], and a residual in `keys` /
    `values` [B, H, r, d]. `window` set: a sliding-window layer (positions older than the window are dropped)."""

    keys: torch.Tensor  # set by lazy_initialization before any use (None only before the first update)
    values: torch.Tensor

    def __init__(self, kv: KVCacheConfig, streaming: bool, window: int | None = None):
        super().__init__()
        self.kv = kv
        self.streaming = streaming
        self.window = window
        self.is_sliding = window is not None
        # A sliding layer drops whole pages, so its pages are small; a full layer's are large (fewer slices).
        self.page_tokens = kv.block if window is not None else kv.page_tokens
        self.pages: list[_Page] = []
        self.cumulative_length = 0
        self.signs: torch.Tensor | None = None
        self.codebook: torch.Tensor | None = None
        self.key_from_value: KeyFromValue | None = None  # set: pages hold values only

    # -- storage ---------------------------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.signs = kvq.kv_signs(d, self.kv.sign_seed, key_states.device)
        self.codebook = lloyd_max.gaussian_codebook(self.kv.bits, key_states.device)

    def _first_live(self, cum: int) -> int:
        """Oldest position a forward starting at `cum` can attend to."""
        return 0 if self.window is None else max(0, cum - self.window + 1)

    def _start(self) -> int:
        """Absolute position of the oldest stored token."""
        if self.pages:
            return self.pages[0].start
        return self.cumulative_length - self.keys.shape[-2] if self.keys is not None else 0

    def _evict(self) -> None:
        live = self._first_live(self.cumulative_length)
        while self.pages and self.pages[0].end <= live:
            self.pages.pop(0)
        r = self.keys.shape[-2]
        dead = min(r, live - (self.cumulative_length - r))
        if dead > 0:  # residual tokens that no query can see any more are never quantized
            self.keys, self.values = self.keys[..., dead:, :], self.values[..., dead:, :]

    def _flush(self) -> None:
        r = self.keys.shape[-2]
        n = (r - self.kv.residual) // self.kv.block * self.kv.block
        if n <= 0:
            return
        assert self.signs is not None
        start = self.cumulative_length - r
        k = None if self.key_from_value is not None else self._quantize(self.keys[..., :n, :])
        v = self._quantize(self.values[..., :n, :])
        self.keys, self.values = self.keys[..., n:, :].contiguous(), self.values[..., n:, :].contiguous()
        pos = 0
        while pos < n:  # top up the last page, then open new ones: a copy is bounded by one page
            last = self.pages[-1] if self.pages else None
            if last is not None and last.length < self.page_tokens:
                take = min(self.page_tokens - last.length, n - pos)
                last.k = None if k is None or last.k is None else _cat_packed(last.k, _slice_packed(k, pos, pos + take))
                last.v = _cat_packed(last.v, _slice_packed(v, pos, pos + take))
            else:
                take = min(self.page_tokens, n - pos)
                pk = None if k is None else _owned(_slice_packed(k, pos, pos + take))
                self.pages.append(_Page(start + pos, pk, _owned(_slice_packed(v, pos, pos + take))))
            pos += take

    def settle(self) -> None:
        """Evict and flush now exactly what the next update would, once this forward has read its new tokens: a
        prefill chunk's states then wait as codes, not in the compute dtype, while the other layers run (Q3 31B:
        512 tokens x 50 sliding layers x 16 KB, ~0.4 GB at the peak)."""
        if self.is_initialized:
            self._evict()
            self._flush()

    def _quantize(self, x: torch.Tensor) -> kvq.PackedKV:
        assert self.signs is not None
        return quantize_or_refuse(x, self.kv.bits, self.signs, self.kv.scale, self.codebook)

    def _dequantize(self, p: kvq.PackedKV, rotated: bool = False) -> torch.Tensor:
        """float32 vectors, in the rotated basis (streaming) or the original one."""
        assert self.signs is not None
        return kvq.dequantize_kv(p, self.signs, rotated=rotated, codebook=self.codebook)

    def _rebuilt_keys(self, values: torch.Tensor, start: int) -> torch.Tensor:
        """Keys of a values-only page from its dequantized values (original basis), float32."""
        assert self.key_from_value is not None
        return self.key_from_value.keys(values, start)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kfv = self.key_from_value
        # Checked on a sequence's first update and on every multi-token one (prefill chunks), not per decode step:
        # the check syncs with the device, and a decode step's position follows from those already checked.
        first_or_chunk = not self.cumulative_length or key_states.shape[-2] > 1
        if kfv is not None and first_or_chunk and not kfv.matches(key_states, value_states, self.cumulative_length):
            if self.cumulative_length:  # pages already hold values only: their keys cannot be recovered
                raise RuntimeBackendError(f"KV cache: this layer's keys stopped being rope(value * k_norm gain) at "
                                          f"position {self.cumulative_length} (left padding or non-contiguous "
                                          f"positions?): build the cache with keys_from_values=False")  # fmt: skip
            log.warning("KV cache: keys are not rope(value * gain) at the cache positions: storing them")
            self.key_from_value = None
        # Eviction and flushing act on what the previous forwards left, so this forward attends to its own new
        # tokens unquantized and to exactly the positions get_mask_sizes announced.
        self._evict()
        self._flush()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        if self.streaming:
            return _tagged(self, key_states), _tagged(self, value_states)
        return self.dequantized()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything stored, in the original basis and the compute dtype (the reference read-back)."""
        ks, vs = [], []
        for p in self.pages:
            v = self._dequantize(p.v)
            k = self._rebuilt_keys(v, p.start) if p.k is None else self._dequantize(p.k)
            ks.append(k.to(self.keys.dtype))
            vs.append(v.to(self.values.dtype))
        return torch.cat([*ks, self.keys], dim=-2), torch.cat([*vs, self.values], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of what the next forward attends to: stored tokens that survive eviction + new."""
        if not self.is_initialized:
            return query_length, 0
        live = self._first_live(self.cumulative_length)
        start = next((p.start for p in self.pages if p.end > live), None)
        if start is None:
            start = max(live, self.cumulative_length - self.keys.shape[-2])
        return self.cumulative_length + query_length - start, start

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def nbytes(self) -> int:
        res = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        return res + sum(p.nbytes() for p in self.pages)

    def reset(self) -> None:
        self.pages = []
        self.cumulative_length = 0
        # Dropped, not zeroed, as update concatenates (transformers 5.17's reset only zeroes them, keeping their bytes)
        self.keys = self.values = None  # type: ignore[assignment]
        self.is_initialized = False
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the HLWQ KV cache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the HLWQ KV cache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the HLWQ KV cache does not support batch expansion")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the HLWQ KV cache does not support batch selection")

    # -- streaming attention ---------------------------------------------------------------------------------------

    def _segments(self, step: int) -> Iterator[tuple[int, kvq.PackedKV | None, kvq.PackedKV]]:
        """The packed tokens in runs of <= step (pages are consecutive in position): small pages are joined (a copy
        of packed bytes) so a decode step reads a layer in one go, large ones are sliced (views)."""
        parts: list[tuple[kvq.PackedKV | None, kvq.PackedKV]] = []
        pos = have = 0
        for page in self.pages:
            a = 0
            while a < page.length:
                if not parts:
                    pos = page.start + a
                z = min(page.length, a + step - have)
                pk = None if page.k is None else _slice_packed(page.k, a, z)
                parts.append((pk, _slice_packed(page.v, a, z)))
                have += z - a
                a = z
                if have == step:
                    yield pos, *_join(parts)
                    parts, have = [], 0
        if parts:
            yield pos, *_join(parts)

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float,
               softcap: float | None) -> torch.Tensor:  # fmt: skip
        """softmax(q kᵀ·scaling) v over every stored token, with `mask` [B|1, 1, Lq, kv_len] (True = attend) laid
        over positions [kv_offset, kv_offset + kv_len); returns [B, Lq, Hq, d] in query's dtype."""
        assert self.signs is not None
        b, hq, lq, d = query.shape
        hkv = self.keys.shape[1]
        g = hq // hkv
        # One query and one accumulator at a time (a prefill chunk's are the largest fixed transient): the residual
        # in the original basis first, then both rotated once for the pages (the online softmax is linear in acc).
        q = query.reshape(b, hkv, g * lq, d).to(torch.float32) * scaling
        offset = self._start()
        total = self.cumulative_length - offset
        q_pos = torch.arange(self.cumulative_length - lq, self.cumulative_length, device=query.device).unsqueeze(-1)
        if mask is not None and mask.dtype != torch.bool:  # an additive float mask (eager): 0 where attended
            mask = mask == 0
        m5 = None if mask is None else mask[..., -total:].reshape(-1, 1, 1, lq, total)  # [B|1, 1, 1, Lq, total]

        def allowed(pos: int, n: int) -> torch.Tensor:
            """Which of positions pos..pos+n each query attends to: the given mask's columns, or (none given)
            causal and windowed, built per slice (a whole one is Lq x context bytes: 67 MB at 512 x 128k)."""
            if m5 is not None:
                return m5[..., pos - offset : pos - offset + n]
            k_pos = torch.arange(pos, pos + n, device=query.device)
            m = k_pos <= q_pos
            if self.window is not None:
                m &= k_pos > q_pos - self.window
            return m

        step = max(16, min(_SCORE_BUDGET // max(1, b * hq * lq), _KV_BUDGET // max(1, b * hkv * d)))
        run_max = q.new_full((b, hkv, g * lq), _NEG)
        run_sum = q.new_zeros((b, hkv, g * lq))
        acc = torch.zeros_like(q)

        def segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
            nonlocal run_max, run_sum
            # The scores are the largest transient: one buffer, every later step in place. matmul over
            # [B, Hkv, G*Lq, d]: one batched GEMM per slice (einsum took a slow path on the CPU).
            s = q @ k.transpose(-1, -2)
            if softcap is not None:
                s.div_(softcap).tanh_().mul_(softcap)
            s.view(b, hkv, g, lq, -1).masked_fill_(~allowed(pos, k.shape[-2]), _NEG)
            new_max = torch.maximum(run_max, s.amax(-1))
            fix = torch.exp(run_max - new_max)
            p = s.sub_(new_max.unsqueeze(-1)).exp_()
            run_sum = run_sum * fix + p.sum(-1)
            acc.mul_(fix.unsqueeze(-1))
            acc.view(b * hkv, g * lq, d).baddbmm_(p.view(b * hkv, g * lq, -1), v.reshape(b * hkv, -1, d))
            run_max = new_max

        r0 = self.cumulative_length - self.keys.shape[-2]
        for a in range(0, self.keys.shape[-2], step):
            z = min(a + step, self.keys.shape[-2])
            segment(q, self.keys[..., a:z, :].to(torch.float32), self.values[..., a:z, :].to(torch.float32), r0 + a)
        if self.pages and self.key_from_value is not None:  # values only: keys rebuilt in the original basis
            for pos, _, pv in self._segments(step):
                v = self._dequantize(pv)
                segment(q, self._rebuilt_keys(v, pos), v, pos)
        elif self.pages:
            q = kvq.rotate(q, self.signs)
            acc = kvq.rotate(acc, self.signs)
            for pos, pk, pv in self._segments(step):
                assert pk is not None
                segment(q, self._dequantize(pk, rotated=True), self._dequantize(pv, rotated=True), pos)
            del q
            acc = kvq.unrotate(acc, self.signs)
        out = acc.div_(run_sum.unsqueeze(-1))
        return out.view(b, hq, lq, d).transpose(1, 2).to(query.dtype)


class ReadOnlyLayer(HLWQKVLayer):
    """An HLWQKVLayer over storage another cache keeps and flushes (the lean decoder's static store, lean_kv): its
    attend reads the pages and residual it is given, its settle leaves them alone."""

    @classmethod
    def over(cls, kv: KVCacheConfig, pages: list[_Page], keys: torch.Tensor, values: torch.Tensor, end: int,
             signs: torch.Tensor, codebook: torch.Tensor) -> ReadOnlyLayer:  # fmt: skip
        """Positions 0..end-1: `pages` (consecutive from 0), then keys/values [B, H, r, d] as the exact residual."""
        layer = cls(kv, streaming=True)
        layer.keys, layer.values, layer.cumulative_length = keys, values, end
        layer.signs, layer.codebook, layer.pages = signs, codebook, pages
        return layer

    def settle(self) -> None:
        pass


def _join(parts: list[tuple[kvq.PackedKV | None, kvq.PackedKV]]) -> tuple[kvq.PackedKV | None, kvq.PackedKV]:
    if len(parts) == 1:
        return parts[0]

    def cat(ps: list[kvq.PackedKV]) -> kvq.PackedKV:
        return kvq.PackedKV(torch.cat([p.codes for p in ps], -2), torch.cat([p.scales for p in ps], -1), ps[0].bits,
                            ps[0].head_dim)  # fmt: skip

    ks = [k for k, _ in parts if k is not None]
    return (cat(ks) if len(ks) == len(parts) else None), cat([v for _, v in parts])


def _tagged(layer: HLWQKVLayer, like: torch.Tensor) -> torch.Tensor:
    """A zero-length stand-in for the states: it carries the layer to `hlwq_kv_attention` (and through Gemma-4's
    KV sharing to the layers that reuse these states) instead of a dequantized copy of the cache."""
    t = like.new_empty(*like.shape[:2], 0, like.shape[-1])
    t._hlwq_kv = layer  # type: ignore[attr-defined]
    return t


class HLWQKVCache(Cache):
    """The per-layer caches for a model's decoder, chosen from its config like transformers' DynamicCache."""

    def __init__(self, config: Any, kv: KVCacheConfig | None = None, streaming: bool = False, model: Any = None):
        """model: given (and kv.keys_from_values), its k_eq_v layers store values only (`keys_from_values`)."""
        self.kv = kv or KVCacheConfig()
        text = config.get_text_config(decoder=True)
        types, kwargs = get_layer_types_and_kwargs(text)
        if isinstance(kwargs, dict):  # transformers 5.17 gives one kwargs dict for every layer, not one per layer
            kwargs = [kwargs] * len(types)
        layers: list[Any] = []
        for t, kw in zip(types, kwargs, strict=True):
            if t == "full_attention":
                layers.append(HLWQKVLayer(self.kv, streaming))
            elif t == "sliding_attention" and self.kv.sliding == "compressed":
                layers.append(HLWQKVLayer(self.kv, streaming, window=kw["sliding_window"]))
            elif t in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kw))
            elif t == "dummy":  # named only where DummyLayer exists (5.17 leaves shared layers out of the cache)
                layers.append(cache_utils.DummyLayer())
            else:
                raise ValueError(f"the HLWQ KV cache does not support layer type {t!r}")
        if model is not None and self.kv.keys_from_values:
            for i, kfv in keys_from_values(model).items():
                if i < len(layers) and isinstance(layers[i], HLWQKVLayer) and layers[i].window is None:
                    layers[i].key_from_value = kfv
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held: packed codes + scales + residuals (+ BF16 sliding layers)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, HLWQKVLayer):
                total += layer.nbytes()
            elif isinstance(layer, DynamicLayer):
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
        return total


def hlwq_kv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, fallback: str = "sdpa",
                      **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """Attention over a tagged HLWQ layer; any other call (BF16 sliding layers, a plain cache, the vision tower)
    goes to transformers' `fallback` implementation unchanged."""
    layer = getattr(key, "_hlwq_kv", None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn: Any = sdpa_attention_forward if fallback == "sdpa" else ALL_ATTENTION_FUNCTIONS.get(fallback)
        if fn is None:  # eager lives in each model file: use the model's own module-level function
            import sys

            fn = sys.modules[type(module).__module__].eager_attention_forward
        lq, kv_len = query.shape[-2], key.shape[-2]
        if attention_mask is None and lq > 1 and getattr(module, "is_causal", True):
            # None from the mask below means plain causal, bottom-right aligned (sdpa's is_causal is top-left)
            attention_mask = torch.ones(lq, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - lq)[None, None]
        if fallback == "eager" and attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
        extra = {"softcap": softcap} if softcap is not None else {}
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **extra, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = layer.attend(query, attention_mask, scaling, softcap)
    # Gemma-4's KV sharing: later layers of this forward read these states, their new tokens unquantized.
    if not (getattr(module, "store_full_length_kv", False) or getattr(module, "is_kv_shared_layer", False)):
        layer.settle()
    return out, None


def _register(fallback: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = ATTN_PREFIX + fallback

    def attention(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hlwq_kv_attention(*args, **{**kwargs, "fallback": fallback})

    def mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        # Plain causal without padding: None, the streaming attention builds each slice's mask itself (Lq x context
        # bytes saved). Any other mask materialized: the streaming attention slices it per page.
        pad = kwargs.get("attention_mask")
        plain = kwargs.get("allow_is_causal_skip", True) and kwargs.get("mask_function") is causal_mask_function
        if not args and plain and (pad is None or bool(pad.all())):
            return None
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    return name


def use_streaming_attention(model: Any) -> None:
    """Route the model's attention through `hlwq_kv_attention` (other calls fall back to its current one); refuse a
    model that keeps its own (the cache's zero-length stand-ins would reach sdpa or eager)."""
    current = model.config.get_text_config(decoder=True)._attn_implementation or "sdpa"
    if current.startswith(ATTN_PREFIX):
        return
    fallback = current if current in ("sdpa", "eager") else "sdpa"
    model.set_attn_implementation(_register(fallback))
    kept = model.config.get_text_config(decoder=True)._attn_implementation or ""
    if not kept.startswith(ATTN_PREFIX):  # transformers only warns when a model class cannot switch
        raise RuntimeBackendError(f"the compressed KV cache needs the streaming attention; this model kept {kept!r} "
                                  "(transformers could not switch it)")  # fmt: skip


def make_cache(model: Any, bits: int | KVCacheConfig = 3, residual: int = 128, **options: Any) -> HLWQKVCache:
    """The compressed cache for `model`, with its attention switched to the streaming path; pass it to generate:
    `model.generate(**inputs, past_key_values=make_cache(model, bits=3))`."""
    kv = bits if isinstance(bits, KVCacheConfig) else KVCacheConfig(bits=bits, residual=residual, **options)
    use_streaming_attention(model)
    return HLWQKVCache(model.config, kv, streaming=True, model=model)


def config_from_manifest(section: Any) -> KVCacheConfig | None:
    """manifest `load_check.kv_cache` ({bits, residual} or null) -> the cache config (None: BF16 DynamicCache)."""
    return None if section is None else KVCacheConfig(bits=section.bits, residual=section.residual)


def cache_bytes_per_token(kv: KVCacheConfig, head_dim: int, kv_heads: int) -> float:
    """Packed bytes per token of one layer (K and V): codes + float16 scales."""
    return 2 * kv_heads * (head_dim * kv.bits / 8 + 2)


__all__ = [
    "HLWQKVCache",
    "HLWQKVLayer",
    "KVCacheConfig",
    "KeyFromValue",
    "cache_bytes_per_token",
    "config_from_manifest",
    "keys_from_values",
    "make_cache",
]
