"""What every stage sees: the manifest, the workdir and its state, the pinned source, the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.manifest import Manifest
from pipeline.state import RunState


@dataclass(frozen=True)
class SourceInfo:
    """The source pinned for the whole run: a revision, its shard list, and where shard files are read from."""

    kind: str  # "path" or "hub"
    name: str  # the local path or the Hub repo id
    revision: str  # a commit sha for the Hub; a content hash of the index for a local folder
    folder: Path  # where shard files and the other model files are (downloaded) on this host
    shards: dict[str, list[str]]  # shard file -> tensor names, from the index
    files: dict[str, str] = field(default_factory=dict)  # other model files (config, tokenizer, ...) -> hash
    shard_sha256: dict[str, str] = field(default_factory=dict)  # expected sha256 per shard, when the Hub gives it

    def unit(self, shard: str) -> str:
        return shard.removesuffix(".safetensors")

    def shard_of(self, unit: str) -> str:
        return unit + ".safetensors"


@dataclass(frozen=True)
class Context:
    manifest: Manifest
    workdir: Path
    state: RunState
    source: SourceInfo
    device: torch.device

    @property
    def units(self) -> list[str]:
        return [self.source.unit(s) for s in self.source.shards]

    def source_shard(self, unit: str) -> Path:
        return self.source.folder / self.source.shard_of(unit)

    def quantized_shard(self, unit: str) -> Path:
        return self.workdir / "quantized" / self.source.shard_of(unit)

    def report_path(self, unit: str) -> Path:
        return self.workdir / "reports" / f"{unit}.json"

    @property
    def staging(self) -> Path:
        return self.workdir / "staging"

    @property
    def artifact(self) -> Path:
        return self.workdir / "artifact"


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
