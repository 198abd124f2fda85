"""`python -m bench.native_emulation`: the native GPU kernels' fp16 operand rounding, emulated on the CPU, on
bench.native_quality's model, text and positions: which rounding costs the exactness, and which fix recovers it.

Every HLWQ linear of the artifact is computed by pipeline/runtime/kernels/emulate.py (float64 products of the operands
the tensor cores would see) with one variant of the rounding at a time; the logits are compared with the CPU reference
dequantization of the same artifact (runtime "reference", float32), as bench.native_quality compares the GPU's:
mean KL(reference || variant) and top-1 agreement over every window position (one forward per window). Variants:

    tc-*       gemv_tc (decode, ≤ 32 tokens): per-block power-of-two activation scale, fp16 level table
    prefill-*  tiled_linear's > 32-token path: per-token activation scale, fp16 weight (level · scale) for cuBLAS

with each operand "exact", "fp16" (what the kernels do now) or "fp16x2" (hi + lo fp16 pair, a candidate fix).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import lm_source, quality
from bench.metrics_lm import windows
from bench.native_quality import Agreement, eager, say, window_logits
from pipeline.errors import PipelineError
from pipeline.runtime.kernels import emulate
from pipeline.shards import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str
    path: str  # "tc" or "prefill"
    act: emulate.Rounding
    weight: emulate.Rounding
    note: str


VARIANTS = (
    Variant("exact", "tc", "exact", "exact", "no rounding: the floor (float64 vs the float32 reference)"),
    Variant("tc-fp16", "tc", "fp16", "fp16", "gemv_tc as it is: fp16 activation, fp16 level table"),
    Variant("tc-act-only", "tc", "fp16", "exact", "only the activation rounded"),
    Variant("tc-levels-only", "tc", "exact", "fp16", "only the level table rounded"),
    Variant("tc-act-split", "tc", "fp16x2", "fp16", "fix: activation hi + lo (2 mma), table fp16"),
    Variant("tc-levels-split", "tc", "fp16", "fp16x2", "fix: table hi + lo (2 mma), activation fp16"),
    Variant("tc-both-split", "tc", "fp16x2", "fp16x2", "fix: both split (3 mma: hi·hi + lo·hi + hi·lo)"),
    Variant("prefill-fp16", "prefill", "fp16", "fp16", "prefill as it is: fp16 activation, fp16 level·scale"),
    Variant("prefill-act-only", "prefill", "fp16", "exact", "only the activation rounded"),
    Variant("prefill-weight-only", "prefill", "exact", "fp16", "only the weight rounded"),
    Variant("prefill-act-split", "prefill", "fp16x2", "fp16", "fix: activation hi + lo (2 GEMMs)"),
    Variant("prefill-weight-split", "prefill", "fp16", "fp16x2", "fix: weight hi + lo (2 GEMMs, 2x weight copy)"),
    Variant("prefill-both-split", "prefill", "fp16x2", "fp16x2", "fix: both split (3 GEMMs)"),
)


class Emulated:
    """The emulated forward of one HLWQLinear (runtime "reference" on the CPU); `use(variant)` picks the rounding.
    q/k/v and gate/up read the same input: its activation operand is computed once (`shared`, the last one)."""

    def __init__(self, module: Any, shared: dict[str, Any]) -> None:
        self.shared = shared
        codes, scales = module.stored()
        self.idx = emulate.code_indices(codes, scales, module.bits)
        self.scales, self.codebook, self.signs = scales, module.codebook, module.signs
        self.inv_smooth = None if module.smooth is None else 1.0 / module.smooth.double()
        self.bias, self.out = module.bias, module.out_features
        # What the operand depends on besides x: the sign diagonal, and the smoothing (never shared, to be safe).
        self.input_key = (tuple(module.signs.tolist()), None if module.smooth is None else id(module))
        self.variant: Variant | None = None
        self.w: torch.Tensor | None = None

    def use(self, v: Variant) -> None:
        make = emulate.tc_weight if v.path == "tc" else emulate.prefill_weight
        self.variant, self.w = v, make(self.idx, self.scales, self.codebook, v.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert self.variant is not None and self.w is not None
        key = (self.variant.name, self.input_key)
        if self.shared.get("x") is x and self.shared.get("key") == key:
            a = self.shared["a"]
        else:
            z = emulate.rotate64(x.reshape(-1, x.shape[-1]), self.signs, self.inv_smooth)
            a = emulate.activation_operand(z, self.variant.act, "block" if self.variant.path == "tc" else "row")
            self.shared.update(x=x, key=key, a=a)
        y = emulate.emulated_matvec(a, self.w)
        if self.bias is not None:
            y = y + self.bias.double()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out)


def run(args: argparse.Namespace) -> int:
    from pipeline.runtime import load
    from pipeline.runtime.linear import HLWQLinear

    if args.threads:
        torch.set_num_threads(args.threads)
    by_name = {v.name: v for v in VARIANTS}
    names = [n.strip() for n in args.variants.split(",") if n.strip()] if args.variants else list(by_name)
    bad = [n for n in names if n not in by_name]
    if bad:
        raise PipelineError(f"bench: unknown --variants {bad}; known: {', '.join(by_name)}")
    methods = {m.name: m for m in quality.method_list()}
    if args.point not in methods or methods[args.point].artifact is None:
        raise PipelineError(f"bench: --point takes one of the bench's artifact rows, not {args.point!r}")
    m = methods[args.point]
    setup = quality.prepare(lm_source.SMOLLM2, Path(args.cache), args.tokens, args.text, args.gguf)
    spans = windows(setup.token_ids.numel(), args.window)[: args.max_windows or None]
    ids = setup.token_ids
    workdir = Path(args.workdir)
    art = quality.convert_artifact(setup.folder, workdir / m.name, f"bench-{m.name}", m.artifact or {})
    say(f"artifact {art}; {len(spans)} windows of {args.window}, {torch.get_num_threads()} threads")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = eager(load(art, "reference", "cpu", dtype=torch.float32))
    t0 = time.monotonic()
    ref = window_logits(model, ids, spans, torch.device("cpu"))
    say(f"reference (float32 dequantization): {time.monotonic() - t0:.1f} s")
    linears = [mod for mod in model.modules() if isinstance(mod, HLWQLinear)]
    shared: dict[str, Any] = {}
    emus = [Emulated(mod, shared) for mod in linears]
    for mod, e in zip(linears, emus, strict=True):
        mod.forward = e  # type: ignore[method-assign]
    full = len(spans) == len(windows(ids.numel(), args.window)) and args.tokens == 4096 and args.window == 512

    def document(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "what": "native kernels' fp16 operand rounding emulated on the CPU (pipeline/runtime/kernels/emulate.py),"
            " vs the CPU reference dequantization of the same artifact, float32 model elsewhere",
            "point": m.name, "quantize": m.artifact, "model": setup.model_label, "text": setup.text_label,
            "tokens": args.tokens, "window": args.window, "windows": len(spans),
            "positions": sum(b - a - 1 for a, b in spans), "same_positions_as_native_quality": full,
            "hlwq_linears": len(linears), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "variants": rows,
        }  # fmt: skip

    rows: list[dict[str, Any]] = []
    for name in names:
        v = by_name[name]
        t0 = time.monotonic()
        for e in emus:
            e.use(v)
        ag = Agreement()
        for r, lg in zip(ref, window_logits(model, ids, spans, torch.device("cpu")), strict=True):
            ag.add(r, lg)
        row = {"variant": v.name, "path": v.path, "activation": v.act, "weight": v.weight, "note": v.note,
               **ag.as_dict(), "top1_mismatches": ag.tokens - ag.top1_sum}  # fmt: skip
        rows.append(row)
        atomic_write_json(out, document(rows))  # what a stopped run leaves behind
        say(f"{v.name:22s} KL {ag.mean_kl:.3e}  max {ag.kl_max:.2e}  top-1 {100 * ag.top1:.3f} % "
            f"({ag.tokens - ag.top1_sum} of {ag.tokens} differ)  [{time.monotonic() - t0:.0f} s]")  # fmt: skip
    print("\n| variant | path | activation | weight | positions | mean KL | max KL | top-1 | differ |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [r["variant"], r["path"], r["activation"], r["weight"], r["tokens"], f"{r['mean_kl']:.3e}",
                 f"{r['max_kl']:.2e}", f"{100 * r['top1']:.3f} %", r["top1_mismatches"]]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"\nwrote {out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.native_emulation", description=__doc__.splitlines()[0])
    p.add_argument("--point", default="hlwq-q5", help="the bench's artifact row (hlwq-q5)")
    p.add_argument("--variants", help=f"comma-separated (default all: {', '.join(v.name for v in VARIANTS)})")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens from the start of the text (4096)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (512)")
    p.add_argument("--max-windows", type=int, default=0, help="only the first N windows (default: all)")
    p.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf as a file")
    p.add_argument("--text", type=Path, help="lee_background.cor as a file")
    p.add_argument("--cache", default=str(lm_source.default_cache()), help="model/text cache (work/bench)")
    p.add_argument("--workdir", default="work/emulation", help="the conversion (kept: resumable)")
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return quality.exit_code(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
