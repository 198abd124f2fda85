"""Checkpoint files: validated safetensors headers and indexes, a streaming writer, atomic writes, hashes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.errors import IntegrityError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHARD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")
_TENSOR_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_MAX_HEADER = 100 * 1024 * 1024
# The model files besides the weights that an artifact carries, for local and Hub sources alike (top level only).
# An allowlist: whatever else sits in a model folder (secrets.env, optimizer state, notes) never leaves it.
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                 "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "*processor*.json", "chat_template*",
                 "LICENSE*", "NOTICE*", "USE_POLICY*")  # fmt: skip
# Never carried even when a name matches: pickles run code when loaded, and code is never trusted.
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".py", ".pyc")
_CARRIED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"BF16", "F16", "F32"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def check_shard_filename(name: str) -> str:
    if not _SHARD_RE.match(name) or ".." in name:
        raise IntegrityError(f"unsafe shard file name {name[:200]!r} (expected a plain *.safetensors name, no path)")
    return name


def check_tensor_name(name: str) -> str:
    if not _TENSOR_RE.match(name) or ".." in name or name.endswith("."):
        raise IntegrityError(f"unsafe tensor name {name[:200]!r} (letters, digits, '_', '.', '-' only, no '..')")
    return name


def is_carried(name: str) -> bool:
    """Whether a top-level source file name is one the artifact carries (see CARRIED_FILES)."""
    from fnmatch import fnmatchcase

    return (
        bool(_CARRIED_NAME.match(name))
        and not name.lower().endswith(REFUSED_SUFFIXES)
        and any(fnmatchcase(name, g) for g in CARRIED_FILES)
    )


def contained_file(folder: Path, name: str) -> Path | None:
    """`folder/name` resolved, when it is a regular file inside `folder` (symlinks followed only while they stay
    inside; a Hugging Face cache snapshot's links into its own `../../blobs/` count as inside); else None."""
    root = folder.resolve()
    try:
        target = (folder / name).resolve(strict=True)
        regular = stat.S_ISREG(target.stat().st_mode)
    except (OSError, RuntimeError):  # missing, a dangling or looping link
        return None
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    inside = target.is_relative_to(root) or (blobs is not None and target.parent == blobs)
    return target if inside and regular else None


def check_regular(path: Path) -> None:
    """Refuse a FIFO, device or folder where a file is expected: opening a FIFO would block forever."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise IntegrityError(f"{path.name}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise IntegrityError(f"{path.name}: not a regular file")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _header_entry(file: str, name: str, h: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, data offsets) of one header entry, each checked for its JSON type: a wrong type is a corrupt
    file, named as such, never a Python error."""
    bad = f"{file}: corrupt header entry for {name}"
    if not isinstance(h, dict):
        raise IntegrityError(f"{bad}: not an object")
    dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
    if not isinstance(dtype, str):
        raise IntegrityError(f"{bad}: dtype must be a string")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise IntegrityError(f"{bad}: shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise IntegrityError(f"{bad}: data_offsets must be two non-negative integers")
    if offsets[1] < offsets[0]:
        raise IntegrityError(f"{bad}: data_offsets end before they start")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header against the file size; returns (tensors, metadata)."""
    check_regular(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise IntegrityError(f"{path.name}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise IntegrityError(f"{path.name}: truncated or corrupt (header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise IntegrityError(f"{path.name}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path.name}: corrupt safetensors header")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise IntegrityError(f"{path.name}: corrupt safetensors header (__metadata__ must map strings to strings)")
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, h in header.items():
        check_tensor_name(name)
        dtype, shape, (lo, hi) = _header_entry(path.name, name, h)
        if dtype not in DTYPES:
            raise IntegrityError(f"{path.name}: tensor {name} has unsupported dtype {dtype[:40]}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if hi - lo != nbytes:
            raise IntegrityError(f"{path.name}: tensor {name} size does not match its shape")
        end = max(end, hi)
        tensors[name] = TensorInfo(name, dtype, shape, nbytes)
    if 8 + n + end > size:
        raise IntegrityError(f"{path.name}: truncated ({size} bytes, header promises {8 + n + end})")
    return tensors, meta


def load_index(folder: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names, from the index (or the single-file checkpoint); names checked both ways."""
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        if (folder / SINGLE_NAME).exists():
            return {SINGLE_NAME: sorted(read_header(folder / SINGLE_NAME)[0])}
        raise IntegrityError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise IntegrityError(f"{index_path.name}: not a safetensors index (no weight_map)") from None
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        check_tensor_name(tensor)
        shards.setdefault(check_shard_filename(str(shard)), []).append(tensor)
    return {s: sorted(t) for s, t in sorted(shards.items())}


def check_shard_matches_index(path: Path, expected: list[str]) -> dict[str, TensorInfo]:
    if not path.exists():
        raise IntegrityError(f"shard {path.name} is listed in the index but missing")
    tensors, _ = read_header(path)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise IntegrityError(
            f"{path.name}: tensor {missing[0]} is in the index but not in the shard ({len(missing)} missing)"
        )
    if extra:
        raise IntegrityError(
            f"{path.name}: tensor {extra[0]} is in the shard but not in the index ({len(extra)} extra)"
        )
    return tensors


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temp file beside `path`, fsync, then rename over it; a crash never leaves a partial `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifact files are meant to be read by others
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path: Path) -> int:
    """Delete temp files atomic_open left beside `path` when a writer was killed; call only while holding the
    lock of the unit that owns `path` (then no live process can be writing them)."""
    n = 0
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class StreamingWriter:
    """Writes a safetensors file tensor by tensor: the header is planned up front, so memory holds one tensor."""

    def __init__(self, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in plan:
            n = math.prod(shape) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the spec pads the header to 8 bytes with spaces
        self._header = struct.pack("<Q", len(raw)) + raw
        self._order = [(name, dtype, tuple(shape)) for name, dtype, shape in plan]

    def write(self, path: Path, tensors: Iterator[tuple[str, torch.Tensor]]) -> tuple[int, str]:
        """Consume (name, tensor) in plan order and write atomically; returns (file size, sha256), hashed in passing."""
        h = hashlib.sha256(self._header)
        with atomic_open(path) as f:
            f.write(self._header)
            for (name, dtype, shape), (got, t) in zip(self._order, tensors, strict=True):
                if got != name or DTYPE_NAMES.get(t.dtype) != dtype or tuple(t.shape) != shape:
                    raise ValueError(f"writer expected {name} {dtype}{list(shape)}, got {got} {t.dtype}{list(t.shape)}")
                data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                h.update(data)
                f.write(data)
        return path.stat().st_size, h.hexdigest()
