"""The pipeline, in the order of the diagram:

    per shard:  download -> quantize -> verify
    once:       finalize -> load_check -> card -> publish (staging/ -> artifact/) -> upload

With smoothing or a target bpw, the float model's random-token statistics are needed before any quantize:

    per shard:  download;   once: stats;   per shard: quantize -> verify;   once: finalize -> ...

Each (stage, unit) runs under a lock and is skipped when its record says done with the same fingerprint (hashes
of its inputs and of the parameters that shaped it). Several processes may share one workdir: a unit locked by
another live process is left to it, and the artifact is built once every shard is verified.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from functools import partial
from types import ModuleType
from typing import Any

from tqdm import tqdm

from pipeline import __version__
from pipeline.context import Context, pick_device
from pipeline.errors import LockedError, ManifestError, PipelineError, StageError
from pipeline.faults import maybe_die, maybe_fail
from pipeline.manifest import Manifest, overlap, params_hash
from pipeline.state import RunState
from stages import card, download, finalize, load_check, publish, quantize, stats, upload, verify

log = logging.getLogger(__name__)
SHARD_STAGES: tuple[ModuleType, ...] = (download, quantize, verify)
ARTIFACT_STAGES: tuple[ModuleType, ...] = (finalize, load_check, card, publish)
ALL_STAGES = [m.NAME for m in (download, stats, quantize, verify, *ARTIFACT_STAGES, upload)]
ARTIFACT_UNIT = "artifact"


def open_run(manifest: Manifest, workdir: Any) -> Context:
    state = RunState(workdir)
    source = download.resolve(manifest, state)
    return Context(manifest, workdir, state, source, pick_device(manifest.quantize.device))


def describe_error(e: BaseException) -> str:
    """One line for an unexpected exception; an OSError names its cause (ENOSPC...) and the path it hit."""
    if isinstance(e, OSError) and e.errno is not None:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)}){where}"[:400]
    return f"{type(e).__name__}: {e}"[:400]


def run_unit(
    ctx: Context, stage: str, unit: str, fingerprint: dict[str, str], work: Callable[[], dict[str, Any]]
) -> str:
    """Run one unit of work unless it is already done; returns 'done', 'skipped' or 'locked'."""
    if ctx.state.is_done(stage, unit, fingerprint):
        return "skipped"
    try:
        with ctx.state.lock(stage, unit):
            if ctx.state.is_done(stage, unit, fingerprint):  # finished by another process while we looked
                return "skipped"
            t0 = time.monotonic()
            try:
                maybe_die(f"{stage}:{unit}:start")
                maybe_fail(f"{stage}:{unit}")
                result = work()
                maybe_die(f"{stage}:{unit}:end")
            except Exception as e:
                msg = str(e) if isinstance(e, PipelineError) else describe_error(e)
                try:
                    ctx.state.write(stage, unit, {"status": "failed", "fingerprint": fingerprint, "error": msg,
                                                  "seconds": round(time.monotonic() - t0, 3)})  # fmt: skip
                except OSError as record_error:  # e.g. the disk is still full: the real cause must not be lost
                    log.warning("could not record the failure of %s %s: %s", stage, unit, describe_error(record_error))
                if isinstance(e, PipelineError):
                    raise
                raise StageError(f"{stage} {unit} failed: {msg}") from e
            ctx.state.write(stage, unit, {"status": "done", "fingerprint": fingerprint, "outputs": {}, "info": {},
                                          **result, "seconds": round(time.monotonic() - t0, 3)})  # fmt: skip
            return "done"
    except LockedError:
        return "locked"


def run_shard(ctx: Context, unit: str) -> bool:
    """download -> quantize -> verify for one shard; False when another process holds part of it."""
    for stage in SHARD_STAGES:
        outcome = run_unit(ctx, stage.NAME, unit, stage.fingerprint(ctx, unit), partial(stage.run, ctx, unit))
        if outcome == "locked":
            log.info("%s %s is held by another process; moving on", stage.NAME, unit)
            return False
    return True


def ensure_stats(ctx: Context, poll_s: float = 1.0) -> None:
    """Every shard downloaded (taking over the ones nobody holds), then the stats pass once; waits while another
    process runs either."""
    while True:
        pending = [u for u in ctx.units if not ctx.state.is_done(download.NAME, u, download.fingerprint(ctx, u))]
        for unit in pending:
            run_unit(ctx, download.NAME, unit, download.fingerprint(ctx, unit), partial(download.run, ctx, unit))
        pending = [u for u in ctx.units if not ctx.state.is_done(download.NAME, u, download.fingerprint(ctx, u))]
        if not pending:
            fp = stats.fingerprint(ctx)
            if run_unit(ctx, stats.NAME, stats.UNIT, fp, partial(stats.run, ctx)) != "locked":
                return
        time.sleep(poll_s)


def artifact_fingerprint(ctx: Context) -> dict[str, str]:
    verified = [(u, ctx.state.read(verify.NAME, u) or {}) for u in ctx.units]
    # `hlwq bench` results left in <workdir>/quality/ go into the card: a new one rebuilds the artifact.
    bench = {
        p.name: f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(ctx.workdir.glob("quality/quality.*"))
    }
    inputs = params_hash(
        {u: [r.get("fingerprint"), r.get("outputs")] for u, r in verified} | {"files": ctx.source.files, "bench": bench}
    )
    m = ctx.manifest
    return {"inputs": inputs, "params": params_hash({"q": m.quantize, "l": m.load_check, "v": __version__})}


def build_artifact(ctx: Context) -> str:
    fp = artifact_fingerprint(ctx)
    if ctx.state.is_done(publish.NAME, ARTIFACT_UNIT, fp) and ctx.artifact.exists():
        return "skipped"
    try:
        with ctx.state.lock("build", ARTIFACT_UNIT):
            if ctx.state.is_done(publish.NAME, ARTIFACT_UNIT, fp) and ctx.artifact.exists():
                return "skipped"
            for stage in ARTIFACT_STAGES:
                # Inside the artifact lock each step runs again: staging/ is rebuilt from scratch every time.
                ctx.state.clear(stage.NAME, ARTIFACT_UNIT)
                run_unit(ctx, stage.NAME, ARTIFACT_UNIT, fp, partial(stage.run, ctx))
            return "done"
    except LockedError:
        return "locked"


def upload_artifact(ctx: Context) -> str:
    pub = ctx.state.read(publish.NAME, ARTIFACT_UNIT) or {}
    fp = {"inputs": params_hash(pub.get("outputs", {})), "params": params_hash(ctx.manifest.destination)}
    return run_unit(ctx, upload.NAME, ARTIFACT_UNIT, fp, lambda: upload.run(ctx))


def wait_for_shards(ctx: Context, units: list[str], poll_s: float = 1.0) -> None:
    """Wait for shards other processes hold, then take over any they left unfinished."""
    while units:
        time.sleep(poll_s)
        still = []
        for unit in units:
            if any(ctx.state.holder(s.NAME, unit) for s in SHARD_STAGES):
                still.append(unit)
            elif not run_shard(ctx, unit):
                still.append(unit)
        units = still


def run_identity(m: Manifest) -> dict[str, str]:
    """What one workdir may hold only one of at a time: the manifest name, its source and its quantize parameters."""
    q = {k: v for k, v in vars(m.quantize).items() if k != "device"}  # the device never changes bytes
    return {"name": m.name, "source": params_hash(m.source), "quantize": params_hash(q)}


def preflight(ctx: Context) -> None:
    """Refusals that need no work done: an unwritable workdir, a destination hlwq may not replace, overrides that
    match no tensor of the source."""
    try:
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        probe = ctx.workdir / f".hlwq-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"workdir {ctx.workdir} is not writable ({e.strerror})") from None
    dest = ctx.manifest.destination.path
    if dest is not None:
        overlap("destination.path", dest, "the workdir", ctx.workdir)
    upload.check_destination(ctx.manifest)
    names = [n for tensors in ctx.source.shards.values() for n in tensors]
    for pattern in ctx.manifest.quantize.overrides:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ManifestError(f"quantize.overrides[{pattern[:200]!r}]: matches no tensor of the source (a typo?)")


def convert(ctx: Context, units: list[str] | None = None, build: bool = True, until: str | None = None) -> None:
    """Run the shard stages (for `units`, default all), then, if `build`, the artifact and upload stages, while
    holding the workdir for this manifest. `until` = "download" or "stats" stops after that stage (Slurm runs them
    as their own jobs)."""
    preflight(ctx)
    describe = f"manifest {ctx.manifest.name!r}"
    with ctx.state.claim(run_identity(ctx.manifest), describe):
        _convert(ctx, units, build, until)


def _convert(ctx: Context, units: list[str] | None, build: bool, until: str | None) -> None:
    todo = units if units is not None else ctx.units
    log.info("convert %s: %d shard(s), source %s@%s, device %s", ctx.manifest.name, len(todo), ctx.source.name,
             ctx.source.revision, ctx.device)  # fmt: skip
    if until == "download":
        for unit in todo:
            run_unit(ctx, download.NAME, unit, download.fingerprint(ctx, unit), partial(download.run, ctx, unit))
        return
    if stats.needed(ctx.manifest) or until == "stats":
        ensure_stats(ctx)
    if until == "stats":
        return
    held = []
    for unit in tqdm(todo, desc=f"{ctx.manifest.name} shards", unit="shard", disable=None):
        if not run_shard(ctx, unit):
            held.append(unit)
    wait_for_shards(ctx, held)
    if not build:
        return
    missing = [u for u in ctx.units if not ctx.state.is_done(verify.NAME, u, verify.fingerprint(ctx, u))]
    if missing:
        raise StageError(f"cannot build the artifact: shard(s) not verified: {', '.join(missing)}")
    while build_artifact(ctx) == "locked":
        time.sleep(1.0)
    log.info("artifact ready: %s", ctx.artifact)
    upload_artifact(ctx)
