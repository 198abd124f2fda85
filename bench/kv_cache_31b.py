"""The compressed KV cache on a Gemma-4-31B-shaped model, for one GPU: INT4 weights (torchao, in place from random
BF16, host embedding as in the load_check anchors) + the HLWQ cache vs transformers' BF16 DynamicCache.

    python -m bench.kv_cache_31b                      # on the H200: ~3-5 min; merges into bench/results/kv_cache.json
    python -m bench.kv_cache_31b --tiny --out /tmp/kv_tiny.json    # the same code path on the CPU, in seconds
    python -m bench.kv_cache_31b --weights native5 --kinds q4,bf16 --budget-gb 25   # native Q5 weights, 24 GB card
    python -m bench.kv_cache_31b --weights native5 --decoder lean --kinds bf16,q4_sliding_bf16 --skip-memory \
        --check-context 0 --speed-contexts 4096       # decode speed through LeanDecoder (CUDA graph), BF16 vs Q4

Figures:
- max_context_tokens_<budget>gb_<weights>_<kind> (e.g. _22gb_int4_q3): the longest context whose peak GPU memory
  (torch.cuda.max_memory_allocated, the whole process: weights, cache, transients) stays <= --budget-gb while the
  model runs the last prefill chunk (--chunk tokens) and two decode steps on top of it. The cache is filled to the
  context with random keys/values through the cache's own update (codes, pages and residual exactly as a real prefill
  leaves them), so a probe costs seconds instead of a 100k-token prefill; the last chunk is where a chunked prefill
  peaks (largest cache, widest attention). `check_real_prefill` compares this with a real chunked prefill at
  --check-context tokens.
- decode_tok_s_<ctx>_<kind>: batch-1 decode steps (model forward + greedy pick, eager) on a cache holding ctx tokens.
- decode_tok_s_lean_<kind>_<ctx> (--decoder lean|both): LeanDecoder's greedy decode (one CUDA graph per step; the
  compressed kinds in its static packed cache, flushed between steps) after a real chunked prefill of ctx tokens,
  --lean-steps steps (>= 2 flushes of a 128-token block), compiled with --compile-layers (the first decode waits
  for the compile, outside the timing); decode_speed_ratio_lean_<kind>_<ctx>_vs_bf16 divides by the lean BF16
  figure of the same run. The lean cache keeps sliding layers in BF16: kinds that compress them are
  skipped (noted under "skipped").
Kinds: bf16 (DynamicCache), q3 (HLWQ Q3, sliding layers compressed too; the k_eq_v global layers store values only),
q3_keys_stored (q3 with the global layers' keys stored too, as before), q3_sliding_bf16 (HLWQ Q3 on the global layers
only), q2 (HLWQ Q2); q4_sliding_bf16 / q2_sliding_bf16 as q3_sliding_bf16 at 4 / 2 bits.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench import load_check_31b as lc
from bench.kv_cache import DEFAULT_OUT, merge_json
from pipeline.runtime.embedding import host_embedding
from pipeline.runtime.kv_cache import KVCacheConfig, make_cache
from pipeline.runtime.measure import cache_bytes, sync, versions
from pipeline.runtime.probes import synthetic_ids

KINDS: dict[str, KVCacheConfig | None] = {
    "bf16": None,
    "q3": KVCacheConfig(bits=3),
    "q3_sliding_bf16": KVCacheConfig(bits=3, sliding="bf16"),
    "q3_keys_stored": KVCacheConfig(bits=3, keys_from_values=False),
    "q2": KVCacheConfig(bits=2),
    "q2_sliding_bf16": KVCacheConfig(bits=2, sliding="bf16"),
    "q4": KVCacheConfig(bits=4),
    "q4_sliding_bf16": KVCacheConfig(bits=4, sliding="bf16"),
}
FILL_CHUNK = 4096


class Memory:
    """Peak bytes: CUDA's allocator peak; on the CPU (the --tiny smoke test) weights + cache bytes, a stand-in."""

    def __init__(self, model: Any, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self, cache: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return (self.weights + cache_bytes(cache)) / 1e9

    def now_gb(self) -> float:
        return torch.cuda.memory_allocated(self.device) / 1e9 if self.cuda else self.weights / 1e9


def new_cache(model: Any, kind: str) -> Any:
    from transformers import DynamicCache

    kv = KINDS[kind]
    if kv is None:  # transformers' stock path, with the attention the model came with
        model.set_attn_implementation(model._hlwq_stock_attn)
        return DynamicCache(config=model.config)
    return make_cache(model, kv)


def kv_shapes(model: Any) -> list[tuple[int, int] | None]:
    """(kv heads, head_dim) per decoder layer; None where the layer stores nothing (KV sharing)."""
    out: list[tuple[int, int] | None] = []
    for layer in model.model.language_model.layers:
        attn = layer.self_attn
        if getattr(attn, "is_kv_shared_layer", False):
            out.append(None)
        else:
            out.append((attn.k_proj.out_features // attn.head_dim, attn.head_dim))
    return out


@torch.inference_mode()
def fill(model: Any, cache: Any, tokens: int, device: torch.device, dtype: torch.dtype, chunk: int) -> None:
    """Put `tokens` positions of random keys/values into every layer through its own update(): large pieces, then
    two of `chunk` tokens, so pages and residual end exactly as a prefill in `chunk`-token pieces leaves them (settled
    after each piece, as the streaming attention settles them after each forward). A layer
    storing values only gets the keys its rule gives (as the model's own k_eq_v states are)."""
    g = torch.Generator(device=device).manual_seed(0)
    tail = min(tokens, 2 * chunk)
    sizes = [FILL_CHUNK] * ((tokens - tail) // FILL_CHUNK)
    sizes += [n for n in ((tokens - tail) % FILL_CHUNK, tail - tail // 2, tail // 2) if n]
    for i, shape in enumerate(kv_shapes(model)):
        if shape is None:
            continue
        h, d = shape
        layer = cache.layers[i]
        rule = getattr(layer, "key_from_value", None)
        seen = 0
        for n in sizes:
            k = torch.randn(1, h, n, d, generator=g, device=device, dtype=dtype)
            v = torch.randn(1, h, n, d, generator=g, device=device, dtype=dtype)
            if rule is not None:
                k = rule.keys(v, seen).to(dtype)
            layer.update(k, v)
            if hasattr(layer, "settle"):  # as the streaming attention does after each forward
                layer.settle()
            seen += n
            del k, v
        if rule is not None and layer.key_from_value is None:
            raise RuntimeError(f"fill: layer {i} refused its own rule's keys")


def _ids(model: Any, n: int, device: torch.device, seed: int) -> torch.Tensor:
    return synthetic_ids(model, n, seed=seed).to(device)


@torch.inference_mode()
def probe(model: Any, kind: str, context: int, chunk: int, mem: Memory, device: torch.device) -> dict[str, Any]:
    """Peak memory of the last prefill chunk + 2 decode steps on a cache holding `context - chunk` tokens."""
    cache = new_cache(model, kind)
    fill(model, cache, context - chunk, device, torch.bfloat16, chunk)
    mem.reset()  # the peak counts from the filled cache on, not the filling's own work
    before = mem.now_gb()
    out = model(input_ids=_ids(model, chunk, device, 5), past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(2):
        tok = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    peak = mem.peak_gb(cache)
    # transient: what the chunk + decode steps needed beyond the weights and the filled cache (their own new
    # cache entries included); it should not grow with the context
    values_only = sum(getattr(layer, "key_from_value", None) is not None for layer in getattr(cache, "layers", []))
    res = {"context": context, "peak_gb": round(peak, 3), "peak_raw_gb": peak,
           "cache_gb": round(cache_bytes(cache) / 1e9, 3), "allocated_before_chunk_gb": round(before, 3),
           "transient_gb": round(peak - before, 3), "values_only_layers": values_only}  # fmt: skip
    del cache, out, tok
    mem.reset()
    return res


def max_context(model: Any, kind: str, budget: float, chunk: int, lo: int, limit: int, mem: Memory,
                device: torch.device, probes: int, log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Largest context (multiple of 1024, <= limit) within the budget. The peak is close to affine in the context
    (cache bytes per token, bounded transients), so each probe is placed where the line through the bracketing
    probes crosses the budget (regula falsi): a handful of probes, not a scan."""
    seen: list[dict[str, Any]] = []

    def peak(ctx: int) -> float | None:
        try:
            r = probe(model, kind, ctx, chunk, mem, device)
        except torch.cuda.OutOfMemoryError:
            r = {"context": ctx, "peak_gb": None, "error": "CUDA out of memory"}
            mem.reset()
        seen.append(r)
        log(f"{kind} ctx {ctx}: peak {r['peak_gb']} GB")
        return r.get("peak_raw_gb", r["peak_gb"])

    def ok(p: float | None) -> bool:
        return p is not None and p <= budget

    p_lo = peak(lo)
    if not ok(p_lo):
        return {"max_context_tokens": None, "note": f"even {lo} tokens exceed the budget", "probes": seen}
    assert p_lo is not None
    first, p_first = lo, p_lo
    hi: int | None = None
    p_hi: float | None = None
    while len(seen) < probes:
        if hi is None:  # no probe over the budget yet: extrapolate (first: double)
            if lo == first:
                guess = 2 * lo
            else:
                slope = (p_lo - p_first) / (lo - first)
                guess = limit if slope <= 0 else lo + int((budget - p_lo) / slope)
        else:
            if hi - lo <= 1024:
                break
            guess = (lo + hi) // 2 if p_hi is None else lo + int((budget - p_lo) * (hi - lo) / (p_hi - p_lo))
        guess = min(guess // 1024 * 1024, limit if hi is None else hi - 1024)
        guess = max(guess, lo + 1024)
        if guess > limit:
            break
        p = peak(guess)
        if ok(p):
            assert p is not None
            lo, p_lo = guess, p
            if lo == limit:
                break
        else:
            hi, p_hi = guess, p
    note = "converged to 1024 tokens" if hi is not None and hi - lo <= 1024 else (
        "the largest context allowed fits" if lo == limit else "stopped at the probe limit")  # fmt: skip
    return {"max_context_tokens": lo, "first_over_budget": hi, "note": note, "probes": seen}


@torch.inference_mode()
def decode_speed(model: Any, kind: str, context: int, device: torch.device, steps: int) -> dict[str, Any]:
    cache = new_cache(model, kind)
    fill(model, cache, context, device, torch.bfloat16, 512)
    tok = _ids(model, 1, device, 6)
    for _ in range(3):  # warm-up (and the first flushes)
        tok = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    sync(device)
    dt = time.perf_counter() - t0
    del cache
    gc.collect()
    return {"context": context, "tok_s": round(steps / dt, 2), "ms_per_token": round(1e3 * dt / steps, 2)}


def lean_decode_speed(model: Any, kind: str, context: int, device: torch.device, steps: int, chunk: int,
                      compile_layers: bool = False) -> dict[str, Any]:  # fmt: skip
    """LeanDecoder's decode speed after a real chunked prefill of `context` tokens (its graph captured before the
    timed steps; DecodeResult.decode_s times the replays and the flushes between them)."""
    from pipeline.runtime.decode import LeanDecoder

    model.set_attn_implementation(model._hlwq_stock_attn)  # its prefill runs transformers' layers
    dec = LeanDecoder(model, max_len=context + steps + 8, prefill_chunk=chunk, kv_cache=KINDS[kind],
                      compile_layers=compile_layers)  # fmt: skip
    r = dec.generate(_ids(model, context, device, 8), steps + 1)
    out = {"context": context, "tok_s": round(r.decode_tok_s, 2), "ms_per_token": round(1e3 * r.decode_s / steps, 3),
           "steps": steps, "prefill_s": round(r.prefill_s, 2), "graphed": r.graphed, "compiled": compile_layers,
           "kv_cache_gb": round(r.kv_bytes / 1e9, 4), "capture_s": round(r.extra["capture_s"], 2)}  # fmt: skip
    del dec, r
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


@torch.inference_mode()
def real_prefill_peak(model: Any, kind: str, context: int, chunk: int, mem: Memory,
                      device: torch.device) -> dict[str, Any]:  # fmt: skip
    """A real chunked prefill of `context` tokens (+2 decode steps): its peak, to check the synthetic probe."""
    mem.reset()
    cache = new_cache(model, kind)
    ids = _ids(model, context, device, 7)
    t0 = time.perf_counter()
    for part in torch.split(ids, chunk, dim=1):
        out = model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits.argmax(-1)
    for _ in range(2):
        tok = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    values_only = sum(getattr(layer, "key_from_value", None) is not None for layer in getattr(cache, "layers", []))
    res = {"context": context, "peak_gb": round(mem.peak_gb(cache), 3), "cache_gb": round(cache_bytes(cache) / 1e9, 3),
           "seconds": round(time.perf_counter() - t0, 1), "values_only_layers": values_only}  # fmt: skip
    del cache
    mem.reset()
    return res


def native_weights(model: Any, device: torch.device, bits: int) -> None:
    """The native runtime's model as bench.runtime_31b builds it (every text linear and the tied head as tiled HLWQ
    codes), with the embedding in host RAM behind HostEmbedding so the HF forward can gather from it."""
    from bench.runtime_31b import to_native
    from pipeline.runtime.embedding import HostEmbedding

    emb = model.get_input_embeddings()
    to_native(model, bits)
    model.set_input_embeddings(HostEmbedding(emb, device))
    for cfg in (model.config, model.config.get_text_config()):
        cfg.tie_word_embeddings = False


def lean_speeds(model: Any, kinds: list[str], ctx: int, dev: torch.device, args: argparse.Namespace,
                res: dict[str, Any], out_of_time: Callable[[str], bool],
                log: Callable[[str], None]) -> None:  # fmt: skip
    """decode_tok_s_lean_<kind>_<ctx>k for each kind, and each compressed kind's ratio to the lean BF16 figure."""
    from pipeline.errors import RuntimeBackendError

    tag = f"{ctx // 1024}k"
    for kind in kinds:
        if kind == "q2" or out_of_time(f"lean decode {kind} at {ctx}"):
            continue
        try:
            r = lean_decode_speed(model, kind, ctx, dev, args.lean_steps, args.chunk, args.compile_layers)
        except RuntimeBackendError as exc:  # a kind the lean cache refuses (compressed sliding layers)
            res.setdefault("skipped", []).append(f"lean decode {kind}: {exc}")
            continue
        res.setdefault("lean", {}).setdefault(kind, {})[tag] = r
        res[f"decode_tok_s_lean_{kind}_{tag}"] = r["tok_s"]
        log(f"lean decode {kind} @ {ctx}: {r['tok_s']} tok/s, cache {r['kv_cache_gb']} GB")
    base = res.get(f"decode_tok_s_lean_bf16_{tag}")
    for kind in kinds:
        got = res.get(f"decode_tok_s_lean_{kind}_{tag}")
        if kind != "bf16" and base and got is not None:
            res[f"decode_speed_ratio_lean_{kind}_{tag}_vs_bf16"] = round(got / base, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--budget-gb", type=float, default=22.0)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk on top of the filled cache")
    ap.add_argument("--kinds", default="bf16,q3,q3_sliding_bf16,q2")
    ap.add_argument("--probes", type=int, default=8, help="memory probes per kind (at most)")
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per speed figure")
    ap.add_argument("--speed-contexts", default="4096,32768")
    ap.add_argument("--decoder", choices=("hf", "lean", "both"), default="hf",
                    help="decode speed through transformers' forward (hf), LeanDecoder (lean) or both")  # fmt: skip
    ap.add_argument("--lean-steps", type=int, default=256, help="timed LeanDecoder steps per speed figure")
    ap.add_argument("--compile-layers", action="store_true", help="LeanDecoder's layer steps through torch.compile")
    ap.add_argument("--skip-memory", action="store_true", help="no max-context probes (speed figures only)")
    ap.add_argument("--check-context", type=int, default=8192, help="real chunked prefill to check the probe (0: off)")
    ap.add_argument("--no-host-embed", action="store_true", help="keep the BF16 embedding on the GPU")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip the steps that would start after this")
    ap.add_argument("--tiny", action="store_true", help="the tiny Gemma-4 config on the CPU (a smoke test)")
    ap.add_argument("--weights", choices=("int4", "native5", "native4"), default="int4",
                    help="torchao INT4 (the load check's) or the native HLWQ runtime at 5 / 4 bits (host embedding, "
                         "quantized head); native: e.g. --weights native5 --kinds q4 --budget-gb 25")  # fmt: skip
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    if any(k not in KINDS for k in kinds):
        print(f"error: --kinds must be from {', '.join(KINDS)}", file=sys.stderr)
        return 2
    start = time.monotonic()
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    res: dict[str, Any] = {"model": "Gemma-4-31B shapes (random BF16 weights -> torchao INT4 in place), text+vision",
                           "date": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions(),
                           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                           "tiny": args.tiny, "budget_gb": args.budget_gb, "prefill_chunk": args.chunk,
                           "host_embedding": not args.no_host_embed, "method": __doc__}  # fmt: skip

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def save(step: str) -> None:
        res["elapsed_s"] = round(time.monotonic() - start, 1)
        res["last_step"] = step
        key = ("gpu_31b_tiny" if args.tiny else "gpu_31b") + ("" if args.weights == "int4" else f"_{args.weights}")
        update: dict[str, Any] = {key: res}
        if not args.tiny:  # the headline keys only from the real run
            heads = ("max_context_tokens_", "decode_tok_s_", "decode_speed_ratio_")
            # the speed keys name no weights: other weights' figures get a suffix, not the INT4 run's keys
            suffix = {k: "" if args.weights == "int4" or k.startswith(heads[0]) else f"_{args.weights}" for k in res}
            update.update({k + suffix[k]: v for k, v in res.items() if k.startswith(heads)})
        merge_json(args.out, update)
        log(step)

    model = lc.build_bf16(lc.config_31b(args.tiny), dev)
    if args.weights == "int4":
        lc.baseline_int4(model, dev)
        if not args.no_host_embed:
            host_embedding(model, dev)
    else:
        native_weights(model, dev, int(args.weights[-1]))
        res["model"] = f"Gemma-4-31B shapes (random BF16 weights -> HLWQ Q{args.weights[-1]} native), text+vision"
    model._hlwq_stock_attn = model.config.get_text_config(decoder=True)._attn_implementation or "sdpa"
    mem = Memory(model, dev)
    mem.reset()
    res["resident_gb"] = round(mem.now_gb(), 3)
    save(f"built {args.weights} model")

    text = model.config.get_text_config(decoder=True)
    hi = (text.max_position_embeddings - args.chunk) // 1024 * 1024
    lo = 1024 if args.tiny else 2048
    # --tiny: a budget of weights + 0.8 MB, so the bisection itself runs (the stand-in peak has no transients)
    budget = mem.weights / 1e9 + 0.0008 if args.tiny else args.budget_gb
    res["memory"] = {}

    def out_of_time(what: str) -> bool:
        if time.monotonic() - start < args.budget_s:
            return False
        res.setdefault("skipped", []).append(f"{what}: out of the --budget-s time")
        save(f"skipped {what}")
        return True

    for kind in [] if args.skip_memory else kinds:
        if out_of_time(f"memory {kind}"):
            continue
        r = max_context(model, kind, budget, args.chunk, lo, hi, mem, dev, args.probes, log)
        res["memory"][kind] = r
        res[f"max_context_tokens_{args.budget_gb:g}gb_{args.weights}_{kind}"] = r["max_context_tokens"]
        save(f"memory {kind}")
    if args.check_context and not out_of_time("real prefill check"):
        ctx = min(args.check_context, hi)
        res["check_real_prefill"] = {k: {"real": real_prefill_peak(model, k, ctx, args.chunk, mem, dev),
                                         "probe": probe(model, k, ctx, args.chunk, mem, dev)}
                                     for k in ("bf16", "q3") if k in kinds}  # fmt: skip
        save("real prefill check")
    for ctx in dict.fromkeys(min(int(c), hi) for c in args.speed_contexts.split(",")):  # capped ones once
        for kind in kinds if args.decoder in ("hf", "both") else []:
            if kind == "q2" or out_of_time(f"decode {kind} at {ctx}"):
                continue
            r = decode_speed(model, kind, ctx, dev, args.steps)
            res[f"decode_tok_s_{ctx // 1024}k_{kind}"] = r["tok_s"]
            log(f"decode {kind} @ {ctx}: {r['tok_s']} tok/s")
        if f"decode_tok_s_{ctx // 1024}k_bf16" in res:
            for kind in kinds:
                if kind not in ("bf16", "q2") and f"decode_tok_s_{ctx // 1024}k_{kind}" in res:
                    res[f"decode_speed_ratio_{ctx // 1024}k_{kind}_vs_bf16"] = round(
                        res[f"decode_tok_s_{ctx // 1024}k_{kind}"] / res[f"decode_tok_s_{ctx // 1024}k_bf16"], 3
                    )
        save(f"decode speed at {ctx}")
        if args.decoder in ("lean", "both"):
            lean_speeds(model, kinds, ctx, dev, args, res, out_of_time, log)
            save(f"lean decode speed at {ctx}")
    save("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
