"""Stage card: README.md (Hub model card with YAML front matter) and a per-layer cos-sim chart, written into
staging/ from measured results only: the verify report and, when it ran, the load check."""

from __future__ import annotations

import json
import logging
import re
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from pipeline.context import Context
from pipeline.manifest import strict_yaml
from pipeline.shards import atomic_open, atomic_write_text, contained_file
from stages.finalize import REPORT

NAME = "card"
CHART = "hlwq_cos_sim.png"
QUALITY_CHART = "hlwq_quality.png"
_LAYER = re.compile(r"\.layers\.(\d+)\.")
MAX_FRONT_MATTER = 64 * 1024  # bytes of the source README read for its front matter
log = logging.getLogger(__name__)


def per_layer_cos(tensors: dict[str, Any]) -> dict[int, tuple[float, float]]:
    """Layer index -> (median, min) cos-sim over its quantized tensors."""
    by_layer: dict[int, list[float]] = defaultdict(list)
    for name, t in tensors.items():
        m = _LAYER.search(name)
        if t["bits"] is not None and m:
            by_layer[int(m.group(1))].append(t["cos_sim"])
    return {k: (statistics.median(v), min(v)) for k, v in sorted(by_layer.items())}


def write_chart(path: Path, layers: dict[int, tuple[float, float]], threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    xs = list(layers)
    ax.plot(xs, [v[0] for v in layers.values()], marker="o", ms=3, label="median over the layer's tensors")
    ax.plot(xs, [v[1] for v in layers.values()], marker="v", ms=3, label="min")
    ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"verify threshold {threshold}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("weight cos-sim vs source")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", metadata={"Software": None})  # no timestamps: same bytes for the same data
    plt.close(fig)


def source_front_matter(ctx: Context) -> dict[str, Any]:
    """The YAML front matter of the source's README.md ({} when there is none or it does not parse)."""
    readme = contained_file(ctx.source.folder, "README.md")
    if readme is None:
        return {}
    with open(readme, "rb") as f:
        head = f.read(MAX_FRONT_MATTER).decode(errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", head, re.S)
    if not m:
        return {}
    try:
        data = strict_yaml(m.group(1))  # third-party text: no aliases (an alias bomb would become the card)
    except yaml.YAMLError:
        log.warning("the source README's front matter is not plain YAML (aliases, duplicate keys?): not used")
        return {}
    return data if isinstance(data, dict) else {}


def front_matter(ctx: Context) -> dict[str, Any]:
    """What the Hub reads: base model and relation, the source's license (name and link too when it is 'other')."""
    src = source_front_matter(ctx)
    meta: dict[str, Any] = {}
    if ctx.source.kind == "hub":  # a local folder has no Hub id; a made-up base_model would link nowhere
        meta |= {"base_model": ctx.source.name, "base_model_relation": "quantized"}
    meta["license"] = str(src.get("license") or "other")[:200]
    for key in ("license_name", "license_link"):
        if src.get(key):
            meta[key] = str(src[key])[:200]
    if meta["license"] == "other" and "license_name" not in meta:
        meta["license_name"] = "same-as-source" if src else "unknown"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = str(src.get("pipeline_tag") or "image-text-to-text")[:200]
    meta["tags"] = ["hlwq", "quantized", f"{ctx.manifest.quantize.bits}-bit"]
    return meta


def _fig(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def per_kind(tensors: dict[str, Any]) -> list[tuple[str, int, str, float, float]]:
    """(kind, tensors, bits, median cos-sim, min cos-sim) per weight kind, e.g. 'self_attn.q_proj'."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for name, t in tensors.items():
        if t["bits"] is not None:
            parts = name.removesuffix(".weight").split(".")
            kind = ".".join(p for p in parts[-2:] if not p.isdigit())
            groups[("vision: " if "vision" in name else "") + kind].append(t)
    rows = []
    for kind, ts in sorted(groups.items()):
        bits = "/".join(str(b) for b in sorted({t["bits"] for t in ts}))
        cos = [t["cos_sim"] for t in ts]
        rows.append((kind, len(ts), bits, statistics.median(cos), min(cos)))
    return rows


def quality_files(ctx: Context) -> tuple[Path, Path]:
    """Where `hlwq bench ARTIFACT` results for this run are picked up: <workdir>/quality/quality.{json,png}."""
    return ctx.workdir / "quality" / "quality.json", ctx.workdir / "quality" / "quality.png"


def quality_section(q: dict[str, Any], chart: bool) -> list[str]:
    """The output-quality table of an `hlwq bench` run (bench/results/quality.json schema)."""
    lines = [
        "## Output quality (measured by `hlwq bench`)",
        "",
        f"Next-token distributions against the float model on `{q['text']}` ({q['tokens']} tokens, {q['date']}); "
        f"float perplexity {q['float_ppl']:.3f}. Mean KL is the primary figure.",
        "",
        "| method | bits per weight | mean KL | top-1 agreement | perplexity |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {m['name']} | {m['bits_per_weight']:.3f} | {m['kld']:.4f} | {m['top1']:.2%} | {m['ppl']:.3f} |"
              for m in q["methods"]]  # fmt: skip
    if chart:
        lines += ["", f"![bits per weight vs mean KL]({QUALITY_CHART})"]
    return [*lines, ""]


AUTO_CLASS = {"image-text-to-text": "AutoModelForImageTextToText", "text-generation": "AutoModelForCausalLM"}


def use_section(target: str, pipeline_tag: str) -> list[str]:
    """How to load it: transformers' from_pretrained after `import hlwq`, which registers quant_method "hlwq" (without
    it transformers only warns and the quantized layers stay random, hence the import comes first)."""
    auto = AUTO_CLASS.get(pipeline_tag, "AutoModelForImageTextToText")
    return [
        "## Use",
        "",
        "With the `hlwq` package installed (the HLWQ repository: `pip install -e .`):",
        "",
        "```python",
        'import hlwq  # first: registers the "hlwq" quantization with transformers (else the layers load random)',
        f"from transformers import {auto}",
        "",
        f'model = {auto}.from_pretrained("{target}", device_map="auto")',
        "```",
        "",
        "The quantized layers keep their codes and compute with HLWQ's GPU kernels where they are installed, "
        "else with the exact reference dequantization. Other runtimes: "
        '`from_pretrained(..., quantization_config=hlwq.HlwqConfig(runtime="int4"))` (torchao INT4) or '
        '`runtime="dequantize"` (plain BF16 Linears). Tokenizer, processor and chat template load as usual. Every '
        "tensor's layout is documented in FORMAT.md of the HLWQ repository; `hlwq_report.json` has the per-tensor "
        "figures and `config.json` the `quantization_config`.",
        "",
    ]


def render(ctx: Context, report: dict[str, Any], load: dict[str, Any] | None,
           quality: dict[str, Any] | None = None) -> str:  # fmt: skip
    s = report["summary"]
    m = ctx.manifest
    q = m.quantize
    meta = front_matter(ctx)
    hub = ctx.source.kind == "hub"
    source = f"[`{ctx.source.name}`](https://huggingface.co/{ctx.source.name})" if hub else f"`{ctx.source.name}`"
    target = m.destination.repo or "path/to/artifact"
    lines = [
        f"# {m.name} — HLWQ Q{q.bits}",
        "",
        f"{q.bits}-bit weights of {source} at revision `{ctx.source.revision}`, made without calibration data: "
        f"each {q.block_size}-weight block of a row is rotated by a signed Walsh-Hadamard transform, coded with a "
        "Lloyd-Max codebook and a 16-bit block scale. Norms, embeddings, the vision tower and the other tensors "
        f"listed below are kept as they are. Artifact format version {report['format_version']}.",
        "",
        *use_section(target, meta["pipeline_tag"]),
        "## Size",
        "",
        "| | value |",
        "|---|---|",
        f"| source tensors | {_size(s['bytes_in'])} |",
        f"| artifact tensors | {_size(s['bytes_out'])} ({s['bytes_out'] / max(s['bytes_in'], 1):.1%} of the source) |",
        f"| bits per quantized weight (codes + scales + codebooks) | {_fig(s['bits_per_weight_quantized'], '.3f')} |",
        f"| bits per weight, all tensors (kept ones included) | {_fig(s['bits_per_weight_all'], '.3f')} |",
        f"| quantized / kept tensors | {s['quantized_tensors']} / {s['kept_tensors']} |",
        "",
        "## Weight fidelity (measured by the verify stage)",
        "",
        "Every quantized tensor was decoded from the files in this repository and compared with its source tensor; "
        f"the build fails when one is under cos-sim {m.verify.min_cos_sim}.",
        "",
    ]
    if s["quantized_tensors"]:
        lines += [
            "| metric | value |",
            "|---|---|",
            f"| median cos-sim | {s['median_cos_sim']:.6f} |",
            f"| min cos-sim | {s['min_cos_sim']:.6f} (`{s['min_cos_sim_tensor']}`) |",
            f"| median relative MSE | {s['median_rel_mse']:.3e} |",
            "",
            "| weight kind | tensors | bits | median cos-sim | min cos-sim |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {k} | {n} | {b} | {med:.6f} | {lo:.6f} |" for k, n, b, med, lo in per_kind(report["tensors"])]
    else:
        lines.append("No tensor was quantized: every tensor matched `keep_bf16` or was too small.")
    if (ctx.staging / CHART).exists():
        lines += [
            "",
            f"![per-layer weight cos-sim: median and min over each decoder layer's quantized tensors]({CHART})",
        ]
    lines += [
        "",
        "Weight cos-sim is a check, not the goal: what matters is the output distribution (see `hlwq bench`).",
        "",
        *(quality_section(quality, (ctx.staging / QUALITY_CHART).exists()) if quality else []),
        "## Load check",
        "",
    ]
    if load and load.get("status") == "measured":
        lines += ["| | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in load["figures"].items()]
    else:
        lines.append(f"Not run: {(load or {}).get('reason', 'no GPU was present when this artifact was built')}.")
    lines += [
        "",
        "## How it was made",
        "",
        f"`hlwq convert` with manifest `{m.name}`: bits {q.bits}, block size {q.block_size}, scale `{q.scale}`, "
        f"sign seed {q.sign_seed}, codebook {'fitted per tensor' if q.fit_codebook else 'Gaussian Lloyd-Max'}; "
        f"kept as they are: {', '.join(f'`{p}`' for p in q.keep_bf16)}"
        + (f"; per-pattern bits: {', '.join(f'`{p}`: {b}' for p, b in q.overrides.items())}" if q.overrides else "")
        + f". hlwq {report.get('hlwq_version', '?')}. License: as the source model ({meta['license']}).",
        "",
    ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines)


def run(ctx: Context) -> dict[str, Any]:
    report = json.loads((ctx.staging / REPORT).read_text())
    load = ctx.state.read("load_check", "artifact")
    layers = per_layer_cos(report["tensors"])
    if layers:
        write_chart(ctx.staging / CHART, layers, ctx.manifest.verify.min_cos_sim)
    qjson, qpng = quality_files(ctx)
    quality = json.loads(qjson.read_text()) if qjson.exists() else None
    if quality and qpng.exists():
        shutil.copyfile(qpng, ctx.staging / QUALITY_CHART)
    atomic_write_text(ctx.staging / "README.md", render(ctx, report, (load or {}).get("info"), quality))
    return {"info": {"layers": len(layers)}}
