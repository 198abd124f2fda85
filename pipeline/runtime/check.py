"""load_check: load an artifact with one runtime and record the figures the load_check stage and the 31B bench
report (load time, peak device memory through a filled KV cache, resident memory, answers, decode tok/s)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.runtime import skeleton
from pipeline.runtime.loading import load
from pipeline.runtime.measure import Memory, measure, sync, versions


def load_and_measure(artifact_dir: str | Path, runtime: str = "int4", context_tokens: int = 4096, *,
                     device: str | torch.device | None = None, compiled: bool = True, chunk: int | None = 512,
                     deadline: float | None = None, host_embed: bool = False,
                     kv_cache: Any = None) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """load_check's work, returning the loaded model too (the 31B bench measures more on it)."""
    folder = skeleton.resolve(artifact_dir)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = Memory(dev)
    memory.reset_peak()
    t0 = time.perf_counter()
    # The host embedding was only ever measured with INT4; other runtimes keep the embedding on the device.
    host = host_embed and runtime == "int4"
    model = load(folder, runtime, dev, host_embedding=host)
    sync(dev)
    load_s = time.perf_counter() - t0
    fig: dict[str, Any] = {"runtime": runtime, "host_embedding": host,
                           "load_s": round(load_s, 2), "peak_vram_load_gb": memory.peak()}  # fmt: skip
    fig.update(measure(model, folder, memory, context_tokens, compiled, chunk, deadline, kv_cache))
    if memory.cuda:
        fig["peak_vram_gb"] = max(fig["peak_vram_load_gb"], fig["peak_vram_no_cache_gb"], fig["peak_vram_context_gb"])
        fig["peak_vram_no_cache_gb"] = max(fig["peak_vram_load_gb"], fig["peak_vram_no_cache_gb"])
    else:
        fig["peak_vram_gb"] = None
    fig["int4_weights"] = getattr(model, "_hlwq_counts", {}).get("int4")
    fig["gpu"] = torch.cuda.get_device_name(dev) if memory.cuda else None
    fig["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    fig["versions"] = versions()
    fig["params"] = sum(math.prod(p.shape) for p in model.parameters())
    return model, fig


def load_check(artifact_dir: str | Path, runtime: str = "int4", context_tokens: int = 4096, *,
               device: str | torch.device | None = None, compiled: bool = True, chunk: int | None = 512,
               deadline: float | None = None, host_embed: bool = False,
               kv_cache: Any = None) -> dict[str, Any]:  # fmt: skip
    """Load the artifact and measure it; peak_vram_gb covers the load and a generate that fills a context_tokens
    KV cache (torch.cuda.max_memory_allocated, above what was allocated before)."""
    model, fig = load_and_measure(artifact_dir, runtime, context_tokens, device=device, compiled=compiled,
                                  chunk=chunk, deadline=deadline, host_embed=host_embed, kv_cache=kv_cache)  # fmt: skip
    del model
    return fig
