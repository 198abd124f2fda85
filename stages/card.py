"""Stage card: README.md (Hub model card with YAML front matter) and a per-layer cos-sim chart, written into
staging/ from measured results only: the verify report and, when it ran, the load check."""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.context import Context
from pipeline.shards import atomic_open, atomic_write_text
from stages.finalize import REPORT

NAME = "card"
CHART = "hlwq_cos_sim.png"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


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


def _license(ctx: Context) -> str:
    readme = ctx.source.folder / "README.md"
    if readme.exists():
        m = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace"), re.M)
        if m:
            return m.group(1)
    return "other"


def render(ctx: Context, report: dict[str, Any], load: dict[str, Any] | None) -> str:
    s = report["summary"]
    m = ctx.manifest
    base = ctx.source.name if ctx.source.kind == "hub" else m.name
    front = [
        "---",
        f"base_model: {base}",
        "base_model_relation: quantized",
        f"license: {_license(ctx)}",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- hlwq",
        "- quantized",
        f"- {m.quantize.bits}-bit",
        "---",
    ]
    gb = 1e9
    lines = [
        f"# {m.name} — HLWQ Q{m.quantize.bits}",
        "",
        f"Calibration-free {m.quantize.bits}-bit weights: each 128-block of a weight row is rotated by a signed "
        "Walsh-Hadamard transform, coded with a Lloyd-Max codebook and a 16-bit block scale. "
        f"Source: `{ctx.source.name}` at revision `{ctx.source.revision}`. Format version {report['format_version']}.",
        "",
        "## Size",
        "",
        "| | value |",
        "|---|---|",
        f"| source size | {s['bytes_in'] / gb:.3f} GB |",
        f"| artifact tensors | {s['bytes_out'] / gb:.3f} GB ({s['bytes_out'] / max(s['bytes_in'], 1):.1%} of the source) |",
        f"| bits per quantized weight (codes + scales + codebooks) | {s['bits_per_weight_quantized']:.3f} |",
        f"| bits per weight, all tensors (kept ones included) | {s['bits_per_weight_all']:.3f} |",
        f"| quantized / kept tensors | {s['quantized_tensors']} / {s['kept_tensors']} |",
        "",
        "## Weight fidelity (measured by the verify stage)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| median cos-sim | {s['median_cos_sim']:.6f} |",
        f"| min cos-sim | {s['min_cos_sim']:.6f} (`{s['min_cos_sim_tensor']}`) |",
        f"| median relative MSE | {s['median_rel_mse']:.3e} |",
        "",
        f"![per-layer cos-sim]({CHART})",
        "",
        "Weight cos-sim is a check, not the goal: what matters is the output distribution (see `hlwq bench`).",
        "",
        "## Load check",
        "",
    ]
    if load and load.get("status") == "measured":
        lines += ["| | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in load["figures"].items()]
    else:
        lines.append(f"Not run: {(load or {}).get('reason', 'no GPU was present when this artifact was built')}.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from pipeline.loader import load_dequantized  # pip install hlwq (this repository)",
        "",
        f'model = load_dequantized("{ctx.manifest.destination.repo or "path/to/artifact"}", device="cpu")',
        "```",
        "",
        "Every tensor's layout is documented in FORMAT.md of the HLWQ repository; `hlwq_report.json` has the "
        "per-tensor figures.",
        "",
    ]
    return "\n".join(front + [""] + lines)


def run(ctx: Context) -> dict[str, Any]:
    report = json.loads((ctx.staging / REPORT).read_text())
    load = ctx.state.read("load_check", "artifact")
    layers = per_layer_cos(report["tensors"])
    if layers:
        write_chart(ctx.staging / CHART, layers, ctx.manifest.verify.min_cos_sim)
    atomic_write_text(ctx.staging / "README.md", render(ctx, report, (load or {}).get("info")))
    return {"info": {"layers": len(layers)}}
