"""Stage upload: publish artifact/ to `destination`: a local folder (copied, then renamed into place) or a Hub
repo (stages/hub.py). Rerunning after success sends nothing."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline.context import Context

NAME = "upload"


def run(ctx: Context) -> dict[str, Any]:
    dest = ctx.manifest.destination
    if dest.repo is not None:
        from stages.hub import upload_artifact

        return upload_artifact(ctx)
    target = Path(dest.path or ".")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(ctx.artifact, tmp)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return {"info": {"destination": str(target), "files": sum(1 for p in target.rglob("*") if p.is_file())}}
