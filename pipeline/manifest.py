"""Manifests: one YAML per model, loaded into frozen, typed dataclasses. Bad input fails naming the key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ManifestError

MANIFEST_VERSION = 1
# Kept in the source dtype by default: what is not an nn.Linear weight, or is too sensitive for 5 bits.
DEFAULT_KEEP = (
    "*embed_tokens*",  # tied with lm_head on Gemma: quantizing it would change the output layer too
    "*embed_vision*",
    "*embed_audio*",
    "*vision_tower*",
    "*audio_tower*",
    "*norm*",
    "*router*",
    "lm_head*",
)
# At most 96 characters, as the Hub's repo names: the name becomes a folder name (work/<name>), and file names
# longer than 255 bytes fail on every common file system.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Source:
    repo: str | None = None
    revision: str = "main"
    path: str | None = None
    delete_after_verify: bool = False  # drop each BF16 shard once its outputs are verified (disk-tight hosts)

    def __post_init__(self) -> None:
        _one_of(self.repo, self.path, "source")
        if self.repo is not None and not _REPO_RE.match(self.repo):
            raise ManifestError(f"source.repo: {_quote(self.repo)} is not of the form owner/name (each part at most 96 "
                                "characters)")  # fmt: skip


@dataclass(frozen=True)
class Destination:
    repo: str | None = None
    private: bool = False
    path: str | None = None

    def __post_init__(self) -> None:
        _one_of(self.repo, self.path, "destination")
        if self.repo is not None and not _REPO_RE.match(self.repo):
            raise ManifestError(f"destination.repo: {_quote(self.repo)} is not of the form owner/name (each part at "
                                "most 96 characters)")  # fmt: skip


@dataclass(frozen=True)
class Smooth:
    """Column smoothing from random-token activation statistics (the stats stage; FORMAT v2)."""

    alpha: float = 0.25  # s_i = (E[x_i²] / c_i)^alpha
    max_ratio: float = 16.0  # each s_i within [1/max_ratio, max_ratio] after normalizing to geometric mean 1
    sequences: int = 16  # random-token sequences of the stats pass
    length: int = 256  # tokens per sequence (the first is BOS)
    seed: int = 0
    probe: bool = True  # also measure per-tensor sensitivities (for quantize.target_bpw)
    probe_sequences: int = 4  # on the first this-many sequences (each probe re-runs one layer)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ManifestError(f"quantize.smooth.alpha: must be in [0, 1], got {self.alpha}")
        if self.max_ratio < 1.0:
            raise ManifestError(f"quantize.smooth.max_ratio: must be >= 1, got {self.max_ratio}")
        if self.sequences < 1 or self.length < 2 or self.probe_sequences < 1:
            raise ManifestError("quantize.smooth: sequences and probe_sequences must be >= 1, length >= 2")


@dataclass(frozen=True)
class Quantize:
    bits: int = 5
    block_size: int = 128
    keep_bf16: tuple[str, ...] = DEFAULT_KEEP
    overrides: dict[str, int] = field(default_factory=dict)  # glob -> bits; the first matching pattern wins
    min_elements: int = 256  # smaller tensors are kept: their codebook and scales would cost more than they save
    sign_seed: int | None = 0  # null: no sign diagonal (not recommended: offset blocks collapse)
    scale: Literal["l2", "lsq"] = "lsq"
    fit_codebook: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    smooth: Smooth | None = None  # null: no smoothing (format v1 artifacts)
    target_bpw: float | None = None  # average stored bits per quantized weight; bits allocated by sensitivity

    def __post_init__(self) -> None:
        _check_bits(self.bits, "quantize.bits")
        if self.target_bpw is not None and not 2.0 < self.target_bpw <= 9.0:
            raise ManifestError(f"quantize.target_bpw: must be in (2, 9], got {self.target_bpw}")
        for pattern, bits in self.overrides.items():
            _check_bits(bits, f"quantize.overrides[{_quote(pattern)}]")
        if self.block_size < 8 or self.block_size > 4096 or self.block_size & (self.block_size - 1):
            raise ManifestError(f"quantize.block_size: must be a power of two in 8..4096, got {self.block_size}")
        if self.min_elements < 0:
            raise ManifestError("quantize.min_elements: must be >= 0")
        if self.sign_seed is not None and not 0 <= self.sign_seed < 2**64:
            raise ManifestError("quantize.sign_seed: must be in 0..2**64-1 or null")


@dataclass(frozen=True)
class Verify:
    min_cos_sim: float = 0.998

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_cos_sim <= 1.0:
            raise ManifestError(f"verify.min_cos_sim: must be in [-1, 1], got {self.min_cos_sim}")


@dataclass(frozen=True)
class KVCache:
    """load_check.kv_cache: the compressed KV cache (pipeline.runtime.kv_cache.KVCacheConfig) used while measuring."""

    bits: int = 3
    residual: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4):
            raise ManifestError(f"load_check.kv_cache.bits: must be 2, 3 or 4, got {self.bits}")
        if self.residual < 0:
            raise ManifestError("load_check.kv_cache.residual: must be >= 0")


@dataclass(frozen=True)
class LoadCheck:
    enabled: bool = True  # runs only where a GPU is present
    runtime: Literal["int4", "bf16"] = "int4"
    max_vram_gb: float = 22.0
    context_tokens: int = 4096
    # Token embedding in host RAM and an int8 copy as the (tied) output layer: -1.4 GB of GPU memory on Gemma-4-31B.
    host_embedding: bool = False
    kv_cache: KVCache | None = None  # null: transformers' BF16 DynamicCache

    def __post_init__(self) -> None:
        if self.max_vram_gb <= 0:
            raise ManifestError("load_check.max_vram_gb: must be > 0")
        if self.context_tokens < 1:
            raise ManifestError("load_check.context_tokens: must be >= 1")


@dataclass(frozen=True)
class Slurm:
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    cpus: int = 8
    mem: str = "64G"
    gpus: int = 0
    parallel: int = 16  # at most this many array tasks at once (%P)
    extra: tuple[str, ...] = ()  # more '#SBATCH ...' option lines, verbatim

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.gpus < 0 or self.parallel < 1:
            raise ManifestError("slurm: cpus and parallel must be >= 1, gpus >= 0")
        for line in self.extra:
            if "\n" in line or not line.startswith("--"):
                raise ManifestError(f"slurm.extra: {_quote(line)} must be one sbatch option starting with '--'")


@dataclass(frozen=True)
class Manifest:
    name: str
    source: Source
    destination: Destination
    quantize: Quantize = field(default_factory=Quantize)
    verify: Verify = field(default_factory=Verify)
    load_check: LoadCheck = field(default_factory=LoadCheck)
    slurm: Slurm = field(default_factory=Slurm)
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ManifestError(f"name: {_quote(self.name)} must be 1 to 96 letters, digits, '.', '_' or '-'")
        if self.version != MANIFEST_VERSION:
            raise ManifestError(f"version: manifest version {self.version} is not supported (this hlwq reads 1)")
        if self.source.path is not None and self.destination.path is not None:
            overlap("destination.path", self.destination.path, "source.path", self.source.path)

    def bits_for(self, tensor: str) -> int:
        from fnmatch import fnmatchcase

        return next((b for p, b in self.quantize.overrides.items() if fnmatchcase(tensor, p)), self.quantize.bits)


def overlap(what: str, path: str | Path, other_what: str, other: str | Path) -> None:
    """Refuse two folders that are the same or nested: publishing into one would replace the other."""
    a, b = Path(path).resolve(), Path(other).resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise ManifestError(f"{what} {path} and {other_what} {other} are the same folder or one is inside the other: "
                            f"publishing there would destroy {other_what}")  # fmt: skip


def _quote(value: Any, limit: int = 200) -> str:
    """repr(value) for an error line, cut to `limit` characters: a value can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _one_of(repo: str | None, path: str | None, where: str) -> None:
    if (repo is None) == (path is None):
        raise ManifestError(f"{where}: give exactly one of 'repo' or 'path'")


def _check_bits(bits: int, where: str) -> None:
    if not 2 <= bits <= 8:
        raise ManifestError(f"{where}: bits must be in 2..8, got {bits}")


def params_hash(obj: Any) -> str:
    """Stable hash of a config section (dataclass or plain data) for the resume state."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint from the dataclasses above; dataclass hints recurse."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), key)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ManifestError(
                f"{key}: must be one of {', '.join(map(str, typing.get_args(hint)))}, got {_quote(value)}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ManifestError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_convert(v, typing.get_args(hint)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{key}: expected a mapping, got {type(value).__name__}")
        kt, vt = typing.get_args(hint)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}[{_quote(k)}]") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ManifestError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {_quote(value)}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ManifestError(f"{where or 'manifest'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            raise ManifestError(f"{prefix}{str(key)[:200]}: unknown key (known: {', '.join(fields)})")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(f"{prefix}{name}: required key is missing")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def parse_manifest(data: Any) -> Manifest:
    return typing.cast(Manifest, _build(Manifest, data, ""))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases (a few hundred bytes of nested aliases expand to gigabytes) and without
    duplicate keys (the later one would silently win)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_quote(key)}",
                                                        key_node.start_mark)  # fmt: skip
            seen.add(key)
        return dict(super().construct_mapping(node, deep=deep))


def strict_yaml(text: str) -> Any:
    """Parse YAML that may come from anyone (manifests, a source's README front matter): no aliases, no duplicate
    keys. Raises yaml.YAMLError."""
    return yaml.load(text, Loader=_StrictLoader)


def load_manifest(path: str | Path) -> Manifest:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ManifestError(f"{p}: cannot read manifest ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{p}: not a text file") from None
    try:
        data = strict_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        raise ManifestError(f"{p}: invalid YAML{where}" + (f": {str(problem)[:200]}" if problem else "")) from None
    return parse_manifest(data)
