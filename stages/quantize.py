"""Stage quantize: one source shard -> one HLWQ shard, tensor by tensor (rotate -> codebook -> pack).

Memory holds one source tensor and its codes at a time: the output header is planned from the source header,
then tensors stream through the writer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from pipeline import format as fmt
from pipeline.context import Context
from pipeline.errors import IntegrityError
from pipeline.faults import maybe_die
from pipeline.manifest import Manifest, params_hash
from pipeline.quant import QuantParams, allocate, quantize
from pipeline.quant.hadamard import signs_to_hex
from pipeline.shards import (
    DTYPES,
    FLOAT_DTYPES,
    StreamingWriter,
    TensorInfo,
    check_shard_matches_index,
    remove_stale_temps,
)
from stages import stats

NAME = "quantize"
log = logging.getLogger(__name__)


def quant_params(manifest: Manifest, bits: int) -> QuantParams:
    q = manifest.quantize
    return QuantParams(bits=bits, block_size=q.block_size, sign_seed=q.sign_seed, scale=q.scale,
                       fit_codebook=q.fit_codebook)  # fmt: skip


def layout(manifest: Manifest) -> fmt.Layout:
    bits = quant_params(manifest, manifest.quantize.bits).sign_bits()
    return fmt.Layout(
        block_size=manifest.quantize.block_size,
        signs_hex=None if bits is None else signs_to_hex(bits),
        scale=manifest.quantize.scale,
        codebook="fitted" if manifest.quantize.fit_codebook else "gaussian",
    )


def is_quantized(manifest: Manifest, name: str, shape: tuple[int, ...]) -> bool:
    """Whether the shape and name rules quantize this tensor (its dtype is checked by bits_for)."""
    q = manifest.quantize
    n = 1
    for d in shape:
        n *= d
    # An empty tensor has nothing to quantize, whatever min_elements says.
    return len(shape) >= 2 and n > 0 and n >= q.min_elements and not any(fnmatchcase(name, p) for p in q.keep_bf16)


def bits_for(manifest: Manifest, info: TensorInfo, allocated: dict[str, int] | None = None) -> int | None:
    """Bits for this tensor, or None when it is kept as it is; an override beats the allocation."""
    if not is_quantized(manifest, info.name, info.shape):
        return None
    if info.dtype not in FLOAT_DTYPES:
        raise IntegrityError(
            f"tensor {info.name} has dtype {info.dtype}; only BF16/F16/F32 weights are quantized "
            "(list it in quantize.keep_bf16 to pass it through)"
        )
    if allocated and info.name in allocated and not any(fnmatchcase(info.name, p) for p in manifest.quantize.overrides):
        return allocated[info.name]
    return manifest.bits_for(info.name)


def allocation(manifest: Manifest, st: stats.Loaded | None) -> dict[str, int]:
    """quantize.target_bpw -> bits per linear that the stats pass measured (overrides fixed and counted); the
    tensors without statistics keep the manifest's bits and are outside the average."""
    q = manifest.quantize
    if q.target_bpw is None:
        return {}
    if st is None:
        raise IntegrityError("quantize.target_bpw needs the stats stage's output")
    cands = [
        allocate.Candidate(n, r["shape"][0], r["shape"][1], r["sensitivity"],
                           next((b for p, b in q.overrides.items() if fnmatchcase(n, p)), None), q.smooth is not None)
        for n, r in sorted(st.records.items())
    ]  # fmt: skip
    try:
        return allocate.allocate(cands, q.target_bpw, q.block_size)
    except ValueError as e:
        raise IntegrityError(f"quantize.target_bpw: {e}") from None


def load_stats(ctx: Context) -> stats.Loaded | None:
    return stats.load(ctx.workdir / stats.FILE) if stats.needed(ctx.manifest) else None


def fingerprint(ctx: Context, unit: str) -> dict[str, str]:
    src = ctx.state.read("download", unit) or {}
    q = {k: v for k, v in vars(ctx.manifest.quantize).items() if k != "device"}  # the device never changes bytes
    inputs = src.get("info", {}).get("sha256", "")
    if stats.needed(ctx.manifest):  # smoothing vectors and bit widths come from the stats file
        rec = ctx.state.read(stats.NAME, stats.UNIT) or {}
        inputs += ":" + params_hash(rec.get("fingerprint"))
    return {"inputs": inputs, "params": params_hash({"q": q, "v": fmt.FORMAT_VERSION})}


def write_shard(manifest: Manifest, infos: dict[str, TensorInfo], read: Callable[[str], torch.Tensor], out: Path,
                device: torch.device, unit: str, st: stats.Loaded | None = None) -> tuple[int, str, int]:  # fmt: skip
    """Plan the output header from the input headers, then stream: each tensor is read, quantized on `device` (or
    kept) and written in turn. `st` (the stats file) gives smoothing vectors and allocated widths. Returns (file
    size, sha256, number of quantized tensors)."""
    allocated = allocation(manifest, st)
    decisions = {name: bits_for(manifest, infos[name], allocated) for name in sorted(infos)}
    smooth_cfg = manifest.quantize.smooth
    vectors = {
        name: v
        for name, bits in decisions.items()
        if bits is not None and smooth_cfg is not None and st is not None
        and (v := st.smoothing_vector(name, smooth_cfg)) is not None
    }  # fmt: skip
    plan: list[tuple[str, str, tuple[int, ...]]] = []
    records = {}
    for name, bits in decisions.items():
        info = infos[name]
        if bits is None:
            plan.append((name, info.dtype, info.shape))
        else:
            if name in vectors and tuple(vectors[name].shape) != (math.prod(info.shape[1:]),):
                raise IntegrityError(f"stats: the smoothing vector of {name} does not fit its shape {info.shape}")
            plan += fmt.quantized_plan(name, info.shape, bits, manifest.quantize.block_size, name in vectors)
            records[name] = fmt.tensor_record(info.shape, DTYPES[info.dtype], bits, name in vectors)
    writer = StreamingWriter(plan, fmt.shard_metadata(layout(manifest), records))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, bits in tqdm(decisions.items(), desc=f"quantize {unit}", unit="tensor", leave=False, disable=None):
            t = read(name)
            if bits is None:
                yield name, t
                continue
            try:
                q = quantize(t.to(device), quant_params(manifest, bits), vectors.get(name))
            except OverflowError as e:  # a block scale beyond float16: name the tensor and the way out
                raise IntegrityError(f"tensor {name}: {e}; list it in quantize.keep_bf16 to keep it") from None
            yield from fmt.quantized_entries(name, q)
            maybe_die(f"quantize:{unit}:mid")  # a kill with a half-written temp file

    size, sha = writer.write(out, tensors())
    return size, sha, sum(b is not None for b in decisions.values())


def run(ctx: Context, unit: str) -> dict[str, Any]:
    src = ctx.source_shard(unit)
    infos = check_shard_matches_index(src, ctx.source.shards[ctx.source.shard_of(unit)])
    out = ctx.quantized_shard(unit)
    if remove_stale_temps(out):
        log.info("quantize %s: removed the temp file of an interrupted run", unit)
    with safe_open(str(src), framework="pt") as f:

        def read(name: str) -> torch.Tensor:
            t = f.get_tensor(name)
            # FP8 has no isfinite kernel: check it widened (kept tensors are checked too: a NaN norm is corruption).
            if t.is_floating_point() and not torch.isfinite(t if t.itemsize > 1 else t.float()).all():
                raise IntegrityError(f"{src.name}: tensor {name} has NaN or Inf values")
            return t

        size, sha, n_q = write_shard(ctx.manifest, infos, read, out, ctx.device, unit, load_stats(ctx))
    log.info("quantize %s: %d tensors quantized, %d kept, %.1f MB -> %.1f MB", unit, n_q, len(infos) - n_q,
             src.stat().st_size / 1e6, size / 1e6)  # fmt: skip
    return {
        "outputs": {str(out.relative_to(ctx.workdir)): {"size": size, "sha256": sha}},
        "info": {"quantized": n_q, "kept": len(infos) - n_q, "device": str(ctx.device)},
        "bytes_in": src.stat().st_size,
        "bytes_out": size,
    }
