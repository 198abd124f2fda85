"""Stage stats: activation statistics of the float model on seeded random tokens, once, before quantize.

The text decoder is built from the source config with its parameters on the meta device; a forward pre-hook on
each decoder layer loads that layer's weights from the source shards and a forward hook frees them, so memory holds
one layer (plus the embedding and the activations of the N x L tokens). Per quantized linear it records:
  E[x_i²] per input channel (the smoothing statistics), the column energy summed over the linears that read the same
  input tensor (q/k/v; gate/up), and a sensitivity: the relative error of the decoder layer's output when that one
  weight gets HLWQ-like noise (error spread evenly over each 128-block, in the smoothed basis) — what bit allocation
  ranks tensors by.
Written to <workdir>/stats/stats.safetensors (F32 vectors; the per-tensor records as JSON metadata; no pickle).
"""

from __future__ import annotations

import json
import logging
import math
import typing
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pipeline import shards
from pipeline.context import Context
from pipeline.errors import IntegrityError, StageError
from pipeline.manifest import Manifest, Smooth, params_hash
from pipeline.quant import smooth as smooth_math

NAME = "stats"
UNIT = "stats"
FILE = "stats/stats.safetensors"
STATS_VERSION = 1
ACT, COL = ".act_sq", ".col_sq"
PROBE_BITS_MSE = 0.0095010  # Lloyd-Max MSE on N(0,1) at 4 bits: the probe noise level (relative weight MSE)
log = logging.getLogger(__name__)


@dataclass
class LinearStats:
    """What one quantized linear's input looked like over the random tokens."""

    shape: tuple[int, int]
    act_sum: torch.Tensor  # float64 [C]: sum of x_i² over tokens
    tokens: int = 0
    group: int = -1  # linears reading the same input tensor share a group id
    col_sq: torch.Tensor | None = None
    sensitivity: float = 0.0  # relative layer-output error per unit of relative weight MSE


@dataclass
class Stats:
    tensors: dict[str, LinearStats] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def act_sq(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        return (t.act_sum / max(t.tokens, 1)).float()


# ---------------------------------------------------------------------------------------------------- the model


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def random_ids(config: Any, sequences: int, length: int, seed: int) -> torch.Tensor:
    """[sequences, length] seeded token ids: BOS first (real prompts start with it; its attention-sink activations
    matter), then uniform ids below every special multimodal id inside the vocabulary (and above the first 16)."""
    text = _text_config(config)
    vocab = text.vocab_size
    keys = ("boi_token_id", "image_token_id", "eoi_token_id", "video_token_id", "audio_token_id", "boa_token_id")
    specials = [getattr(config, k, None) for k in keys]
    high = min([vocab, *[s for s in specials if isinstance(s, int) and 16 < s < vocab]])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(16, high - 1), high, (sequences, length), generator=g)
    bos = getattr(text, "bos_token_id", None) or getattr(config, "bos_token_id", None)
    if isinstance(bos, int) and 0 <= bos < vocab:
        ids[:, 0] = bos
    return ids


def load_config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))  # never trust_remote_code
    except (OSError, ValueError) as e:
        raise IntegrityError(f"stats: cannot read the source config.json ({e})") from None


def build_decoder(config: Any, dtype: torch.dtype) -> nn.Module:
    """The text decoder (AutoModel of the text config) with its parameters on meta; buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # buffers computed at construction (rotary frequencies) in the compute dtype
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModel.from_config(_text_config(config))
    finally:
        torch.set_default_dtype(old)
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise IntegrityError(f"stats: {type(model).__name__} has no decoder layer list ('layers')")
    return model.eval()


def checkpoint_prefix(model: nn.Module, names: set[str]) -> str:
    """The prefix that maps the decoder's parameter names onto the checkpoint's ('model.' for Llama,
    'model.language_model.' for Gemma 4): the one under which its first layer's parameters all exist."""
    own = [n for n, _ in model.named_parameters() if n.startswith("layers.0.")]
    candidates = {n[: -len(own[0])] for n in names if n.endswith(own[0])}
    for prefix in sorted(candidates, key=len):
        if all(prefix + n in names for n in own):
            return prefix
    raise IntegrityError(f"stats: no checkpoint tensors for the decoder's layer 0 (looked for '*{own[0]}')")


class ShardSource:
    """Reads checkpoint tensors by name from the shards (one open file per shard, memory-mapped)."""

    def __init__(self, folder: Path, shard_map: dict[str, list[str]]):
        self._where = {n: folder / shard for shard, ns in shard_map.items() for n in ns}
        self._open: dict[Path, Any] = {}

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        path = self._where[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_tensor(name)


def _set(model: nn.Module, name: str, value: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        old = owner._parameters[attr]
        assert old is not None
        t = torch.empty_like(old, device="meta") if value is None else value.to(device=device, dtype=dtype)
        owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
    elif value is not None:
        cast = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        owner._buffers[attr] = cast


# ---------------------------------------------------------------------------------------------------- collection


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _block_noise(w: torch.Tensor, s: torch.Tensor, block: int, g: torch.Generator) -> torch.Tensor:
    """HLWQ-like error for W: Gaussian in the smoothed basis, each row-block's error energy PROBE x its energy, so the
    error spreads evenly over a block as the rotation makes it; returned in the original basis."""
    ws = smooth_math.apply(w, s)
    rows, cols = ws.shape
    nb = -(-cols // block)
    padded = torch.nn.functional.pad(ws, (0, nb * block - cols)).reshape(rows, nb, block)
    rms = padded.pow(2).mean(-1, keepdim=True).sqrt()
    noise = torch.randn(padded.shape, generator=g, device="cpu").to(w.device) * rms * math.sqrt(PROBE_BITS_MSE)
    return smooth_math.unapply(noise.reshape(rows, nb * block)[:, :cols], s)


def _first(obj: Any, full: int, k: int) -> Any:
    """The first k sequences of every batch-major tensor in (nested) args; broadcast and other values unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj[:k] if obj.dim() > 0 and obj.shape[0] == full and k < full else obj
    if isinstance(obj, tuple):
        return tuple(_first(v, full, k) for v in obj)
    if isinstance(obj, list):
        return [_first(v, full, k) for v in obj]
    if isinstance(obj, dict) and type(obj) is dict:
        return {key: _first(v, full, k) for key, v in obj.items()}
    return obj


class Source(typing.Protocol):
    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


def collect(config: Any, src: Source, quantized: Callable[[str, tuple[int, ...]], bool], cfg: Smooth,
            device: torch.device, block_size: int = 128,
            progress: Callable[[int, int], None] | None = None) -> Stats:  # fmt: skip
    """Run the float decoder over cfg.sequences x cfg.length random tokens, one layer in memory at a time;
    `progress(done, total)` after each layer (its probes included)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_decoder(config, dtype)
    prefix = checkpoint_prefix(model, src.names())
    layers: nn.ModuleList = model.layers  # type: ignore[assignment]
    layer_of = {id(m): i for i, m in enumerate(layers)}
    in_layers = {n for n, _ in model.named_parameters() if n.startswith("layers.")}
    for n, _ in model.named_parameters():  # everything outside the layers: the embedding, the final norm
        if n not in in_layers:
            if prefix + n not in src.names():
                raise IntegrityError(f"stats: the checkpoint has no tensor {prefix + n}")
            _set(model, n, src.get(prefix + n), device, dtype)
    for n, b in model.named_buffers():  # checkpoint buffers (e.g. Gemma 4's layer_scalar); the rest as built
        _set(model, n, src.get(prefix + n) if prefix + n in src.names() else b, device, dtype)

    stats = Stats()
    linears: dict[int, dict[str, nn.Linear]] = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.startswith("layers."):
            full = f"{prefix}{n}.weight"
            if quantized(full, (m.out_features, m.in_features)):
                linears.setdefault(int(n.split(".")[1]), {})[full] = m
    # Input tensors seen in the running layer, held so their memory is not reused: linears fed the very same tensor
    # object (q/k/v; gate/up) form one group.
    seen_inputs: list[tuple[torch.Tensor, int]] = []
    group_ids = iter(range(1 << 30))
    probing = [False]
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if probing[0]:
                return
            x = args[0].detach()
            if name not in stats.tensors:
                lin = typing.cast(nn.Linear, module)
                rows, cols = lin.out_features, lin.in_features
                stats.tensors[name] = LinearStats((rows, cols), torch.zeros(cols, dtype=torch.float64))
            st = stats.tensors[name]
            st.act_sum += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0).cpu()
            st.tokens += x.numel() // x.shape[-1]
            gid = next((g for t, g in seen_inputs if t is args[0]), None)
            if gid is None:
                gid = next(group_ids)
                seen_inputs.append((args[0], gid))
            st.group = gid

        return hook

    def load(module: nn.Module, args: tuple[Any, ...]) -> None:
        if probing[0]:
            return
        i = layer_of[id(module)]
        for n in (n for n in in_layers if n.startswith(f"layers.{i}.")):
            _set(model, n, src.get(prefix + n), device, dtype)

    def finish(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        if probing[0]:  # a probe's own re-run of the layer
            return out
        i = layer_of[id(module)]
        mine = {n: m for n, m in linears.get(i, {}).items() if n in stats.tensors}
        groups: dict[int, list[str]] = {}
        for n in mine:
            groups.setdefault(stats.tensors[n].group, []).append(n)
        for members in groups.values():
            col = smooth_math.column_energy([mine[n].weight.detach() for n in members]).cpu()
            for n in members:
                stats.tensors[n].col_sq = col
        if cfg.probe:
            out = _probe(module, args, kwargs, out, mine)
        for n in (n for n in in_layers if n.startswith(f"layers.{i}.")):
            _set(model, n, None, device, dtype)
        seen_inputs.clear()
        if progress is not None:
            progress(i + 1, len(layers))
        return out

    def _probe(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
               mine: dict[str, nn.Linear]) -> Any:  # fmt: skip
        full = args[0].shape[0]
        k = min(full, cfg.probe_sequences)
        ref = (out[0] if isinstance(out, tuple) else out)[:k].float()
        base = ref.pow(2).sum(-1).clamp_min(1e-30)
        p_args, p_kwargs = _first(args, full, k), _first(kwargs, full, k)
        # Layers may write shared state into dict arguments (Gemma 4's shared KV): keep the clean entries.
        saved = {key: dict(v) for key, v in kwargs.items() if isinstance(v, MutableMapping)}
        probing[0] = True
        try:
            for n, m in sorted(mine.items()):
                st = stats.tensors[n]
                assert st.col_sq is not None
                s = smooth_math.smoothing_vector(stats.act_sq(n), st.col_sq, cfg.alpha, cfg.max_ratio)
                w = m.weight.data
                wf = w.float()  # one float32 copy (a 21504 x 5376 weight: 0.46 GB), not two
                m.weight.data = (wf + _block_noise(wf, s.to(w.device), block_size, g)).to(w.dtype)
                del wf
                try:
                    noisy = module(*p_args, **p_kwargs)
                finally:
                    m.weight.data = w
                y = (noisy[0] if isinstance(noisy, tuple) else noisy).float()
                # Per token, so the BOS token's huge residual norm does not drown every other position.
                st.sensitivity = float(((y - ref).pow(2).sum(-1) / base).mean()) / PROBE_BITS_MSE
        finally:
            probing[0] = False
            for key, v in saved.items():
                kwargs[key].clear()
                kwargs[key].update(v)
        return out

    handles = [layer.register_forward_pre_hook(load) for layer in layers]
    handles += [layer.register_forward_hook(finish, with_kwargs=True) for layer in layers]
    for named in linears.values():
        handles += [m.register_forward_pre_hook(record(n)) for n, m in named.items()]
    ids = random_ids(config, cfg.sequences, cfg.length, cfg.seed).to(device)
    with _hooks(handles), torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    missing = sorted(n for named in linears.values() for n in named if n not in stats.tensors)
    if missing:  # e.g. k/v of layers that reuse another layer's KV: never run, so not smoothed
        log.info("stats: %d quantized linears saw no input (left unsmoothed), e.g. %s", len(missing), missing[0])
    stats.meta = {"stats_version": STATS_VERSION, "sequences": cfg.sequences, "length": cfg.length,
                  "seed": cfg.seed, "alpha": cfg.alpha, "max_ratio": cfg.max_ratio, "probe": cfg.probe,
                  "tokens": cfg.sequences * cfg.length, "model_type": _text_config(config).model_type}  # fmt: skip
    return stats


# ---------------------------------------------------------------------------------------------------- the file


def save(stats: Stats, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    records = {}
    for n, t in sorted(stats.tensors.items()):
        tensors[n + ACT] = stats.act_sq(n).contiguous()
        tensors[n + COL] = (t.col_sq if t.col_sq is not None else torch.ones(t.shape[1])).float().contiguous()
        records[n] = {"shape": list(t.shape), "group": t.group, "tokens": t.tokens, "sensitivity": t.sensitivity}
    meta = {"hlwq_stats": json.dumps({**stats.meta, "tensors": records}, sort_keys=True)}
    plan = [(n, "F32", tuple(v.shape)) for n, v in tensors.items()]
    shards.StreamingWriter(plan, {"format": "pt", **meta}).write(path, iter(tensors.items()))


@dataclass(frozen=True)
class Loaded:
    """The stats file as the quantize stage uses it."""

    act_sq: dict[str, torch.Tensor]
    col_sq: dict[str, torch.Tensor]
    records: dict[str, dict[str, Any]]
    meta: dict[str, Any]

    def smoothing_vector(self, name: str, cfg: Smooth) -> torch.Tensor | None:
        if name not in self.act_sq:
            return None
        return smooth_math.smoothing_vector(self.act_sq[name], self.col_sq[name], cfg.alpha, cfg.max_ratio)


def load(path: Path) -> Loaded:
    try:
        with safe_open(str(path), framework="pt") as f:
            body = json.loads((f.metadata() or {})["hlwq_stats"])
            act = {k.removesuffix(ACT): f.get_tensor(k) for k in f.keys() if k.endswith(ACT)}
            col = {k.removesuffix(COL): f.get_tensor(k) for k in f.keys() if k.endswith(COL)}
    except (OSError, KeyError, json.JSONDecodeError, Exception) as e:  # safetensors raises its own error types
        raise IntegrityError(f"stats file {path} is unreadable ({type(e).__name__}); rerun the stats stage") from None
    if body.get("stats_version") != STATS_VERSION:
        raise IntegrityError(f"stats file {path}: version {body.get('stats_version')!r} is not {STATS_VERSION}")
    records = body.pop("tensors")
    return Loaded(act, col, records, body)


# ---------------------------------------------------------------------------------------------------- the stage


def needed(manifest: Manifest) -> bool:
    return manifest.quantize.smooth is not None or manifest.quantize.target_bpw is not None


def settings(manifest: Manifest) -> Smooth:
    """Smoothing settings; allocation without smoothing still needs the pass (for the sensitivities): defaults.
    The sensitivities serve only quantize.target_bpw, so without it the probe (each linear's layer re-run with noise)
    is skipped: smoothing reads E[x²] and column energies alone, and the pass costs a fraction."""
    cfg = manifest.quantize.smooth or Smooth()
    return cfg if manifest.quantize.target_bpw is not None else replace(cfg, probe=False)


def fingerprint(ctx: Context) -> dict[str, str]:
    shas = {u: (ctx.state.read("download", u) or {}).get("info", {}).get("sha256", "") for u in ctx.units}
    inputs = params_hash({"shards": shas, "files": ctx.source.files})
    q = ctx.manifest.quantize
    params = {"smooth": settings(ctx.manifest), "keep": q.keep_bf16, "min": q.min_elements, "b": q.block_size,
              "v": STATS_VERSION}  # fmt: skip
    return {"inputs": inputs, "params": params_hash(params)}


def run(ctx: Context) -> dict[str, Any]:
    from stages.quantize import is_quantized

    out = ctx.workdir / FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    shards.remove_stale_temps(out)
    m = ctx.manifest
    cfg = settings(m)
    try:
        src = ShardSource(ctx.source.folder, ctx.source.shards)
        stats = collect(load_config(ctx.source.folder), src, lambda n, shape: is_quantized(m, n, shape), cfg,
                        ctx.device, m.quantize.block_size)  # fmt: skip
    except IntegrityError:
        raise
    except (ValueError, KeyError, RuntimeError) as e:
        raise StageError(f"stats: the float forward pass failed ({type(e).__name__}: {e})") from e
    if not stats.tensors:
        raise StageError("stats: no quantized linear saw any input (is this a decoder-only or image-text LM?)")
    save(stats, out)
    log.info("stats: %d linears, %d x %d random tokens -> %s", len(stats.tensors), cfg.sequences, cfg.length, out)
    return {"outputs": {FILE: {"size": out.stat().st_size}}, "info": {"linears": len(stats.tensors),
            "tokens": cfg.sequences * cfg.length, "device": str(ctx.device)}}  # fmt: skip
