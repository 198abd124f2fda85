"""Stage upload: publish artifact/ to `destination`: a local folder (copied, then renamed into place) or a Hub
repo (stages/hub.py). Rerunning after success sends nothing.

A local destination is only ever replaced when hlwq made it: every folder it writes there carries a MARKER file
naming the manifest. Anything else (a user's folder, the source checkpoint) is refused, never wiped.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline.context import Context
from pipeline.errors import StageError
from pipeline.faults import maybe_enospc
from pipeline.manifest import Manifest

NAME = "upload"
MARKER = ".hlwq-artifact"
log = logging.getLogger(__name__)


def _made_by(folder: Path) -> str | None:
    """The manifest name in `folder`'s marker, or None when hlwq did not make it."""
    try:
        return (folder / MARKER).read_text().strip() or None
    except OSError:
        return None


def check_destination(manifest: Manifest) -> Path | None:
    """The local destination when it is free, empty, or an earlier artifact of this manifest; refuses anything else.
    Called before any work starts, and again right before the folder is replaced."""
    if manifest.destination.path is None:
        return None
    target = Path(manifest.destination.path)
    if not target.exists() and not target.is_symlink():
        return target
    if target.is_symlink() or not target.is_dir():
        raise StageError(f"destination.path {target} exists and is not a folder hlwq made: refusing to replace it")
    made_by = _made_by(target)
    if made_by is None and any(target.iterdir()):
        raise StageError(f"destination.path {target} exists and was not made by hlwq (no {MARKER} file): refusing "
                         "to replace it; remove it yourself or choose another path")  # fmt: skip
    if made_by is not None and made_by != manifest.name:
        raise StageError(f"destination.path {target} holds the artifact of manifest {made_by[:100]!r}, not "
                         f"{manifest.name!r}: refusing to replace it")  # fmt: skip
    return target


def remove_leftovers(target: Path) -> int:
    """Delete the temp and old folders that an interrupted upload left beside `target` (only marked ones: ours)."""
    n = 0
    for p in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        if p.is_dir() and not p.is_symlink() and (p.name.split(".")[-1].startswith(("tmp-", "old-"))):
            if _made_by(p) is not None or not any(p.iterdir()):
                shutil.rmtree(p)
                n += 1
    return n


def _copy_local(ctx: Context, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if remove_leftovers(target):
        log.info("upload: removed the temp folder of an interrupted upload beside %s", target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / MARKER).write_text(ctx.manifest.name + "\n")  # first, so even a killed copy is known to be ours
        shutil.copytree(ctx.artifact, tmp, dirs_exist_ok=True)
        maybe_enospc("upload:copy")
        check_destination(ctx.manifest)  # again: the folder may have appeared while we worked
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(ctx: Context) -> dict[str, Any]:
    dest = ctx.manifest.destination
    if dest.repo is not None:
        from stages.hub import upload_artifact

        return upload_artifact(ctx)
    check_destination(ctx.manifest)
    target = Path(str(dest.path))
    _copy_local(ctx, target)
    files = sorted(p for p in target.rglob("*") if p.is_file())
    # Recorded as outputs (absolute paths): a destination deleted by hand is published again by the next run.
    return {
        "outputs": {os.path.abspath(p): {"size": p.stat().st_size} for p in files},
        "info": {"destination": str(target), "files": len(files)},
    }
