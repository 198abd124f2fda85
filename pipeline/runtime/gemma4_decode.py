"""One Gemma-4 decoder layer for one new token, in few kernels: the decode step LeanDecoder runs on this family.

transformers' layer costs a 31B decode step ~6000 kernels and ~12 ms of GPU time beside the matvecs (measured:
bench/results/runtime_31b_profile_eager.json): each RMSNorm is five casts and reductions, grouped-query attention
copies the whole sliding cache (repeat_kv), and q, k and v each rotate the same input. Here q/k/v and gate/up are one
projection each where the weights allow it (HLWQ tiles concatenated: one activation rotation, one matvec launch),
query heads attend their KV head's cache in place, and the layer body is a function of tensors and a hashable spec,
so one torch.compile graph serves every layer of a kind and fuses the norms, rope, residuals and activation.
Layers it does not cover (per-layer inputs, MoE, KV-sharing readers and the layers they read, other activations,
6-bit or untiled HLWQ weights) keep transformers' forward.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quant.hadamard import rotate
from pipeline.runtime import kernels
from pipeline.runtime.kernels import kv_attention, layout
from pipeline.runtime.lean_kv import packed_attention
from pipeline.runtime.linear import HLWQLinear

log = logging.getLogger(__name__)
Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Part:
    """One launch of a projection: "hlwq" (tiled codes; tensors tiles, codebook, signs[, 1/smooth]) or "dense"
    (whatever F.linear takes as weight: BF16, a torchao INT4 tensor; tensors weight[, bias])."""

    kind: str
    rows: int
    cols: int
    bits: int = 0


@dataclass(frozen=True)
class Spec:
    """What is static about a layer: it keys the compiled graph, so equal specs share one."""

    qkv: tuple[Part, ...]
    qkv_split: tuple[int, ...]  # q, k[, v] widths
    mlp: tuple[Part, ...]
    mlp_split: tuple[int, int]  # gate, up
    o: tuple[Part, ...]
    down: tuple[Part, ...]
    heads: int
    kv_heads: int
    head_dim: int
    k_eq_v: bool  # no v_proj: values are the normalized raw keys
    scaling: float
    eps: float


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma-4's RMSNorm (float32 inside, gain applied as is, result in x's dtype)."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return (y if weight is None else y * weight.float()).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, d] with cos/sin [d] (rotate-half convention, as transformers applies it)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scaling: float) -> torch.Tensor:  # fmt: skip
    """One query token: q [Hq, d], cache keys/values [Hkv, L, d] read in place (query head h uses KV head h // g,
    transformers' repeat_kv order), mask [L] True = attend -> [Hq * d]."""
    hkv, _, d = keys.shape
    if kv_attention.dense_supported(q, keys, values, mask):
        return _split_grouped_attention(q, keys, values, mask, scaling)
    qg = q.view(hkv, -1, d).float()
    # Scores in fp32, as SDPA keeps them (a bf16 matmul rounds each score to 8 bits of significand). Compiled: one
    # fused reduction reads the bf16 cache and accumulates in fp32; eager: an fp32 copy of this layer's keys.
    if torch.compiler.is_compiling():
        s = (qg.unsqueeze(2) * keys.unsqueeze(1).float()).sum(-1)
    else:
        s = torch.matmul(qg, keys.float().transpose(1, 2))
    p = torch.softmax((s * scaling).masked_fill(~mask, float("-inf")), dim=-1).to(values.dtype)
    return torch.matmul(p, values).reshape(-1)  # probabilities in the cache dtype, as flash attention does


def _split_grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                             scaling: float) -> torch.Tensor:  # fmt: skip
    """grouped_attention on the GPU (kernels.kv_attention): only positions up to the last attended one are read (a
    static cache holds max_len), scores in fp32 from cache-dtype operands, as SDPA and flash attention compute them."""
    hkv, length, d = keys.shape
    idx = torch.arange(1, length + 1, device=mask.device)
    bound = torch.where(mask, idx, 0).amax().view(1)
    qs = (q.view(hkv, -1, d).float() * scaling).to(keys.dtype)
    o, m, l_ = torch.ops.hlwq.kv_dense_partials(qs, keys, values, mask, bound, kv_attention.splits_for(length, hkv))
    num, den = kv_attention.merge_partials(o, m, l_, m.amax(1))  # the token itself is attended: a finite max
    return (num / den.unsqueeze(-1)).reshape(-1).to(values.dtype)


def _unpack_hlwq(ts: Tensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An HLWQ part's tensors as _hlwq_tensors packs them: tiles, codebook, signs[, 1/smooth] (FORMAT v2 column
    smoothing: the codes hold W·diag(s)) -> (tiles, codebook, signs, 1/smooth or None)."""
    return ts[0], ts[1], ts[2], ts[3] if len(ts) > 3 else None


def _one_gpu_hlwq(parts: tuple[Part, ...], x: torch.Tensor) -> bool:
    """Whether a projection is one HLWQ part on the GPU: the shape whose matvec can make its own input."""
    return len(parts) == 1 and parts[0].kind == "hlwq" and x.is_cuda


def _hlwq_matvec(x: torch.Tensor, ts: Tensors, part: Part) -> torch.Tensor:
    tiles, codebook, signs, inv_smooth = _unpack_hlwq(ts)
    if x.is_cuda:
        return kernels.tiled_linear(x, tiles, codebook, signs, part.bits, part.rows, inv_smooth)  # type: ignore[no-any-return]
    # CPU: the kernel's own arithmetic from the same tiled bytes (layout.tiled_matvec), so tests cover the fusion
    xs = x.float() if inv_smooth is None else x.float() * inv_smooth
    xr = rotate(xs, signs).reshape(x.shape[0], -1).double()
    return layout.tiled_matvec(xr, tiles, codebook, part.rows, part.bits).to(x.dtype)


def project(parts: tuple[Part, ...], tensors: tuple[Tensors, ...], x: torch.Tensor) -> torch.Tensor:
    """x [1, cols] -> [1, Σ rows]: each part's launch, outputs side by side."""
    outs = []
    for part, ts in zip(parts, tensors, strict=True):
        if part.kind == "hlwq":
            outs.append(_hlwq_matvec(x, ts, part))
        else:
            outs.append(F.linear(x, ts[0], ts[1] if len(ts) > 1 else None))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def project_glu(parts: tuple[Part, ...], tensors: tuple[Tensors, ...], gu: torch.Tensor) -> torch.Tensor:
    """project(parts, tensors, gelu(gate, tanh) · up) for gu [1, 2K] = [gate | up]: one HLWQ part on the GPU makes the
    product inside its matvec (kernels.tiled_glu_linear), no elementwise kernel between the two projections."""
    if _one_gpu_hlwq(parts, gu):
        tiles, codebook, signs, inv_smooth = _unpack_hlwq(tensors[0])
        return kernels.tiled_glu_linear(gu, tiles, codebook, signs, parts[0].bits, parts[0].rows, inv_smooth)  # type: ignore[no-any-return]
    gate, up = gu.split(gu.shape[-1] // 2, dim=-1)
    return project(parts, tensors, F.gelu(gate, approximate="tanh") * up)


def project_norm2(parts: tuple[Part, ...], tensors: tuple[Tensors, ...], x: torch.Tensor, h: torch.Tensor,
                  eps: float, w: dict[str, Any], w1: str, w2: str, pw: dict[str, Any] | None = None,
                  scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(project(parts, tensors, rms_norm(h2, w[w2])), h2) with h2 = (h + rms_norm(x, pw[w1])) [· pw's layer_scalar]
    (pw: the weights the join's gain comes from, w by default): a residual join and the next projection's pre-norm.
    One HLWQ part on the GPU makes both inside its matvec (kernels.tiled_norm2_linear), from the float32 copies."""
    pw = w if pw is None else pw
    g1, g2 = pw["f32"].get(w1), w["f32"].get(w2)
    s32 = pw["f32"].get("layer_scalar") if scaled else None
    if _one_gpu_hlwq(parts, x) and g1 is not None and g2 is not None and (s32 is not None or not scaled):
        tiles, codebook, signs, inv_smooth = _unpack_hlwq(tensors[0])
        fused = kernels.tiled_norm2_linear(x, h, g1, g2, eps, tiles, codebook, signs, parts[0].bits, parts[0].rows,
                                           inv_smooth, s32)  # fmt: skip
        if fused is not None:
            return fused[0], fused[1]
    h2 = join(h, x, pw, w1, eps, scaled)
    return project(parts, tensors, rms_norm(h2, w[w2], eps)), h2


def join(h: torch.Tensor, x: torch.Tensor, w: dict[str, Any], gain: str, eps: float, scaled: bool) -> torch.Tensor:
    """The residual stream after a block: h + rms_norm(x, w[gain]), times the layer scalar where `scaled`."""
    h2 = h + rms_norm(x, w[gain], eps)
    return h2 * w["layer_scalar"] if scaled else h2


# A layer's last join, left for the next layer's qkv matvec to make: (its MLP output y, its weights, eps). h then holds
# the layer's residual before the MLP joins it; finish() makes the layer's output from both.
Pending = tuple[torch.Tensor, dict[str, Any], float]


def finish(h: torch.Tensor, pending: Pending | None) -> torch.Tensor:
    """The layer output a pending join stands for: (h + rms_norm(y, post_ffn_norm)) · layer_scalar."""
    if pending is None:
        return h
    y, w, eps = pending
    return join(h, y, w, "post_ffn_norm", eps, True)


def _qkv(spec: Spec, w: dict[str, Any], h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         prev: Pending | None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The token's query [heads, d], key and value [1, Hkv, 1, d] (normed, rope on q and k), and the layer's input
    residual: with `prev`, the previous layer's last join is made here (inside the qkv matvec on the GPU)."""
    d = spec.head_dim
    if prev is not None and prev[2] != spec.eps:  # one eps for both norms inside the matvec: else join first
        h, prev = finish(h, prev), None
    if prev is None:
        qkv = project(spec.qkv, w["qkv"], rms_norm(h, w["input_norm"], spec.eps))
    else:
        qkv, h = project_norm2(spec.qkv, w["qkv"], prev[0], h, spec.eps, w, "post_ffn_norm", "input_norm", prev[1],
                               scaled=True)  # fmt: skip
    qkv = qkv.split(spec.qkv_split, dim=-1)
    q = rope(rms_norm(qkv[0].view(spec.heads, d), w["q_norm"], spec.eps), cos, sin)
    raw_k = qkv[1].view(spec.kv_heads, d)
    k = rope(rms_norm(raw_k, w["k_norm"], spec.eps), cos, sin)
    v = rms_norm(raw_k if spec.k_eq_v else qkv[2].view(spec.kv_heads, d), None, spec.eps)
    return q, k.view(1, spec.kv_heads, 1, d), v.view(1, spec.kv_heads, 1, d), h


def _after_attention(spec: Spec, w: dict[str, Any], h: torch.Tensor,
                     a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The rest of the layer from the attention output a [1, heads * d], up to its last join: (the residual after
    the attention block, the MLP output y); finish() or the next layer's qkv makes the layer's output."""
    o = project(spec.o, w["o"], a)
    gu, h = project_norm2(spec.mlp, w["mlp"], o, h, spec.eps, w, "post_attn_norm", "pre_ffn_norm")
    if spec.mlp_split[0] == spec.mlp_split[1]:  # [gate | up] of equal width: the GLU input made where it is read
        y = project_glu(spec.down, w["down"], gu)
    else:
        gate, up = gu.split(spec.mlp_split, dim=-1)
        y = project(spec.down, w["down"], F.gelu(gate, approximate="tanh") * up)
    return h, y


def layer_step(spec: Spec, w: dict[str, Any], h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               slot: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               prev: Pending | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """h [1, hidden] (with `prev`: the previous layer's residual before its last join) -> (the residual before this
    layer's last join, its MLP output y): finish(h, (y, w, spec.eps)) is the layer's output. Writes this token's
    key/value into keys/values [1, Hkv, L, d] at `slot`."""
    q, k, v, h = _qkv(spec, w, h, cos, sin, prev)
    keys.index_copy_(2, slot, k)
    values.index_copy_(2, slot, v)
    a = grouped_attention(q, keys[0], values[0], mask, spec.scaling).view(1, -1)
    return _after_attention(spec, w, h, a)


def packed_layer_step(spec: Spec, w: dict[str, Any], h: torch.Tensor, store: Tensors, bits: int,
                      slot: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      prev: Pending | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """layer_step over a compressed store (lean_kv.PackedLayer.tensors()): the token's key/value go to the ring at
    `slot`; mask [max_len + ring] covers the packed positions, then the ring slots."""
    q, k, v, h = _qkv(spec, w, h, cos, sin, prev)
    store[4].index_copy_(2, slot, k)
    store[5].index_copy_(2, slot, v)
    a = packed_attention(q, store, bits, mask, spec.scaling).view(1, -1)
    return _after_attention(spec, w, h, a)


# -- building a layer's plan from the transformers modules -------------------------------------------------------


def _same_smoothing(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _fusable(mods: list[Any]) -> bool:
    """HLWQ modules one tiled launch can serve: same input, bits, codebook, sign diagonal and smoothing vector (the
    stats stage gives q/k/v one and gate/up one), no bias, whole 16-row tiles each (their tiles concatenate)."""
    if not all(isinstance(m, HLWQLinear) and m.tiles is not None for m in mods):
        return False
    first = mods[0]
    return all(
        m.bits == first.bits and m.in_features == first.in_features and m.bias is None
        and m.out_features % layout.TILE_ROWS == 0 and torch.equal(m.codebook, first.codebook)
        and torch.equal(m.signs, first.signs) and _same_smoothing(m.smooth, first.smooth)
        for m in mods
    )  # fmt: skip


def _hlwq_tensors(m: Any, tiles: torch.Tensor) -> Tensors:
    base = (tiles, m.codebook, m.signs)
    inv = kernels.inv_smooth(m)  # the module's own cached 1/s, which its native forward uses too
    return base if inv is None else (*base, inv)


def _part(m: Any) -> tuple[Part, Tensors]:
    if isinstance(m, HLWQLinear):
        if m.tiles is None or m.bias is not None:
            raise _Unsupported(f"an HLWQLinear the decode step does not run ({m.extra_repr()})")
        return Part("hlwq", m.out_features, m.in_features, m.bits), _hlwq_tensors(m, m.tiles)
    if isinstance(m, nn.Linear):
        ts = (m.weight,) if m.bias is None else (m.weight, m.bias)
        return Part("dense", m.out_features, m.in_features), ts
    raise _Unsupported(f"a {type(m).__name__} projection")


def _fused_tiles(mods: list[Any]) -> torch.Tensor:
    """One tiles buffer for the modules, rows in order: the one an earlier plan made (a second decoder on the same
    model), else a new one; each module's tiles then become its view of it (no second copy)."""
    base = mods[0].tiles._base
    total = sum(m.tiles.shape[0] for m in mods)
    if base is None or any(m.tiles._base is not base for m in mods) or base.shape[0] != total \
            or mods[0].tiles.data_ptr() != base.data_ptr():  # fmt: skip
        base = torch.cat([m.tiles for m in mods], dim=0)
    at = 0
    for m in mods:
        n = m.tiles.shape[0]
        m.tiles = base[at : at + n]
        at += n
    return base  # type: ignore[no-any-return]


def fuse(mods: list[Any]) -> tuple[tuple[Part, ...], tuple[Tensors, ...]]:
    """Launch parts for projections of one input: one for fusable HLWQ modules (their tiles concatenated; the modules
    still compute and save as before), else one per module."""
    if len(mods) > 1 and _fusable(mods):
        first = mods[0]
        rows = sum(m.out_features for m in mods)
        part = Part("hlwq", rows, first.in_features, first.bits)
        return (part,), (_hlwq_tensors(first, _fused_tiles(mods)),)
    pairs = [_part(m) for m in mods]
    return tuple(p for p, _ in pairs), tuple(t for _, t in pairs)


class _Unsupported(Exception):
    """A layer the decode step does not cover (it keeps transformers' forward)."""


def _norm_weight(norm: Any, dim: int) -> torch.Tensor | None:
    """The gain rms_norm applies, after checking on a probe that it computes what the module computes (a release
    whose RMSNorm differs, e.g. a (1 + w) gain, keeps transformers' forward rather than run the wrong math)."""
    weight = getattr(norm, "weight", None) if getattr(norm, "with_scale", True) else None
    eps = float(getattr(norm, "eps", 1e-6))
    device = weight.device if weight is not None else torch.device("cpu")
    probe = torch.randn(2, dim, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        if not torch.allclose(norm(probe), rms_norm(probe, weight, eps), rtol=1e-4, atol=1e-5):
            raise _Unsupported(f"an RMSNorm ({type(norm).__name__}) that is not Gemma-4's")
    return weight


def plan_layer(layer: Any, cfg: Any, kv_readers: bool = False) -> tuple[Spec, dict[str, Any]]:
    """(spec, tensors) for one Gemma-4 decoder layer; raises _Unsupported where transformers' forward must run.
    `kv_readers`: some layer of the model reads another's K/V (KV sharing), so layers that publish theirs must run
    transformers' forward, which does the publishing."""
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(layer, "hidden_size_per_layer_input", 0) or getattr(layer, "enable_moe_block", False):
        raise _Unsupported("per-layer inputs or an MoE block")
    if getattr(attn, "is_kv_shared_layer", False):
        raise _Unsupported("KV sharing (reads another layer's K/V)")
    # transformers 5.17 flags the last layer of each kind as a publisher even when no layer reads (the 31B config)
    if kv_readers and getattr(attn, "store_full_length_kv", False):
        raise _Unsupported("KV sharing (publishes its K/V to later layers)")
    if getattr(cfg, "hidden_activation", None) != "gelu_pytorch_tanh":
        raise _Unsupported(f"activation {getattr(cfg, 'hidden_activation', None)!r}")
    d = attn.head_dim
    v_proj = getattr(attn, "v_proj", None)
    qkv_mods = [attn.q_proj, attn.k_proj] + ([v_proj] if v_proj is not None else [])
    qkv, qkv_t = fuse(qkv_mods)
    mlp_parts, mlp_t = fuse([mlp.gate_proj, mlp.up_proj])
    o, o_t = fuse([attn.o_proj])
    down, down_t = fuse([mlp.down_proj])
    hidden = attn.q_proj.in_features
    spec = Spec(
        qkv=qkv, qkv_split=tuple(m.out_features for m in qkv_mods), mlp=mlp_parts,
        mlp_split=(mlp.gate_proj.out_features, mlp.up_proj.out_features), o=o, down=down,
        heads=attn.q_proj.out_features // d, kv_heads=attn.k_proj.out_features // d, head_dim=d,
        k_eq_v=v_proj is None, scaling=float(attn.scaling), eps=float(layer.input_layernorm.eps),
    )  # fmt: skip
    w = {
        "input_norm": _norm_weight(layer.input_layernorm, hidden), "q_norm": _norm_weight(attn.q_norm, d),
        "k_norm": _norm_weight(attn.k_norm, d), "post_attn_norm": _norm_weight(layer.post_attention_layernorm, hidden),
        "pre_ffn_norm": _norm_weight(layer.pre_feedforward_layernorm, hidden),
        "post_ffn_norm": _norm_weight(layer.post_feedforward_layernorm, hidden),
        "layer_scalar": layer.layer_scalar, "qkv": qkv_t, "mlp": mlp_t, "o": o_t, "down": down_t,
    }  # fmt: skip
    _norm_weight(attn.v_norm, d)  # checked: the step normalizes values without a gain
    # project_norm2's fused launch reads the gains and the layer scalar as float32 (rms_norm applies weight.float()):
    # cast once here, so a plan is made after the weights are final (as the decoders make theirs)
    scalar = w["layer_scalar"]
    w["f32"] = {k: w[k].float().contiguous() for k in ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")
                if w[k] is not None}  # fmt: skip
    if isinstance(scalar, torch.Tensor) and scalar.numel() == 1:
        w["f32"]["layer_scalar"] = scalar.float().reshape(1).contiguous()
    return spec, w


def compile_options() -> dict[str, Any]:
    """Inductor options of the decode step's torch.compile: its Triton kernels launch programmatically (PDL) on
    Hopper and later (inductor skips it elsewhere), so each one's launch overlaps the kernel before it: 31B Q5 decode
    103.46 tok/s against 100.8 without (bench/results/runtime_31b_inductor_pdl_ab.json, where the same inductor
    option came from TORCHINDUCTOR_ENABLE_PDL=1). HLWQ_INDUCTOR_PDL=0 turns it off (A/B runs); releases without
    the option get none."""
    import torch._inductor.config as inductor

    if os.environ.get("HLWQ_INDUCTOR_PDL", "1") == "0" or not hasattr(inductor.triton, "enable_pdl"):
        return {}
    return {"triton.enable_pdl": True}


class DecodeLayers:
    """Plans for the layers the decode step covers (index -> (spec, tensors)); equal specs are one object, so a
    compiled step guards on few of them."""

    def __init__(self, layers: list[nn.Module], cfg: Any, compile_step: bool = False):
        self.plans: dict[int, tuple[Spec, dict[str, Any]]] = {}
        self.skipped: dict[int, str] = {}  # layer -> why it keeps transformers' forward
        specs: dict[Spec, Spec] = {}
        readers = any(getattr(getattr(layer, "self_attn", None), "is_kv_shared_layer", False) for layer in layers)
        for i, layer in enumerate(layers):
            try:
                spec, w = plan_layer(layer, cfg, readers)
            except (_Unsupported, AttributeError) as exc:
                log.info("layer %d keeps transformers' forward: %s", i, exc)
                self.skipped[i] = str(exc)
                continue
            self.plans[i] = (specs.setdefault(spec, spec), w)
        options = compile_options()
        if compile_step:
            # Per spec up to three step graphs (no pending join, a pending join, one of another eps), plus finish's.
            dyn = torch._dynamo.config
            dyn.recompile_limit = max(dyn.recompile_limit, 3 * len(set(specs)) + 2)
        self.step = torch.compile(layer_step, dynamic=False, options=options) if compile_step else layer_step
        # A pending join made on its own (before a layer the step does not cover, after the last): one fused kernel.
        self.finish = torch.compile(finish, dynamic=False, options=options) if compile_step else finish
        self.packed_step = (
            torch.compile(packed_layer_step, dynamic=False, options=options) if compile_step else packed_layer_step
        )
