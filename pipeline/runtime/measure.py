"""Figures of a loaded model: device memory (peak and resident), a filled KV cache, decode tok/s, versions."""

from __future__ import annotations

import logging
import statistics
import time
import weakref
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.runtime.probes import device_of, greedy, image_answer, synthetic_ids, text_answer, text_config

log = logging.getLogger(__name__)


def gb(n: float) -> float:
    return round(n / 1e9, 3)


class Memory:
    """Peak and current device memory above what was allocated when it was made (other models may be resident)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = torch.cuda.memory_allocated(device) if self.cuda else 0
        self.device = device

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> float | None:
        return gb(torch.cuda.max_memory_allocated(self.device) - self.base) if self.cuda else None

    def now(self) -> float | None:
        return gb(torch.cuda.memory_allocated(self.device) - self.base) if self.cuda else None


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and alive at once: a CPU stand-in for CUDA's
    max_memory_allocated (no allocator rounding), so an op chain's transient can be measured and tested off the GPU.

        with TensorPeak() as tp: f(x)
        tp.peak  # bytes"""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}  # storage pointer -> live output tensors on it
        self._ids: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in self._ids:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr == 0 or (ptr in inputs and ptr not in self._refs):  # empty, or an older tensor done in place
                continue
            if ptr not in self._refs:
                self._refs[ptr] = 0
                self.live += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self.live)
            self._refs[ptr] += 1
            self._ids.add(id(t))
            weakref.finalize(t, self._release, ptr, id(t), t.untyped_storage().nbytes())
        return out

    def _release(self, ptr: int, ident: int, nbytes: int) -> None:
        self._ids.discard(ident)
        self._refs[ptr] -= 1
        if not self._refs[ptr]:
            del self._refs[ptr]
            self.live -= nbytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache: Any) -> int:
    """Bytes a KV cache holds: a transformers cache's key/value tensors, or the compressed cache's own count."""
    if hasattr(cache, "nbytes"):  # the compressed cache counts its packed pages and residual itself
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def fill_context(model: Any, context_tokens: int, new_tokens: int = 32, chunk: int | None = 512,
                 seed: int = 3, kv_cache: Any = None) -> dict[str, Any]:  # fmt: skip
    """Prefill a (context_tokens - new_tokens)-token prompt, then greedy-generate new_tokens: the KV cache ends
    holding context_tokens positions. chunk: prefill in chunks of that many tokens (None: one forward, as plain
    `generate` does). Only the last position's logits are ever computed. kv_cache: a KVCacheConfig (the compressed
    cache of pipeline.runtime.kv_cache) instead of transformers' BF16 DynamicCache."""
    from transformers import DynamicCache

    dev = device_of(model)
    prompt = max(1, context_tokens - new_tokens)
    ids = synthetic_ids(model, prompt, seed).to(dev)
    cache: Any
    if kv_cache is not None:
        from pipeline.runtime.kv_cache import make_cache

        cache = make_cache(model, kv_cache)
    else:
        cache = DynamicCache(config=text_config(model))
    t0 = time.perf_counter()
    if chunk is not None:
        # All but the last prompt token go in chunks; generate then feeds the last one and decodes.
        for part in torch.split(ids[:, :-1], chunk, dim=1):
            model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1)
    out = greedy(model, new_tokens, input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache)
    sync(dev)
    return {"context_tokens": int(out.shape[1]), "prefill_chunk": chunk, "seconds": round(time.perf_counter() - t0, 3),
            "kv_cache_gb": gb(cache_bytes(cache)),
            "kv_cache": None if kv_cache is None else {"bits": kv_cache.bits,
                                                       "residual": kv_cache.residual}}  # fmt: skip


def decode_speed(model: Any, tokens: int = 64, prompt: int = 32, static: bool = False,
                 repeats: int = 3) -> dict[str, Any]:  # fmt: skip
    """Batch-1 greedy decode tok/s: (t(8 + tokens) - t(8)) over `tokens`, so prefill cancels out; median of repeats.
    static: HF's static cache, whose decode step `generate` compiles (torch.compile, CUDA graphs)."""
    dev = device_of(model)
    ids = synthetic_ids(model, prompt, seed=4).to(dev)
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if static:
        kw["cache_implementation"] = "static"
    t_warm = time.perf_counter()
    for _ in range(2 if static else 1):  # warm-up: compilation (static) and kernel autotuning happen here
        greedy(model, 8 + tokens, **kw)
    sync(dev)
    warmup = time.perf_counter() - t_warm

    def timed(n: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        greedy(model, n, **kw)
        sync(dev)
        return time.perf_counter() - t0

    rates = []
    for _ in range(repeats):
        short, long = timed(8), timed(8 + tokens)
        rates.append(tokens / max(long - short, 1e-9))
    return {"tok_s": round(statistics.median(rates), 2), "runs": [round(r, 2) for r in rates],
            "warmup_s": round(warmup, 1), "tokens": tokens, "prompt_tokens": prompt}  # fmt: skip


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "torchao", "hlwq", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if out["hlwq"] is None:  # a source checkout that was not pip-installed
        from pipeline import __version__

        out["hlwq"] = __version__
    out["cuda"] = torch.version.cuda
    return out


def measure(model: Any, folder: Path, memory: Memory, context_tokens: int = 4096, compiled: bool = True,
            chunk: int | None = 512, deadline: float | None = None,
            kv_cache: Any = None) -> dict[str, Any]:  # fmt: skip
    """Figures for a loaded model: answers, peak memory without and with a filled KV cache, decode speed."""
    fig: dict[str, Any] = {"resident_gb": memory.now()}
    memory.reset_peak()
    fig["text_answer"] = text_answer(model, folder)
    if getattr(model.config, "vision_config", None) is not None:
        fig["image_answer"] = image_answer(model, folder)
    fig["peak_vram_no_cache_gb"] = memory.peak()
    memory.reset_peak()
    fig["context"] = fill_context(model, context_tokens, chunk=chunk, kv_cache=kv_cache)
    fig["peak_vram_context_gb"] = memory.peak()
    eager = decode_speed(model, tokens=32, repeats=2, static=False)
    fig["decode_eager"] = eager
    fig["decode_tok_s_eager"] = eager["tok_s"]
    fig["decode_tok_s"], fig["decode_mode"] = eager["tok_s"], "eager (HF generate, dynamic cache)"
    if compiled:
        compiled_decode(model, fig, deadline)
    return fig


def compiled_decode(model: Any, fig: dict[str, Any], deadline: float | None = None) -> None:
    """Adds HF's compiled static-cache decode speed to `fig` (CUDA only; a failure or no time is recorded)."""
    if device_of(model).type != "cuda":
        fig["decode_compiled"] = {"error": "skipped: no CUDA device"}
    elif deadline is not None and time.monotonic() > deadline:
        fig["decode_compiled"] = {"error": "skipped: out of time budget before the compile warm-up"}
    else:
        try:
            comp = decode_speed(model, static=True)
            fig["decode_compiled"] = comp
            fig["decode_tok_s"], fig["decode_mode"] = comp["tok_s"], "HF static cache, compiled (CUDA graphs)"
        except Exception as e:  # a compile failure is a figure to report, not a failed check
            fig["decode_compiled"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log.warning("compiled decode failed: %s", fig["decode_compiled"]["error"])
