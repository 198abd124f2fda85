"""The HLWQ artifact format (FORMAT.md is the prose spec; this module is the code that writes and reads it).

A quantized weight `W` of shape [rows, ...] is stored as three safetensors entries:
  W.hlwq_codes     U8  [rows, n_blocks * block_size * bits / 8]   packed codes (pipeline.quant.bitpack layout)
  W.hlwq_scales    F16 [rows, n_blocks]                           per-block scale
  W.hlwq_codebook  F32 [2**bits]                                  ascending levels
  W.hlwq_smooth    F32 [C]              (format v2, optional)        column smoothing: codes encode W·diag(s)
Every other tensor is stored under its own name, unchanged. Each shard's `__metadata__["hlwq"]` is JSON with the
format version, block size, sign diagonal and, per quantized tensor, its original shape, dtype and bits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pipeline.errors import FormatError
from pipeline.quant import Quantized, dequantize
from pipeline.quant.bitpack import packed_block_bytes
from pipeline.quant.hadamard import signs_from_hex
from pipeline.shards import DTYPE_NAMES, DTYPES, INDEX_NAME  # noqa: F401 - re-exported: the index file name is part of the format

FORMAT_VERSION = 2  # the newest version this code writes and reads; v1 is still written when nothing is smoothed
READ_VERSIONS = (1, 2)
QUANT_METHOD = "hlwq"
CODES, SCALES, CODEBOOK, SMOOTH = ".hlwq_codes", ".hlwq_scales", ".hlwq_codebook", ".hlwq_smooth"
SUFFIXES = (CODES, SCALES, CODEBOOK, SMOOTH)
METADATA_KEY = "hlwq"
# For a person reading config.json: transformers skips an unknown quant_method with only a warning (no config field
# makes it raise), so the block says itself what loading it takes.
REQUIRES = ("the hlwq package: `import hlwq` before from_pretrained; without it transformers ignores this "
            "quantization_config and the quantized Linears load as random weights")  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Artifact-wide constants every shard repeats, so one shard decodes on its own."""

    block_size: int
    signs_hex: str | None  # None: no sign diagonal
    scale: str
    codebook: str  # "gaussian" or "fitted" (per tensor, stored either way)

    def sign_bits(self) -> list[int] | None:
        return None if self.signs_hex is None else signs_from_hex(self.signs_hex, self.block_size)


def quantized_plan(
    name: str, shape: tuple[int, ...], bits: int, block_size: int, smooth: bool = False
) -> list[tuple[str, str, tuple[int, ...]]]:
    """The entries (name, dtype, shape) a quantized tensor becomes (three, four when smoothed), known before
    quantizing."""
    rows, cols = shape[0], math.prod(shape[1:])
    n_blocks = -(-cols // block_size)
    plan = [
        (name + CODES, "U8", (rows, n_blocks * packed_block_bytes(bits, block_size))),
        (name + SCALES, "F16", (rows, n_blocks)),
        (name + CODEBOOK, "F32", (1 << bits,)),
    ]
    return [*plan, (name + SMOOTH, "F32", (cols,))] if smooth else plan


def quantized_entries(name: str, q: Quantized) -> list[tuple[str, torch.Tensor]]:
    out = [(name + CODES, q.codes), (name + SCALES, q.scales), (name + CODEBOOK, q.codebook.to(torch.float32))]
    return [*out, (name + SMOOTH, q.smooth.to(torch.float32))] if q.smooth is not None else out


def tensor_record(q_shape: tuple[int, ...], dtype: torch.dtype, bits: int, smooth: bool = False) -> dict[str, Any]:
    rec: dict[str, Any] = {"shape": list(q_shape), "dtype": DTYPE_NAMES[dtype], "bits": bits}
    return {**rec, "smooth": True} if smooth else rec


def version_for(smoothed: bool) -> int:
    """v2 only when something is smoothed, so artifacts without smoothing stay readable by v1 readers."""
    return 2 if smoothed else 1


def shard_metadata(layout: Layout, tensors: dict[str, dict[str, Any]]) -> dict[str, str]:
    body = {
        "format_version": version_for(any(r.get("smooth") for r in tensors.values())),
        "block_size": layout.block_size,
        "signs": layout.signs_hex,
        "scale": layout.scale,
        "codebook": layout.codebook,
        "tensors": tensors,
    }
    return {"format": "pt", METADATA_KEY: json.dumps(body, sort_keys=True, separators=(",", ":"))}


def quantization_config(layout: Layout, bits: int, sign_seed: int | None, overrides: dict[str, int],
                        kept: list[str], smoothed: bool = False, smooth: dict[str, Any] | None = None,
                        target_bpw: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The `quantization_config` block written into the artifact's config.json (v2 keys only when used)."""
    extra: dict[str, Any] = {"smooth": smooth} if smoothed and smooth is not None else {}
    if target_bpw is not None:
        extra["target_bpw"] = target_bpw
    return {
        **extra,
        "quant_method": QUANT_METHOD,
        "format_version": version_for(smoothed),
        "bits": bits,
        "block_size": layout.block_size,
        "sign_seed": sign_seed,
        "signs": layout.signs_hex,
        "scale": layout.scale,
        "codebook": layout.codebook,
        "bits_overrides": overrides,
        "modules_not_quantized": kept,
        "requires": REQUIRES,
    }


def check_version(version: object, where: str) -> None:
    if version not in READ_VERSIONS:
        raise FormatError(
            f"{where}: HLWQ format_version {version!r} is not supported by this reader (it reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}); upgrade hlwq or re-convert"
        )


class ShardReader:
    """Reads one artifact shard: logical tensor names, quantized records, and reference dequantization."""

    def __init__(self, path: Path):
        self.path = path
        self._f = safe_open(str(path), framework="pt")
        meta = self._f.metadata() or {}
        if METADATA_KEY not in meta:
            raise FormatError(f"{path.name}: not an HLWQ shard (no '{METADATA_KEY}' metadata)")
        try:
            body = json.loads(meta[METADATA_KEY])
        except json.JSONDecodeError:
            raise FormatError(f"{path.name}: corrupt '{METADATA_KEY}' metadata") from None
        check_version(body.get("format_version"), path.name)
        self.version: int = body["format_version"]
        self.layout = Layout(body["block_size"], body["signs"], body["scale"], body["codebook"])
        self.quantized: dict[str, dict[str, Any]] = body["tensors"]
        stored = set(self._f.keys())
        self.passthrough = sorted(n for n in stored if not n.endswith(SUFFIXES))

    def names(self) -> list[str]:
        return sorted([*self.quantized, *self.passthrough])

    def get_quantized(self, name: str, device: str | torch.device = "cpu") -> Quantized:
        rec = self.quantized[name]
        smooth = None
        if rec.get("smooth"):
            if self.version < 2:
                raise FormatError(f"{self.path.name}: {name} is smoothed, which needs format_version 2")
            smooth = self._f.get_tensor(name + SMOOTH).to(device)
        return Quantized(
            codes=self._f.get_tensor(name + CODES).to(device),
            scales=self._f.get_tensor(name + SCALES).to(device),
            codebook=self._f.get_tensor(name + CODEBOOK).to(device),
            shape=tuple(rec["shape"]),
            dtype=DTYPES[rec["dtype"]],
            bits=rec["bits"],
            block_size=self.layout.block_size,
            smooth=smooth,
        )

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor as the model sees it: dequantized when quantized, else as stored."""
        if name in self.quantized:
            return dequantize(self.get_quantized(name, device), self.layout.sign_bits())
        return self._f.get_tensor(name).to(device)


def read_quantization_config(config_path: Path) -> dict[str, Any]:
    try:
        qc = json.loads(config_path.read_text())["quantization_config"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise FormatError(f"{config_path}: no quantization_config") from None
    if qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{config_path}: quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}")
    check_version(qc.get("format_version"), config_path.name)
    return dict(qc)
