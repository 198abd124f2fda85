"""Lean greedy decoding: a static KV cache and one CUDA graph per decode step, around the model's own layers.

HF `generate` spends most of a token's time outside the matmuls at batch 1 (Python, mask building, cache bookkeeping,
a host sync per token). Here the decoder layers of the transformers model are called directly with a cache whose
buffers never move: full-attention layers write token t at slot t, sliding-window layers at slot t mod R, a ring of
R = min(W, max_len) slots (a decoder built for fewer tokens than the window reads no empty window slots).
One decode step — embedding, layers, norm, head, argmax, and feeding the token back — is captured once as a CUDA graph
and replayed; the host only reads the tokens at the end. Prefill runs the same code eagerly in chunks of <= W tokens.
On a CPU (tests) the same step runs eagerly, so the code path that makes tokens is the one the GPU replays.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.runtime.measure import sync

if TYPE_CHECKING:
    from pipeline.runtime.gemma4_decode import Pending
    from pipeline.runtime.kv_cache import KVCacheConfig
    from pipeline.runtime.lean_kv import PackedStaticKV


def text_parts(model: Any) -> tuple[Any, Any, Any]:
    """(decoder stack with embed_tokens/layers/norm/rotary_emb, lm_head, text config) of a causal or multimodal LM."""
    inner: Any = getattr(model, "model", model)
    text = getattr(inner, "language_model", inner)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = getattr(model, "lm_head", head)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if head is None or not hasattr(text, "layers"):
        raise TypeError(f"{type(model).__name__} has no decoder stack and head that the lean decoder knows")
    return text, head, cfg


def _call_layer(layer: nn.Module, h: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    return layer(h, **kwargs)


class StaticKV:
    """Fixed KV buffers: [B, H, max_len, D] per full layer, a [B, H, R, D] ring per sliding layer (R = min(W,
    max_len)).

    The decoder sets `full_idx` (positions of the tokens being written) and `ring_idx` (their slots) before each
    forward. A prefill chunk's sliding layers attend over [ring as it was ; the chunk], then the chunk is written.
    """

    def __init__(self, layer_types: list[str], max_len: int, window: int | None):
        self.layer_types = layer_types
        self.max_len = max_len
        self.window = window
        self.ring = None if window is None else min(window, max_len)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # Set by the decoder before every forward (positions being written, and their ring slots).
        self.full_idx = torch.zeros(0, dtype=torch.long)
        self.ring_idx = torch.zeros(0, dtype=torch.long)

    def sliding(self, layer_idx: int) -> bool:
        return self.window is not None and self.layer_types[layer_idx] == "sliding_attention"

    def has(self, layer_idx: int) -> bool:
        """Whether the layer's buffers exist (made by its first update, in prefill)."""
        return layer_idx in self.keys

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    @torch.compiler.disable  # one compiled layer body serves every layer; the cache write stays eager
    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        if layer_idx not in self.keys:
            length = self.ring if self.ring is not None and self.sliding(layer_idx) else self.max_len
            shape = (k.shape[0], k.shape[1], length, k.shape[3])
            self.keys[layer_idx] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer_idx] = torch.zeros((*shape[:3], v.shape[3]), dtype=v.dtype, device=v.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if not self.sliding(layer_idx):
            keys.index_copy_(2, self.full_idx, k)
            values.index_copy_(2, self.full_idx, v)
            return keys, values
        if n == 1:
            keys.index_copy_(2, self.ring_idx, k)
            values.index_copy_(2, self.ring_idx, v)
            return keys, values
        out = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        keys.index_copy_(2, self.ring_idx, k)
        values.index_copy_(2, self.ring_idx, v)
        return out

    # transformers' attention code may ask these of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return True


@dataclass
class DecodeResult:
    tokens: list[int]
    prefill_s: float
    decode_s: float
    new_tokens: int
    graphed: bool
    kv_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


class LeanDecoder:
    """Greedy decoding of one sequence with a static cache; `graph=True` (CUDA only) replays one captured step.
    kv_cache: full-attention layers keep K/V as HLWQ codes in static buffers (pipeline.runtime.lean_kv: keys stored
    for k_eq_v layers too; sliding layers stay BF16 rings, so it needs sliding="bf16" on models that have them)."""

    def __init__(self, model: nn.Module, max_len: int, graph: bool | None = None, prefill_chunk: int | None = None,
                 compile_layers: bool = False, fused: bool = True, kv_cache: KVCacheConfig | None = None):  # fmt: skip
        self.model = model
        self.text, self.head, self.cfg = text_parts(model)
        self.device = next(self.text.layers[0].parameters()).device
        # An embedding kept in host RAM (to save VRAM) is read by a kernel from a pinned copy, inside the graph.
        emb = self.text.embed_tokens
        table = getattr(emb, "weight", None)
        self.host_table: torch.Tensor | None = None
        self.embed_scale: torch.Tensor | None = None
        if table is not None and table.device.type == "cpu" and self.device.type == "cuda":
            from pipeline.runtime.kernels import ops  # noqa: F401  (registers torch.ops.hlwq.gather_pinned)

            self.host_table = table.detach() if table.is_pinned() else table.detach().pin_memory()
            scale = getattr(emb, "embed_scale", getattr(getattr(emb, "inner", None), "embed_scale", None))
            self.embed_scale = None if scale is None else scale.to(self.device, table.dtype)
        n_layers = self.cfg.num_hidden_layers
        self.layer_types = list(getattr(self.cfg, "layer_types", None) or ["full_attention"] * n_layers)
        self.window = getattr(self.cfg, "sliding_window", None) if "sliding_attention" in self.layer_types else None
        self.max_len = max_len
        self.chunk = min(prefill_chunk or 512, self.window or max_len)
        self.softcap = getattr(self.cfg, "final_logit_softcapping", None)
        # Multimodal placeholder ids reach the text stack as the pad token, as in the multimodal model's own forward.
        special = [getattr(model.config, f"{kind}_token_id", None) for kind in ("image", "video", "audio")]
        self.special = torch.tensor([t for t in special if t is not None] or [-1], device=self.device)
        self.pad_id = getattr(self.cfg, "pad_token_id", None) or 0
        self.graph_enabled = (self.device.type == "cuda") if graph is None else graph
        self.gemma4_layers = "shared_kv_states" in inspect.signature(self.text.layers[0].forward).parameters
        # Decode steps run the layers it covers through gemma4_decode's step (fewer, fused kernels; compiled with
        # compile_layers); prefill keeps transformers' layers. fused=False: decode runs transformers' forward too.
        self.decode_layers = None
        if fused and self.gemma4_layers:
            from pipeline.runtime.gemma4_decode import DecodeLayers

            self.decode_layers = DecodeLayers(list(self.text.layers[:n_layers]), self.cfg, compile_step=compile_layers)
        covered = self.decode_layers.plans if self.decode_layers is not None else {}
        self._layer_call: Any = _call_layer
        if compile_layers and len(covered) < n_layers:
            # Decode steps of the layers the fused step does not cover run transformers' forward compiled: one body
            # for all of them (modules are graph inputs; the cache write is a graph break, its layer index a guard).
            # Prefill stays eager, so chunks of new lengths cost no recompilation.
            dyn = torch._dynamo.config
            dyn.recompile_limit = max(dyn.recompile_limit, 4 * len(self.text.layers))
            dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 16 * len(self.text.layers))
            from pipeline.runtime.gemma4_decode import compile_options

            self._layer_call = torch.compile(_call_layer, dynamic=False, options=compile_options())
        self.packed: PackedStaticKV | None = None
        if kv_cache is None:
            self.cache = StaticKV(self.layer_types, max_len, self.window)
        else:
            from pipeline.runtime.lean_kv import PackedStaticKV, check_config

            check_config(kv_cache, model, self.window)
            from pipeline.runtime.kv_cache import use_streaming_attention

            use_streaming_attention(model)  # prefill chunks read the packed prefix slice by slice (lean_kv._prefill)
            self.cache = self.packed = PackedStaticKV(self.layer_types, max_len, self.window, kv_cache, self.device)
        self._host_pos = 0  # position of the next decode step, as the host knows it (packed-cache flushes)
        # ring slots of the sliding layers: the window, or the whole sequence if shorter
        self.ring: int = self.cache.ring or 1
        self.slot_pos = torch.full((self.ring,), -1, dtype=torch.long, device=self.device)
        self.key_pos = torch.arange(max_len, device=self.device)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.step = torch.zeros(1, dtype=torch.long, device=self.device)
        self.out = torch.zeros(max_len, dtype=torch.long, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None

    # -- one forward over `n` tokens at positions pos..pos+n-1 --------------------------------------------------------
    def _masks(self, q_pos: torch.Tensor, decode: bool) -> dict[str, torch.Tensor]:
        qp = q_pos.view(-1, 1)
        p = self.packed
        if p is None:
            full = self.key_pos.view(1, -1) <= qp
        elif decode:  # the packed store's layout: [packed positions ; ring slots], read from device tensors
            packed = (self.key_pos < p.packed_len).view(1, -1).expand(qp.shape[0], -1)
            full = torch.cat([packed, (p.res_pos.view(1, -1) >= 0) & (p.res_pos.view(1, -1) <= qp)], dim=-1)
        else:  # a prefill chunk attends positions 0..start+n-1 in order (PackedStaticKV._prefill)
            full = self.key_pos[: p.start + qp.shape[0]].view(1, -1) <= qp
        masks = {"full_attention": full.view(1, 1, qp.shape[0], -1)}
        if self.window is not None:
            if decode:
                kp = self.slot_pos.view(1, -1)
            else:
                kp = torch.cat([self.slot_pos, q_pos]).view(1, -1)
            ok = (kp >= 0) & (kp <= qp) & (qp - kp < self.window)
            masks["sliding_attention"] = ok.view(1, 1, qp.shape[0], -1)
        return masks

    def _forward(self, ids: torch.Tensor, q_pos: torch.Tensor, decode: bool,
                 embeds: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        text = self.text
        self.cache.full_idx = q_pos
        if self.window is not None:
            self.cache.ring_idx = q_pos % self.ring
            if decode:
                self.slot_pos.index_copy_(0, self.cache.ring_idx, q_pos)
        if self.packed is not None:
            self.packed.decoding = decode
            self.packed.res_idx = q_pos % self.packed.res_slots
            if decode:
                self.packed.res_pos.index_copy_(0, self.packed.res_idx, q_pos)
        masks = self._masks(q_pos, decode)
        ids = self._text_ids(ids)
        h = self._embed(ids) if embeds is None else embeds
        position_ids = q_pos.view(1, -1)
        rope: dict[str, Any] = {}
        for lt in set(self.layer_types):
            try:
                rope[lt] = text.rotary_emb(h, position_ids, lt)
            except TypeError:  # single-rope models (Llama-style) take no layer type
                rope[lt] = text.rotary_emb(h, position_ids)
        per_layer = None
        if getattr(text, "hidden_size_per_layer_input", 0):
            per_layer = text.project_per_layer_inputs(h, text.get_per_layer_inputs(ids, h))  # not with host_table
        shared: dict[str, Any] = {}
        plans = self.decode_layers.plans if decode and self.decode_layers is not None else {}
        pending: Pending | None = None  # the last fused layer's final join, left for the next one's qkv matvec
        for i, layer in enumerate(text.layers[: self.cfg.num_hidden_layers]):
            lt = self.layer_types[i]
            if i in plans and self.cache.has(i):
                h, pending = self._step(i, h, rope[lt], masks[lt], pending)
                continue
            h, pending = self._finish(h, pending), None
            kwargs: dict[str, Any] = {"position_embeddings": rope[lt], "attention_mask": masks[lt],
                                      "position_ids": position_ids, "past_key_values": self.cache}  # fmt: skip
            if self.gemma4_layers:  # Gemma 4: per-layer inputs and shared K/V states
                kwargs["shared_kv_states"] = shared
                kwargs["per_layer_input"] = per_layer[:, :, i, :] if per_layer is not None else None
            out = self._layer_call(layer, h, kwargs) if decode else layer(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        h = self._finish(h, pending)
        if not decode and self.window is not None:
            self.slot_pos.index_copy_(0, self.cache.ring_idx[-self.ring :], q_pos[-self.ring :])
        h = text.norm(h[:, -1:])
        logits = self.head(h).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[:, -1]

    def _text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids with the multimodal placeholders as the pad token (what the text stack embeds)."""
        return torch.where(torch.isin(ids, self.special), self.pad_id, ids)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of _text_ids."""
        if self.host_table is not None:
            h = torch.ops.hlwq.gather_pinned(self.host_table, ids)
            return h * self.embed_scale if self.embed_scale is not None else h
        return self.text.embed_tokens(ids)  # type: ignore[no-any-return]

    def _prompt_embeds(self, ids: torch.Tensor, pixel_values: torch.Tensor,
                       image_position_ids: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """The prompt's embeddings with the vision tower's soft tokens in the image placeholders, as the multimodal
        model's own forward builds them."""
        image_id = getattr(self.model.config, "image_token_id", None)
        if image_id is None or not hasattr(self.model.model, "get_image_features"):
            raise ValueError(f"{type(self.model).__name__} takes no images in the lean decoder")
        if getattr(self.cfg, "use_bidirectional_attention", None) is not None:
            # images attended bidirectionally need block masks the lean decoder does not build
            raise ValueError("the lean decoder runs image prompts with causal attention only "
                             f"(use_bidirectional_attention={self.cfg.use_bidirectional_attention!r})")  # fmt: skip
        mask = ids == image_id
        h = self._embed(self._text_ids(ids))
        inner: Any = self.model.model
        dtype = next(inner.vision_tower.parameters()).dtype
        where = None if image_position_ids is None else image_position_ids.to(self.device)
        px = pixel_values.to(self.device, dtype)
        try:
            out = inner.get_image_features(px, where, return_dict=True)
        except TypeError:  # releases whose get_image_features returns the features themselves
            out = inner.get_image_features(px, where)
        feats = getattr(out, "pooler_output", out)
        feats = torch.cat(list(feats)) if isinstance(feats, list | tuple) else feats.reshape(-1, h.shape[-1])
        if feats.shape[0] != int(mask.sum()):
            raise ValueError(f"the image gives {feats.shape[0]} soft tokens; the prompt has {int(mask.sum())} slots")
        return h.masked_scatter(mask.unsqueeze(-1), feats.to(h.dtype))

    def _finish(self, h: torch.Tensor, pending: Pending | None) -> torch.Tensor:
        """The layer output a pending join stands for (only the fused step, hence decode_layers, leaves one)."""
        if pending is None:
            return h
        assert self.decode_layers is not None
        return self.decode_layers.finish(h, pending)  # type: ignore[no-any-return]

    def _step(self, i: int, h: torch.Tensor, rope: Any, mask: torch.Tensor,
              prev: Pending | None) -> tuple[torch.Tensor, Pending]:  # fmt: skip
        """Layer i on one token through the fused decode step, its key/value written to this cache's slot: (its
        residual before the last join, that join pending; gemma4_decode.finish makes the layer's output). `prev`:
        the previous layer's pending join, made inside this layer's qkv matvec."""
        assert self.decode_layers is not None
        spec, w = self.decode_layers.plans[i]
        cos, sin = rope
        hv = h.view(1, -1)
        if self.packed is not None and i in self.packed.layers:
            layer = self.packed.layers[i]
            at = (mask.reshape(-1), cos.reshape(-1), sin.reshape(-1))
            h2, y = self.decode_layers.packed_step(spec, w, hv, layer.tensors(), layer.bits, self.packed.res_idx, *at,
                                                   prev)  # fmt: skip
        else:
            slot = self.cache.ring_idx if self.cache.sliding(i) else self.cache.full_idx
            h2, y = self.decode_layers.step(spec, w, hv, self.cache.keys[i], self.cache.values[i], slot,
                                            mask.reshape(-1), cos.reshape(-1), sin.reshape(-1), prev)  # fmt: skip
        return h2.view_as(h), (y, w, spec.eps)

    def _decode_body(self) -> None:
        logits = self._forward(self.ids, self.pos, decode=True)
        nxt = logits.argmax(-1)
        self.ids.copy_(nxt.view(1, 1))
        self.out.index_copy_(0, self.step, nxt)
        self.pos.add_(1)
        self.step.add_(1)

    def _capture(self) -> None:
        state = [self.ids, self.pos, self.step, self.slot_pos]
        if self.packed is not None:
            state.append(self.packed.res_pos)  # the compressed cache's ring positions, written by the step too
        saved = [buf.clone() for buf in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode_body()  # warm-up: writes the same cache slots the first real step will overwrite
        torch.cuda.current_stream().wait_stream(side)
        for buf, old in zip(state, saved, strict=True):
            buf.copy_(old)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads may touch CUDA meanwhile (the chat engine captures in its worker)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._decode_body()
        self._graph = graph

    def _prefill(self, input_ids: torch.Tensor, new_tokens: int, pixel_values: torch.Tensor | None,
                 image_position_ids: torch.Tensor | None) -> None:  # fmt: skip
        """Run the prompt in chunks; leaves its greedy next token as the first output and the step state set."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("the lean decoder takes one sequence: input_ids of shape [1, n]")
        n = input_ids.shape[1]
        if n + new_tokens > self.max_len:
            raise ValueError(f"prompt {n} + {new_tokens} new tokens exceed the cache ({self.max_len} tokens)")
        ids = input_ids.to(self.device)
        self.slot_pos.fill_(-1)
        if self.packed is not None:
            self.packed.reset()
        logits = None
        embeds = None if pixel_values is None else self._prompt_embeds(ids, pixel_values, image_position_ids)
        for s in range(0, n, self.chunk):
            chunk = ids[:, s : s + self.chunk]
            q_pos = torch.arange(s, s + chunk.shape[1], device=self.device)
            part = None if embeds is None else embeds[:, s : s + self.chunk]
            if self.packed is not None:
                self.packed.start = s
            logits = self._forward(chunk, q_pos, decode=False, embeds=part)
            if self.packed is not None:
                self.packed.commit(s + chunk.shape[1])
        assert logits is not None
        first = logits.argmax(-1)
        self.out[0] = first[0]
        self.ids.copy_(first.view(1, 1))
        self.pos.fill_(n)
        self.step.fill_(1)
        self._host_pos = n

    def _advance(self) -> None:
        """One decode step: the captured graph's replay, or the same body eagerly."""
        if self.packed is not None:  # flush a block of the ring into the codes, eagerly, outside the captured step
            self.packed.settle(self._host_pos)
        if self.graph_enabled and self._graph is None:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
        else:
            self._decode_body()
        self._host_pos += 1

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, new_tokens: int, pixel_values: torch.Tensor | None = None,
                 image_position_ids: torch.Tensor | None = None) -> DecodeResult:  # fmt: skip
        """Greedy tokens after `input_ids` [1, n]; with `pixel_values` (and the processor's image_position_ids) the
        image placeholders of the prompt take the vision tower's soft tokens. The host reads the tokens once, at the
        end (the speed figure); `stream` hands them over one by one."""
        sync(self.device)
        t0 = time.perf_counter()
        self._prefill(input_ids, new_tokens, pixel_values, image_position_ids)
        sync(self.device)
        t1 = time.perf_counter()
        if self.graph_enabled and self._graph is None and new_tokens > 1:
            self._capture()
        sync(self.device)
        t2 = time.perf_counter()
        for _ in range(new_tokens - 1):
            self._advance()
        sync(self.device)
        t3 = time.perf_counter()
        return DecodeResult(self.out[:new_tokens].tolist(), t1 - t0, t3 - t2, new_tokens, self._graph is not None,
                            self.cache.nbytes(), {"capture_s": t2 - t1})  # fmt: skip

    def stream(self, input_ids: torch.Tensor, new_tokens: int, pixel_values: torch.Tensor | None = None,
               image_position_ids: torch.Tensor | None = None, stop_ids: Collection[int] = (),
               stop: Callable[[], bool] | None = None) -> Iterator[int]:  # fmt: skip
        """The greedy tokens of `generate`, each as soon as it is made (one host read per token, for a chat); ends
        after a token in `stop_ids` (yielded) or when `stop()` turns true."""
        with torch.inference_mode():
            self._prefill(input_ids, new_tokens, pixel_values, image_position_ids)
            tok = int(self.ids.item())
        for i in range(new_tokens):
            if i:
                if stop is not None and stop():
                    return
                with torch.inference_mode():  # per step: the consumer runs between tokens outside it
                    self._advance()
                    tok = int(self.ids.item())
            yield tok
            if tok in stop_ids:
                return
