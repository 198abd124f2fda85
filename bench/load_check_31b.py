"""The 31B proof, for one GPU: a Gemma-4-31B-shaped model (real text and vision configs) with random BF16 weights
is built on the GPU, converted by our quantize code on the GPU shard by shard into an HLWQ artifact on local disk
(no BF16 checkpoint is ever written), loaded back by pipeline.runtime as torchao INT4 and measured (load_check);
torchao INT4 straight from the same BF16 weights is measured in the same run, the same way.

    python -m bench.load_check_31b --out results.json [--workdir /tmp/hlwq31b] [--budget-s 560]
    python -m bench.load_check_31b --tiny --out /tmp/tiny.json      # the same code path on the CPU, in seconds

Prints one JSON object (also written to --out, after every step, so a run cut short still leaves its figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline import format as fmt
from pipeline import runtime
from pipeline.manifest import parse_manifest
from pipeline.shards import DTYPE_NAMES, INDEX_NAME, TensorInfo, atomic_write_json, atomic_write_text, read_header
from stages.quantize import layout, write_shard

PATTERN = ["sliding_attention"] * 5 + ["full_attention"]
TEXT_31B = dict(
    vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
    num_key_value_heads=16, head_dim=256, global_head_dim=512, num_global_key_value_heads=4, attention_k_eq_v=True,
    layer_types=[PATTERN[i % 6] for i in range(60)], sliding_window=1024, max_position_embeddings=262144,
    final_logit_softcapping=30.0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=262144,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
)  # fmt: skip
VISION_31B = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    head_dim=72, patch_size=16, pooling_kernel_size=3, position_embedding_size=10240, standardize=True,
)  # fmt: skip
# The default manifest: 5 bits, block 128, least-squares scale, sign seed 0, the default kept tensors.
MANIFEST = parse_manifest({"name": "gemma-4-31b-shapes", "source": {"path": "src"}, "destination": {"path": "out"}})
SHARD_BYTES = 4 << 30  # BF16 bytes per artifact shard (~1.4 GB once quantized)


def config_31b(tiny: bool) -> Any:
    from transformers import Gemma4Config

    if tiny:
        from pipeline.tiny import tiny_config

        return tiny_config()
    return Gemma4Config(text_config=TEXT_31B, vision_config=VISION_31B, audio_config=None, tie_word_embeddings=True)


def build_bf16(config: Any, device: torch.device) -> torch.nn.Module:
    """Random BF16 weights built directly on the device (transformers' own init; norm gains randomized)."""
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = Gemma4ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


def convert(model: torch.nn.Module, out: Path) -> dict[str, Any]:
    """Quantize the model's state dict on its device into HLWQ shards (the format the pipeline writes)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    state = {n: t for n, t in model.state_dict().items() if n not in tied}
    device = next(model.parameters()).device
    groups: list[list[str]] = [[]]
    acc = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if groups[-1] and acc + nbytes > SHARD_BYTES:
            groups.append([])
            acc = 0
        groups[-1].append(name)
        acc += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        infos = {n: TensorInfo(n, DTYPE_NAMES[state[n].dtype], tuple(state[n].shape), 0) for n in group}
        # The pipeline's own shard writer and decisions (default manifest), fed from GPU memory instead of a file.
        size, _, _ = write_shard(MANIFEST, infos, state.__getitem__, out / fname, device, fname)
        total += size
        weight_map.update({n: fname for n in read_header(out / fname)[0]})
    atomic_write_json(
        out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    )
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    q = MANIFEST.quantize
    cfg["quantization_config"] = fmt.quantization_config(layout(MANIFEST), q.bits, q.sign_seed, {}, list(q.keep_bf16))
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    return {"artifact_gb": round(sum(p.stat().st_size for p in out.iterdir()) / 1e9, 3), "shards": len(groups)}


def baseline_int4(model: torch.nn.Module, device: torch.device) -> float:
    """torchao INT4 straight from BF16, in place, on the same Linears the loader converts (text Linears; lm_head
    stays tied to the BF16 embedding, as in ours). Returns seconds."""
    from torchao.quantization import quantize_

    cfg = runtime.int4_config(device)

    def pick(module: torch.nn.Module, fqn: str) -> bool:
        return "language_model" in fqn and runtime.int4_eligible(module, "weight")

    t0 = time.perf_counter()
    quantize_(model, cfg, filter_fn=pick)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return round(time.perf_counter() - t0, 2)


def kernel_microbench(model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Batch-1 time of one MLP gate_proj (21504x5376) as INT4 (the loaded weight) and as BF16, against the
    bytes each must read: says how far the INT4 kernel is from the memory bound."""
    if device.type != "cuda":
        return {}
    from triton.testing import do_bench

    lin = model.model.language_model.layers[0].mlp.gate_proj
    n, k = lin.weight.shape
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    w16 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    t4 = do_bench(lambda: torch.nn.functional.linear(x, lin.weight), warmup=50, rep=200, return_mode="median")
    t16 = do_bench(lambda: torch.nn.functional.linear(x, w16), warmup=50, rep=200, return_mode="median")
    b4, b16 = n * k * (0.5 + 4 / INT4_GROUP_BYTES), n * k * 2
    return {"shape": [n, k], "int4_us": round(t4 * 1e3, 1), "bf16_us": round(t16 * 1e3, 1),
            "int4_gb_s": round(b4 / (t4 * 1e-3) / 1e9), "bf16_gb_s": round(b16 / (t16 * 1e-3) / 1e9)}  # fmt: skip


INT4_GROUP_BYTES = 128  # one bf16 scale + one bf16 zero (4 bytes) per group of 128 weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hlwq31b"))
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (0: one forward, as plain generate)")
    ap.add_argument("--budget-s", type=float, default=560.0, help="skip compiled decode runs past this")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="the embedded tiny config on the CPU (a smoke test)")
    ap.add_argument("--host-embed", action="store_true",
                    help="ours: embedding in host RAM, int8 output layer (load_check.host_embedding)")  # fmt: skip
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    chunk = args.chunk or None
    res: dict[str, Any] = {"model": "Gemma-4-31B shapes (random BF16 weights), real text and vision configs",
                           "date": datetime.now(UTC).isoformat(timespec="seconds"), "versions": runtime.versions(),
                           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                           "context_tokens": args.context, "prefill_chunk": chunk}  # fmt: skip

    def save(step: str) -> None:
        res["elapsed_s"] = round(time.monotonic() - start, 1)
        res["last_step"] = step
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"[{res['elapsed_s']:7.1f}s] {step}", file=sys.stderr, flush=True)

    config = config_31b(args.tiny)
    t0 = time.perf_counter()
    model = build_bf16(config, dev)
    res["params"] = sum(p.numel() for p in model.parameters())
    res["bf16_gb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 3)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    save("built BF16")

    art = args.workdir / "artifact"
    t0 = time.perf_counter()
    res.update(convert(model, art))
    res["convert_s"] = round(time.perf_counter() - t0, 1)
    save("converted")

    # Baseline: INT4 straight from BF16, measured while it is alone on the GPU (absolute figures); it stays resident
    # afterwards and every figure of ours is taken relative to what was allocated before our load began.
    base: dict[str, Any] = {"quantize_s": baseline_int4(model, dev)}
    res["baseline_torchao_int4_from_bf16"] = base
    mem = runtime.Memory(dev)
    mem.base = 0
    base.update(runtime.measure(model, art, mem, args.context, compiled=False, chunk=chunk))
    if mem.cuda:
        base["peak_vram_gb"] = max(base["peak_vram_no_cache_gb"], base["peak_vram_context_gb"])
        mem.reset_peak()
        base["unchunked"] = runtime.fill_context(model, args.context, chunk=None)
        base["peak_vram_context_unchunked_gb"] = mem.peak()
        res["kernel_microbench"] = kernel_microbench(model, dev)
    save("baseline measured (eager)")

    ours_model, ours = runtime.load_and_measure(art, "int4", args.context, device=dev, compiled=False, chunk=chunk,
                                               host_embed=args.host_embed)  # fmt: skip
    res["ours"] = ours
    keys = ("peak_vram_gb", "peak_vram_no_cache_gb", "resident_gb", "decode_tok_s", "decode_tok_s_eager", "load_s")
    res.update({k: ours[k] for k in keys})
    save("ours measured (eager)")
    if not args.no_compile:
        with alarm(deadline - time.monotonic()):
            runtime.compiled_decode(ours_model, ours, deadline - 200)
        res["decode_tok_s"] = ours["decode_tok_s"]
        save("ours compiled decode")
        with alarm(deadline - time.monotonic()):
            runtime.compiled_decode(model, base, deadline - 90)
    save("done")
    print(json.dumps(res, indent=2))
    return 0


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread after `seconds`, so a long compile cannot eat the whole run."""

    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no result within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


if __name__ == "__main__":
    raise SystemExit(main())
