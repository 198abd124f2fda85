"""`hlwq`: the only place that prints for users and chooses exit codes."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger("hlwq")
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}


def _workdir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.workdir) if args.workdir else Path("work") / name


def _open(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pipeline.manifest import load_manifest
    from pipeline.runner import open_run

    m = load_manifest(args.manifest)
    return open_run(m, _workdir(args, m.name))


def cmd_convert(args: argparse.Namespace) -> int:
    from pipeline.runner import convert

    ctx = _open(args)
    for stage in args.redo or []:
        _redo(ctx, stage, None)
    units = None
    if args.shard is not None:
        units = [_unit_by_index(ctx, args.shard)]
    t0 = time.monotonic()
    convert(ctx, units, build=not args.no_finalize, until=args.until)
    print(f"hlwq: {ctx.manifest.name}: done in {time.monotonic() - t0:.1f} s -> {ctx.artifact}")
    return 0


def _unit_by_index(ctx, index: int) -> str:  # type: ignore[no-untyped-def]
    if not 0 <= index < len(ctx.units):
        raise PipelineError(f"--shard {index}: the source has {len(ctx.units)} shard(s) (0..{len(ctx.units) - 1})")
    return str(ctx.units[index])


def _redo(ctx, stage: str, shard: int | None) -> int:  # type: ignore[no-untyped-def]
    from pipeline.runner import ALL_STAGES

    if stage not in ALL_STAGES:
        raise PipelineError(f"unknown stage {stage!r} (stages: {', '.join(ALL_STAGES)})")
    unit = None if shard is None else _unit_by_index(ctx, shard)
    return int(ctx.state.clear(stage, unit))


def cmd_redo(args: argparse.Namespace) -> int:
    ctx = _open(args)
    n = _redo(ctx, args.stage, args.shard)
    print(f"hlwq: cleared {n} record(s) of stage {args.stage}; the next convert redoes that work")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.runner import ARTIFACT_STAGES, ARTIFACT_UNIT, SHARD_STAGES, stats, upload

    ctx = _open(args)
    print(f"{ctx.manifest.name}: source {ctx.source.name}@{ctx.source.revision}, workdir {ctx.workdir}")
    rows = [(stats.NAME, stats.UNIT)] if stats.needed(ctx.manifest) else []
    rows += [(s.NAME, u) for u in ctx.units for s in SHARD_STAGES]
    rows += [(s.NAME, ARTIFACT_UNIT) for s in (*ARTIFACT_STAGES, upload)]
    print(f"{'stage':<11} {'unit':<28} {'status':<8} {'bytes':>12} {'seconds':>8}  note")
    counts: dict[str, int] = {}
    for stage, unit in rows:
        rec = ctx.state.read(stage, unit) or {}
        holder = ctx.state.holder(stage, unit)
        status = "running" if holder else rec.get("status", "pending")
        gone = ctx.state.missing_output(rec) if status == "done" else None
        if gone:  # done once, but what it made is gone (a deleted destination): the next convert redoes it
            status, rec = "pending", {**rec, "error": f"output gone: {gone}"}
        counts[status] = counts.get(status, 0) + 1
        size = rec.get("bytes_out") or rec.get("bytes_in") or ""
        note = (
            rec.get("error", "")
            if status in ("failed", "pending")
            else (f"{holder['host']}:{holder['pid']}" if holder else "")
        )
        print(f"{stage:<11} {unit:<28} {status:<8} {size!s:>12} {rec.get('seconds', '')!s:>8}  {note}")
    print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if counts.get("failed") else 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from pipeline.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(Path(args.out), shards=args.shards, seed=args.seed, layers=args.layers)
    print(f"hlwq: tiny Gemma-4 checkpoint ({args.shards} shards) at {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hlwq", description="Hadamard-Lloyd weight quantization: BF16 -> 5-bit artifact")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="run (or resume) the pipeline of a manifest")
    c.add_argument("manifest")
    c.add_argument("--workdir", help="default: work/<name>")
    c.add_argument("--shard", type=int, help="only this shard index (0-based): download, quantize, verify")
    c.add_argument("--no-finalize", action="store_true", help="stop after the per-shard stages")
    c.add_argument("--redo", action="append", metavar="STAGE", help="forget STAGE's records first (repeatable)")
    c.add_argument("--until", choices=("download", "stats"),
                   help="stop after this stage (download: these shards; stats: all downloads, then stats)")  # fmt: skip
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("status", help="per stage x shard: done / pending / failed / running, bytes, time")
    s.add_argument("manifest")
    s.add_argument("--workdir")
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("redo", help="forget a stage's records (all shards, or one) so the next convert redoes it")
    r.add_argument("manifest")
    r.add_argument("stage")
    r.add_argument("--shard", type=int)
    r.add_argument("--workdir")
    r.set_defaults(func=cmd_redo)

    t = sub.add_parser("tiny", help="write the embedded tiny Gemma-4 checkpoint (seeded, offline)")
    t.add_argument("out")
    t.add_argument("--shards", type=int, default=3)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny)

    for register in _plugins():
        register(sub)
    return p


def _plugins():  # type: ignore[no-untyped-def]
    """Subcommands that live beside their stages (slurm, bench, ...), registered if present."""
    out = []
    for mod in ("stages.slurm", "bench.quality", "pipeline.chat", "pipeline.demo"):
        try:
            module = __import__(mod, fromlist=["register_cli"])
        except ModuleNotFoundError:
            continue
        out.append(module.register_cli)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not {"-v", "--verbose"} & set(argv):  # before any command imports torchao (via transformers)
        from pipeline.quiet import quiet_libraries

        quiet_libraries()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        return int(args.func(args))
    except PipelineError as e:
        print(f"hlwq: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # The host, not a bug: a full disk, a read-only or unwritable folder, a path too long for the file system.
        where = f": {str(e.filename)[:200]}" if e.filename else ""
        print(f"hlwq: error: {e.strerror} ({errno.errorcode.get(e.errno or 0, e.errno)}){where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hlwq: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line for the user, the traceback only with HLWQ_DEBUG
        print(f"hlwq: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        if os.environ.get("HLWQ_DEBUG"):
            traceback.print_exc()
        return 70


if __name__ == "__main__":
    sys.exit(main())
