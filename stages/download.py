"""Stage download: pin the source revision, then make each source shard available locally and check it.

A local folder is read in place (checked against its index, hashed); a Hub repo is fetched shard by shard
(stages/hub.py). The revision is resolved once per run and pinned in the state, so shards never mix revisions.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from pipeline.context import Context, SourceInfo
from pipeline.errors import IntegrityError
from pipeline.manifest import Manifest
from pipeline.shards import (
    INDEX_NAME,
    SINGLE_NAME,
    check_regular,
    check_shard_matches_index,
    contained_file,
    is_carried,
    load_index,
    sha256_file,
)
from pipeline.state import RunState

NAME = "download"
log = logging.getLogger(__name__)


def resolve(manifest: Manifest, state: RunState) -> SourceInfo:
    """The run's source, pinned: a repeat call in the same workdir returns the recorded revision."""
    if manifest.source.repo is not None:
        from stages import hub

        return hub.resolve_source(manifest, state)
    folder = Path(manifest.source.path or ".")
    if not folder.is_dir():
        raise IntegrityError(f"source.path {folder} is not a folder")
    shards = load_index(folder)
    files = {}
    for p in sorted(folder.iterdir()):
        if not is_carried(p.name):
            continue
        target = contained_file(folder, p.name)
        if target is None:
            log.warning("source file %s is not a regular file inside %s (a link out of it?): not carried", p.name,
                        folder)  # fmt: skip
            continue
        files[p.name] = _file_fingerprint(target)
    index = folder / INDEX_NAME
    ident = index.read_bytes() if index.exists() else _file_fingerprint(folder / SINGLE_NAME).encode()
    revision = "local-" + hashlib.sha256(ident).hexdigest()[:16]
    return SourceInfo("path", str(folder), revision, folder, shards, files)


def _file_fingerprint(p: Path) -> str:
    check_regular(p)
    st = p.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def fingerprint(ctx: Context, unit: str) -> dict[str, str]:
    if ctx.source.kind == "hub":
        from stages import hub

        return hub.shard_fingerprint(ctx, unit)
    shard = ctx.source_shard(unit)
    local = _file_fingerprint(shard) if ctx.source.kind == "path" and shard.exists() else ""
    return {"inputs": f"{ctx.source.revision}:{unit}:{local}", "params": ""}


def run(ctx: Context, unit: str) -> dict[str, Any]:
    if ctx.source.kind == "hub":
        from stages import hub

        return hub.download_shard(ctx, unit)
    path = ctx.source_shard(unit)
    tensors = check_shard_matches_index(path, ctx.source.shards[ctx.source.shard_of(unit)])
    return {
        "outputs": {},
        "info": {"path": str(path), "sha256": sha256_file(path), "tensors": len(tensors)},
        "bytes_in": path.stat().st_size,
    }
