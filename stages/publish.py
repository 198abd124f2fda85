"""Stage publish: staging/ becomes artifact/ by one rename, so artifact/ only ever holds a complete artifact."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

from pipeline.context import Context

NAME = "publish"


def run(ctx: Context) -> dict[str, Any]:
    old = None
    if ctx.artifact.exists():
        old = ctx.workdir / f".artifact-old-{uuid.uuid4().hex[:8]}"
        ctx.artifact.rename(old)
    ctx.staging.rename(ctx.artifact)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    files = sorted(p for p in ctx.artifact.rglob("*") if p.is_file())
    return {"outputs": {str(p.relative_to(ctx.workdir)): {"size": p.stat().st_size} for p in files}}
