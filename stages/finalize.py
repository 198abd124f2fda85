"""Stage finalize: assemble the artifact in staging/: shards, index, config.json with quantization_config,
the source's tokenizer/processor files, and hlwq_report.json merged from the per-shard verify reports."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
from typing import Any

from pipeline import __version__
from pipeline import format as fmt
from pipeline.context import Context
from pipeline.errors import IntegrityError
from pipeline.shards import INDEX_NAME, atomic_write_json, atomic_write_text, read_header
from stages.quantize import layout

NAME = "finalize"
REPORT = "hlwq_report.json"


def _link_or_copy(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
    try:
        os.link(src, dst)  # the shards are large and already final: a hard link costs nothing
    except OSError:
        shutil.copyfile(src, dst)


def build_report(ctx: Context) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for unit in ctx.units:
        tensors.update(json.loads(ctx.report_path(unit).read_text())["tensors"])
    q = {n: t for n, t in tensors.items() if t["bits"] is not None}
    cos = [t["cos_sim"] for t in q.values()]
    bytes_in = sum(ctx.state.read("download", u)["bytes_in"] for u in ctx.units)  # type: ignore[index]
    bytes_out = sum(ctx.quantized_shard(u).stat().st_size for u in ctx.units)
    n_q = sum(math.prod(t["shape"]) for t in q.values())
    n_all = sum(math.prod(t["shape"]) for t in tensors.values())
    bs = ctx.manifest.quantize.block_size
    # What is stored: codes for every padded block, a 16-bit scale per block, a float32 codebook per tensor.
    blocks = {n: t["shape"][0] * -(-math.prod(t["shape"][1:]) // bs) for n, t in q.items()}
    code_bits = sum(blocks[n] * bs * t["bits"] for n, t in q.items())
    side_bits = sum(blocks[n] * 16 + 32 * 2 ** t["bits"] for n, t in q.items())
    side_bits += sum(32 * math.prod(t["shape"][1:]) for t in q.values() if t.get("smooth"))  # F32 smoothing vectors
    return {
        "format_version": fmt.version_for(any(t.get("smooth") for t in q.values())),
        "hlwq_version": __version__,
        "source": {"kind": ctx.source.kind, "name": ctx.source.name, "revision": ctx.source.revision},
        "quantize": {k: v for k, v in dataclasses.asdict(ctx.manifest.quantize).items() if k != "device"},
        "summary": {
            "quantized_tensors": len(q),
            "kept_tensors": len(tensors) - len(q),
            "quantized_params": n_q,
            "total_params": n_all,
            "median_cos_sim": statistics.median(cos) if cos else None,
            "min_cos_sim": min(cos) if cos else None,
            "min_cos_sim_tensor": min(q, key=lambda n: q[n]["cos_sim"]) if q else None,
            "median_rel_mse": statistics.median(t["rel_mse"] for t in q.values()) if q else None,
            "bits_per_weight_quantized": (code_bits + side_bits) / n_q if n_q else None,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "bits_per_weight_all": 8 * bytes_out / n_all if n_all else None,
        },
        "tensors": tensors,
    }


def run(ctx: Context) -> dict[str, Any]:
    staging = ctx.staging
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for unit in ctx.units:
        shard = ctx.quantized_shard(unit)
        _link_or_copy(shard, staging / shard.name)
        tensors, _ = read_header(shard)
        weight_map.update({n: shard.name for n in tensors})
        total += sum(t.nbytes for t in tensors.values())
    atomic_write_json(
        staging / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    )
    config_path = ctx.source.folder / "config.json"
    if not config_path.exists():
        raise IntegrityError(f"source has no config.json ({ctx.source.name})")
    # Keep the source's own config (only quantization_config added): a re-serialized one breaks older transformers.
    config = json.loads(config_path.read_text())
    q = ctx.manifest.quantize
    smoothed = any(fmt.ShardReader(ctx.quantized_shard(u)).version >= 2 for u in ctx.units)
    sm = vars(q.smooth) if q.smooth else None
    config["quantization_config"] = fmt.quantization_config(layout(ctx.manifest), q.bits, q.sign_seed,
                                                            dict(q.overrides), list(q.keep_bf16), smoothed, sm,
                                                            q.target_bpw)  # fmt: skip
    atomic_write_text(staging / "config.json", json.dumps(config, indent=2) + "\n")
    for name in ctx.source.files:
        if name != "config.json":
            shutil.copyfile(ctx.source.folder / name, staging / name)
    report = build_report(ctx)
    atomic_write_json(staging / REPORT, report)
    return {"info": report["summary"]}
