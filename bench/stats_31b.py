"""The stats stage's float pass on a Gemma-4-31B-shaped text decoder: time and memory, one layer loaded at a time.

Weights are random BF16 made on demand per tensor (seeded by name; no 62 GB checkpoint on disk), through the same
stages.stats.collect the pipeline runs (hooks, probes, one layer materialized at a time). Prints the figures and writes
bench/results/stats_31b.json.

    python -m bench.stats_31b                       # on the GPU: all 60 layers, the default 16 x 256 tokens
    python -m bench.stats_31b --tiny                # CPU smoke test on the tiny Gemma 4
    python -m bench.stats_31b --device cpu --layers 2 --vocab 4096   # CPU estimate from a few layers
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.manifest import Smooth
from pipeline.shards import atomic_write_json
from stages import stats

DEFAULT_OUT = Path("bench/results/stats_31b.json")


class RandomSource:
    """Checkpoint-like tensors for every decoder parameter: seeded by name, made when asked for (BF16)."""

    def __init__(self, model: torch.nn.Module, prefix: str, device: torch.device):
        self.shapes = {prefix + n: tuple(p.shape) for n, p in model.named_parameters()}
        self.device = device
        self.reads = 0

    def names(self) -> set[str]:
        return set(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        self.reads += 1
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
        g = torch.Generator(device=self.device).manual_seed(seed)
        shape = self.shapes[name]
        if len(shape) == 1:  # norm gains near 1, as in real checkpoints
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=self.device)
        else:
            t = 0.02 * torch.randn(shape, generator=g, device=self.device)
        return t.to(torch.bfloat16)


def config_for(args: argparse.Namespace) -> Any:
    from bench.load_check_31b import config_31b

    config = config_31b(args.tiny)
    text = config.get_text_config(decoder=True)
    if args.layers:
        text.num_hidden_layers = args.layers
        text.layer_types = text.layer_types[: args.layers]
    if args.vocab:
        text.vocab_size = args.vocab
    return config


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = config_for(args)
    text = config.get_text_config(decoder=True)
    cfg = Smooth(sequences=args.sequences, length=args.length, probe_sequences=args.probe_sequences, probe=args.probe)
    skeleton = stats.build_decoder(config, torch.bfloat16)
    prefix = "model.language_model."
    src = RandomSource(skeleton, prefix, device)
    del skeleton
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.monotonic()
    last = [t0]

    def progress(done: int, total: int) -> None:
        # On stderr, flushed: a run killed by a timeout still shows how far it got and the time per layer.
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.monotonic()
        print(f"[{now - t0:8.1f}s] layer {done}/{total} (+{now - last[0]:.1f}s)", file=sys.stderr, flush=True)
        last[0] = now

    print(f"stats: {text.num_hidden_layers} layers on {device}, {cfg.sequences} x {cfg.length} tokens",
          file=sys.stderr, flush=True)  # fmt: skip
    st = stats.collect(config, src, lambda n, shape: ".layers." in n, cfg, device, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - t0
    layers = text.num_hidden_layers
    per_layer_params = sum(r.shape[0] * r.shape[1] for r in st.tensors.values()) / layers
    fig: dict[str, Any] = {
        "shape": "tiny Gemma 4" if args.tiny else "Gemma-4-31B text decoder (random BF16 weights)",
        "layers": layers, "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
        "sequences": cfg.sequences, "length": cfg.length, "probe": cfg.probe, "probe_sequences": cfg.probe_sequences,
        "linears": len(st.tensors), "linear_params_per_layer": int(per_layer_params),
        "device": str(device), "torch_threads": torch.get_num_threads(), "seconds": round(seconds, 2),
        "seconds_per_layer": round(seconds / layers, 3),
        "host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "python": platform.python_version(), "torch": torch.__version__,
    }  # fmt: skip
    if device.type == "cuda":
        fig["gpu"] = torch.cuda.get_device_name(device)
        fig["gpu_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    if args.layers and not args.tiny:
        fig["estimate_60_layers_s"] = round(seconds / layers * 60, 1)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stats_31b", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny Gemma 4 (CPU smoke test)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--layers", type=int, help="only this many decoder layers (a CPU estimate scales per layer)")
    p.add_argument("--vocab", type=int, help="a smaller vocabulary (only the embedding gather, negligible time)")
    p.add_argument("--sequences", type=int, default=Smooth.sequences)
    p.add_argument("--length", type=int, default=Smooth.length)
    p.add_argument("--probe-sequences", type=int, default=Smooth.probe_sequences)
    p.add_argument("--probe", action="store_true",
                   help="also the sensitivity probe (the pipeline runs it only with quantize.target_bpw; the shipped "
                        "Gemma manifest has none)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fig = run(args)
    for k, v in fig.items():
        print(f"{k}: {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
