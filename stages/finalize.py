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
from pipeline.faults import maybe_enospc
from pipeline.shards import (
    INDEX_NAME,
    TensorInfo,
    atomic_write_json,
    atomic_write_text,
    contained_file,
    is_carried,
    read_header,
)
from stages import quantize

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
    mse = [t["rel_mse"] for t in q.values() if t["rel_mse"] is not None]
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
            "median_rel_mse": statistics.median(mse) if mse else None,
            "bits_per_weight_quantized": (code_bits + side_bits) / n_q if n_q else None,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "bits_per_weight_all": 8 * bytes_out / n_all if n_all else None,
        },
        "tensors": tensors,
    }


def check_shard_params(ctx: Context, unit: str, tensors: dict[str, TensorInfo], meta: dict[str, str]) -> None:
    """Refuse a quantized shard that was not made with the parameters this build is for (another manifest's run on
    the same workdir, say): its state record and its own metadata must both agree with the manifest."""
    m, path = ctx.manifest, ctx.quantized_shard(unit)
    where = f"{path.name} was quantized with other parameters than manifest {m.name!r} asks for"
    redo = "rerun `hlwq convert` to redo it"
    rec = ctx.state.read(quantize.NAME, unit) or {}
    if (rec.get("fingerprint") or {}).get("params") != quantize.fingerprint(ctx, unit)["params"]:
        raise IntegrityError(f"{where} (its quantize record differs); {redo}")
    try:
        body = json.loads(meta[fmt.METADATA_KEY])
        lay = quantize.layout(m)
        got = (body["block_size"], body["signs"], body["scale"], body["codebook"])
        records = dict(body["tensors"])
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"{path.name}: not an HLWQ shard of this version; {redo}") from None
    if got != (lay.block_size, lay.signs_hex, lay.scale, lay.codebook):
        raise IntegrityError(f"{where} (block size, signs, scale or codebook); {redo}")
    kept = {n: t for n, t in tensors.items() if not n.endswith(fmt.SUFFIXES)}
    # Widths allocated from the stats pass (quantize.target_bpw) are part of what this manifest asks for.
    alloc = quantize.allocation(m, quantize.load_stats(ctx))
    want = {n: quantize.bits_for(m, TensorInfo(n, r["dtype"], tuple(r["shape"]), 0), alloc)
            for n, r in records.items()}  # fmt: skip
    want |= {n: quantize.bits_for(m, t, alloc) for n, t in kept.items()}
    have = {n: r["bits"] for n, r in records.items()} | dict.fromkeys(kept)
    bad = sorted(n for n in want if want[n] != have[n])
    if bad:
        raise IntegrityError(f"{where} (tensor {bad[0]}: {have[bad[0]]} bits, expected {want[bad[0]]}); {redo}")


def run(ctx: Context) -> dict[str, Any]:
    try:
        return _build(ctx)
    except BaseException:
        shutil.rmtree(ctx.staging, ignore_errors=True)  # ours, rebuilt from scratch every time: frees a full disk
        raise


def _build(ctx: Context) -> dict[str, Any]:
    staging = ctx.staging
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for unit in ctx.units:
        shard = ctx.quantized_shard(unit)
        tensors, meta = read_header(shard)
        check_shard_params(ctx, unit, tensors, meta)
        _link_or_copy(shard, staging / shard.name)
        weight_map.update({n: shard.name for n in tensors})
        total += sum(t.nbytes for t in tensors.values())
        maybe_enospc(f"finalize:{unit}")
    atomic_write_json(
        staging / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    )
    config_path = contained_file(ctx.source.folder, "config.json")
    if config_path is None:
        raise IntegrityError(f"source has no config.json ({ctx.source.name})")
    # Keep the source's own config (only quantization_config added): a re-serialized one breaks older transformers.
    config = json.loads(config_path.read_text())
    q = ctx.manifest.quantize
    smoothed = any(fmt.ShardReader(ctx.quantized_shard(u)).version >= 2 for u in ctx.units)
    sm = vars(q.smooth) if q.smooth else None
    config["quantization_config"] = fmt.quantization_config(quantize.layout(ctx.manifest), q.bits, q.sign_seed,
                                                            dict(q.overrides), list(q.keep_bf16), smoothed, sm,
                                                            q.target_bpw)  # fmt: skip
    atomic_write_text(staging / "config.json", json.dumps(config, indent=2) + "\n")
    for name in ctx.source.files:
        # Checked again here, not only at resolve: a link could have been pointed out of the folder since.
        path = contained_file(ctx.source.folder, name)
        if name != "config.json" and is_carried(name) and path is not None:
            shutil.copyfile(path, staging / name)
    report = build_report(ctx)
    atomic_write_json(staging / REPORT, report)
    return {"info": report["summary"]}
