"""Run a manifest on a Slurm cluster: one array task per source shard, then a finalize job.

    array task i:  hlwq convert MANIFEST --workdir W --shard i --no-finalize   (download -> quantize -> verify)
    finalize:      hlwq convert MANIFEST --workdir W   (--dependency=afterok:<array>; builds, checks, uploads)

With smoothing or a target bpw (the stats stage), two jobs go before that array:
    download task i:  ... --shard i --until download
    stats:            ... --until stats   (--dependency=afterok:<download array>; the float pass, once)
and the quantize array waits for the stats job (--dependency=afterok:<stats>).

Tasks on different nodes share W: the run state's O_EXCL locks and atomic renames keep them apart, and each task
only writes its own shard's files. The generated scripts and the submitted job ids are kept under W/slurm/, so
`status` and `resubmit` work from any login node. `nightly` is the cheap periodic entry point: it submits only
when the source revision has no published artifact yet.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import shlex
import shutil
import site
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ManifestError, SlurmError
from pipeline.manifest import Manifest, load_manifest
from pipeline.shards import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

ARRAY_SCRIPT = "convert-array.sbatch"
DOWNLOAD_SCRIPT = "download-array.sbatch"
STATS_SCRIPT = "stats.sbatch"
FINALIZE_SCRIPT = "finalize.sbatch"
JOBS_FILE = "jobs.json"
# Slurm states after which a job never runs again (scontrol names).
TERMINAL = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
     "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"}
)  # fmt: skip
_SAFE_VALUE = re.compile(r"^[^\s'\"\\]+$")


# ----------------------------------------------------------------------------------------------- scripts


@dataclass(frozen=True)
class Plan:
    """Everything the generated scripts depend on; two equal plans give byte-identical scripts."""

    manifest: Manifest
    manifest_path: Path  # absolute
    workdir: Path  # absolute
    cwd: Path  # where relative paths in the manifest resolve: the submitter's working directory
    python: str  # the interpreter running hlwq now

    @property
    def slurm_dir(self) -> Path:
        return self.workdir / "slurm"

    @property
    def log_dir(self) -> Path:
        return self.slurm_dir / "logs"


def make_plan(manifest_path: str | Path, workdir: str | Path | None) -> Plan:
    m = load_manifest(manifest_path)
    wd = Path(workdir) if workdir else Path("work") / m.name
    return Plan(m, Path(manifest_path).resolve(), wd.resolve(), Path.cwd().resolve(), sys.executable)


def array_spec(indices: list[int], parallel: int) -> str:
    """Shard indices -> Slurm's --array value, consecutive runs folded: [0,1,2,5] -> '0-2,5%P'."""
    if not indices:
        raise SlurmError("no shard to submit")
    parts: list[str] = []
    idx = sorted(set(indices))
    start = prev = idx[0]
    for i in [*idx[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return f"{','.join(parts)}%{parallel}"


def _checked(value: str, key: str) -> str:
    # One value per '#SBATCH' line: whitespace or quotes would silently change what sbatch reads.
    if not _SAFE_VALUE.match(value):
        raise ManifestError(f"{key}: {value[:200]!r} must be one word (no spaces or quotes)")
    return value


def resource_lines(m: Manifest) -> list[str]:
    s = m.slurm
    opts = ["--nodes=1", "--ntasks=1", f"--cpus-per-task={s.cpus}", f"--mem={_checked(s.mem, 'slurm.mem')}",
            f"--time={_checked(s.time, 'slurm.time')}"]  # fmt: skip
    if s.partition:
        opts.append(f"--partition={_checked(s.partition, 'slurm.partition')}")
    if s.account:
        opts.append(f"--account={_checked(s.account, 'slurm.account')}")
    if s.gpus:
        opts.append(f"--gres=gpu:{s.gpus}")
    return [*opts, *s.extra]


def hlwq_command(plan: Plan, *extra: str) -> str:
    args = [plan.python, "-m", "pipeline.cli", "convert", str(plan.manifest_path), "--workdir", str(plan.workdir)]
    return " ".join(shlex.quote(a) for a in args) + "".join(f" {e}" for e in extra)


def _code_root() -> Path | None:
    """Where the `pipeline` package lives when the interpreter would not find it by itself (an uninstalled checkout)."""
    root = Path(__file__).resolve().parents[1]
    return None if str(root) in (*site.getsitepackages(), site.getusersitepackages()) else root


def _script(header: str, options: list[str], command: str) -> str:
    lines = ["#!/bin/bash", *(f"# {h}" for h in header.splitlines()), *(f"#SBATCH {o}" for o in options)]
    lines.append("set -euo pipefail")
    # torch would start one thread per core of the node, oversubscribing it when tasks share a node.
    lines.append('export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"')
    root = _code_root()
    if root is not None:
        lines.append(f'export PYTHONPATH={shlex.quote(str(root))}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    return "\n".join([*lines, f"exec {command}", ""])


def _array_opts(plan: Plan, spec: str, begin: str | None, suffix: str, log_prefix: str) -> list[str]:
    opts = [f"--job-name=hlwq-{plan.manifest.name}{suffix}", f"--array={spec}", f"--chdir={plan.cwd}",
            f"--output={plan.log_dir}/{log_prefix}%A_%a.out", *resource_lines(plan.manifest)]  # fmt: skip
    if begin:
        opts.append(f"--begin={_checked(begin, '--begin')}")
    return opts


def _job_opts(plan: Plan, step: str) -> list[str]:
    # kill-on-invalid-dep: when a job this one waits for fails, it is cancelled instead of pending forever.
    return [f"--job-name=hlwq-{plan.manifest.name}-{step}", f"--chdir={plan.cwd}",
            f"--output={plan.log_dir}/{step}-%j.out", "--kill-on-invalid-dep=yes",
            *resource_lines(plan.manifest)]  # fmt: skip


def array_script(plan: Plan, spec: str, begin: str | None = None) -> str:
    m = plan.manifest
    opts = _array_opts(plan, spec, begin, "", "")
    header = (f"hlwq {m.name}: one array task per source shard (task id = shard index): download, quantize, verify.\n"
              "Written by `hlwq slurm submit`; tasks share the workdir through its run state and locks.")  # fmt: skip
    cmd = hlwq_command(plan, '--shard "$SLURM_ARRAY_TASK_ID"', "--no-finalize")
    return _script(header, opts, cmd)


def download_script(plan: Plan, spec: str, begin: str | None = None) -> str:
    m = plan.manifest
    opts = _array_opts(plan, spec, begin, "-download", "download-")
    header = (f"hlwq {m.name}: one array task per source shard: download only (the stats job needs every shard).\n"
              "Written by `hlwq slurm submit`.")  # fmt: skip
    return _script(header, opts, hlwq_command(plan, '--shard "$SLURM_ARRAY_TASK_ID"', "--until download"))


def stats_script(plan: Plan) -> str:
    m = plan.manifest
    opts = _job_opts(plan, "stats")
    header = (f"hlwq {m.name}: the stats stage (float model on seeded random tokens, one layer in memory).\n"
              "Submitted by `hlwq slurm submit` with --dependency=afterok:<download array job id>.")  # fmt: skip
    return _script(header, opts, hlwq_command(plan, "--until stats"))


def _with_stats(plan: Plan) -> bool:
    from stages import stats

    return stats.needed(plan.manifest)


def finalize_script(plan: Plan) -> str:
    m = plan.manifest
    opts = _job_opts(plan, "finalize")
    header = (f"hlwq {m.name}: finalize -> load_check -> card -> publish -> upload, once every shard is verified.\n"
              "Submitted by `hlwq slurm submit` with --dependency=afterok:<array job id>.")  # fmt: skip
    return _script(header, opts, hlwq_command(plan))


def sbatch_lines(plan: Plan) -> list[str]:
    a, f = shlex.quote(str(plan.slurm_dir / ARRAY_SCRIPT)), shlex.quote(str(plan.slurm_dir / FINALIZE_SCRIPT))
    if _with_stats(plan):
        d, s = shlex.quote(str(plan.slurm_dir / DOWNLOAD_SCRIPT)), shlex.quote(str(plan.slurm_dir / STATS_SCRIPT))
        return [f"sbatch --parsable {d}", f"sbatch --parsable --dependency=afterok:<download array job id> {s}",
                f"sbatch --parsable --dependency=afterok:<stats job id> {a}",
                f"sbatch --parsable --dependency=afterok:<array job id> {f}"]  # fmt: skip
    return [f"sbatch --parsable {a}", f"sbatch --parsable --dependency=afterok:<array job id> {f}"]


def render_dry_run(plan: Plan, scripts: dict[Path, str]) -> str:
    """What --dry-run prints: each script under a '==> PATH <==' line, byte for byte, then the sbatch calls."""
    out = [f"==> {path} <==\n{text}" for path, text in scripts.items()]
    return "\n".join([*out, "==> submitted with <==", *sbatch_lines(plan), ""])


# ----------------------------------------------------------------------------------------------- slurm commands


def _slurm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(args[0])
    if exe is None:
        raise SlurmError(f"{args[0]} not found on PATH (run this on a Slurm submit host)")
    try:
        proc = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]} did not answer within 120 s") from None
    if check and proc.returncode != 0:
        why = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise SlurmError(f"{args[0]} failed: {why}")
    return proc


def sbatch(script: Path, *options: str) -> str:
    """Submit `script` (its #SBATCH lines hold every option but `options`); returns the job id."""
    out = _slurm("sbatch", "--parsable", *options, str(script)).stdout.strip()
    job = out.split(";")[0]
    if not job.isdigit():
        raise SlurmError(f"sbatch printed {out!r}, not a job id")
    return job


def _expand_tasks(spec: str) -> list[int]:
    """scontrol's ArrayTaskId of a pending range ('1-3%2', '4,6') -> [1, 2, 3]."""
    out: list[int] = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += range(int(lo), int(hi or lo) + 1) if (hi or lo).isdigit() else []
    return out


def job_records(job_id: str) -> dict[str, dict[str, str]]:
    """{'<array>_<task>' or '<job>': {JobState, Reason, ExitCode, ...}} from `scontrol show job`.

    Empty when Slurm no longer knows the job (finished more than MinJobAge ago); sacct is not assumed to exist."""
    proc = _slurm("scontrol", "-o", "show", "job", job_id, check=False)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return {}
        raise SlurmError(f"scontrol show job {job_id} failed: {' '.join(proc.stderr.split())}")
    records: dict[str, dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" not in fields:
            continue
        if "ArrayJobId" in fields and "ArrayTaskId" in fields:
            for task in _expand_tasks(fields["ArrayTaskId"]):
                records[f"{fields['ArrayJobId']}_{task}"] = fields
        else:
            records[fields["JobId"]] = fields
    return records


# ----------------------------------------------------------------------------------------------- job records


def read_jobs(plan: Plan) -> dict[str, Any]:
    try:
        return dict(json.loads((plan.slurm_dir / JOBS_FILE).read_text()))
    except FileNotFoundError:
        return {"submissions": []}
    except json.JSONDecodeError:
        raise SlurmError(f"{plan.slurm_dir / JOBS_FILE} is not valid JSON") from None


def _record(plan: Plan, submission: dict[str, Any]) -> None:
    jobs = read_jobs(plan)
    subs = [s for s in jobs["submissions"] if s.get("id") != submission["id"]]
    atomic_write_json(plan.slurm_dir / JOBS_FILE, {"manifest": str(plan.manifest_path), "workdir": str(plan.workdir),
                                                   "submissions": [*subs, submission]})  # fmt: skip


def live_jobs(plan: Plan) -> list[str]:
    """Jobs or array tasks of the latest submission still pending or running (earlier ones were over before it)."""
    subs = read_jobs(plan)["submissions"]
    keys = ("download_job", "stats_job", "array_job", "finalize_job")
    jobs = [j for j in (subs[-1].get(k) for k in keys) if j] if subs else []
    return [k for j in jobs for k, r in job_records(j).items() if r.get("JobState") not in TERMINAL]


# ----------------------------------------------------------------------------------------------- submit


def _open(plan: Plan):  # type: ignore[no-untyped-def]
    from pipeline.runner import open_run

    return open_run(plan.manifest, plan.workdir)


def submit(plan: Plan, indices: list[int] | None = None, begin: str | None = None, dry_run: bool = False,
           kind: str = "submit") -> tuple[str, dict[str, Any] | None]:  # fmt: skip
    """Write the scripts and submit the array (all shards, or `indices`) and its finalize job.

    Returns (the scripts as --dry-run prints them, the recorded submission or None for a dry run)."""
    ctx = _open(plan)
    todo = list(range(len(ctx.units))) if indices is None else indices
    spec = array_spec(todo, plan.manifest.slurm.parallel) if todo else None
    scripts = {plan.slurm_dir / FINALIZE_SCRIPT: finalize_script(plan)}
    staged = bool(spec) and _with_stats(plan)
    if spec:
        scripts = {plan.slurm_dir / ARRAY_SCRIPT: array_script(plan, spec, None if staged else begin), **scripts}
    if spec and staged:
        scripts = {plan.slurm_dir / DOWNLOAD_SCRIPT: download_script(plan, spec, begin),
                   plan.slurm_dir / STATS_SCRIPT: stats_script(plan), **scripts}  # fmt: skip
    text = render_dry_run(plan, scripts)
    if dry_run:
        return text, None
    live = live_jobs(plan)
    if live:
        raise SlurmError(f"jobs of an earlier submission are still queued or running ({', '.join(live)}); "
                         "wait for them or scancel them first")  # fmt: skip
    plan.log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output folder
    for path, body in scripts.items():
        atomic_write_text(path, body)
    sub: dict[str, Any] = {
        "id": f"{kind}-{uuid.uuid4().hex[:12]}",
        "kind": kind,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "revision": ctx.source.revision,
        "shards": todo,
        "units": [ctx.units[i] for i in todo],
        "array": spec,
        "begin": begin,
        "array_job": None,
        "finalize_job": None,
    }
    dep: list[str] = []
    if staged:
        sub["download_job"] = sbatch(plan.slurm_dir / DOWNLOAD_SCRIPT)
        _record(plan, sub)
        sub["stats_job"] = sbatch(plan.slurm_dir / STATS_SCRIPT, f"--dependency=afterok:{sub['download_job']}")
        _record(plan, sub)
        dep = [f"--dependency=afterok:{sub['stats_job']}", "--kill-on-invalid-dep=yes"]
    if spec:
        sub["array_job"] = sbatch(plan.slurm_dir / ARRAY_SCRIPT, *dep)
        _record(plan, sub)  # recorded before the next sbatch, so a failure there still leaves the array findable
        dep = [f"--dependency=afterok:{sub['array_job']}"]
    elif begin:
        dep = [f"--begin={_checked(begin, '--begin')}"]
    sub["finalize_job"] = sbatch(plan.slurm_dir / FINALIZE_SCRIPT, *dep)
    _record(plan, sub)
    log.info("submitted %s: array job %s (%s), finalize job %s", plan.manifest.name, sub["array_job"], spec,
             sub["finalize_job"])  # fmt: skip
    return text, sub


# ----------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class ShardStatus:
    index: int
    unit: str
    state: str  # verified | failed | running | queued | missing
    task: str  # '<array>_<index>' of the latest submission that covered this shard, or ''
    slurm_state: str  # that task's Slurm state, '' when never submitted, 'gone' when Slurm forgot it
    note: str


def _task_of(jobs: dict[str, Any], index: int) -> str:
    for sub in reversed(jobs["submissions"]):
        if sub.get("array_job") and index in sub.get("shards", []):
            return f"{sub['array_job']}_{index}"
    return ""


def shard_statuses(plan: Plan, ctx: Any) -> list[ShardStatus]:  # ctx: pipeline.context.Context
    from pipeline.runner import SHARD_STAGES
    from stages import verify

    jobs = read_jobs(plan)
    tasks = [_task_of(jobs, i) for i in range(len(ctx.units))]
    slurm: dict[str, dict[str, str]] = {}
    for array_job in sorted({t.split("_")[0] for t in tasks if t}):
        slurm.update(job_records(array_job))
    out = []
    for i, unit in enumerate(ctx.units):
        task = tasks[i]
        rec = slurm.get(task, {})
        sstate = rec.get("JobState", "gone" if task else "")
        recs = [r for s in SHARD_STAGES if (r := ctx.state.read(s.NAME, unit))]
        failed = next((r for r in recs if r.get("status") == "failed"), None)
        log_file = plan.log_dir / f"{task}.out"
        if ctx.state.is_done(verify.NAME, unit, verify.fingerprint(ctx, unit)):
            state, note = "verified", ""
        elif sstate and sstate != "gone" and sstate not in TERMINAL:
            state, note = ("running" if sstate in ("RUNNING", "COMPLETING") else "queued"), rec.get("Reason", "")
        elif failed:
            state, note = "failed", f"{failed['stage']}: {failed.get('error', '')} (log {log_file})"
        elif sstate in TERMINAL and sstate != "COMPLETED":
            # Killed (time limit, memory, node failure) before a stage could record anything.
            state, note = "failed", f"task ended {sstate} with no stage record (log {log_file})"
        elif any(ctx.state.holder(s.NAME, unit) for s in SHARD_STAGES):
            state, note = "running", "outside Slurm"
        else:
            state, note = "missing", "task left no verified record" if task else "not submitted yet"
        out.append(ShardStatus(i, unit, state, task, sstate, note))
    return out


def artifact_status(ctx: Any) -> str:
    from pipeline.runner import ARTIFACT_STAGES, ARTIFACT_UNIT
    from stages import upload

    for stage in (*ARTIFACT_STAGES, upload):
        rec = ctx.state.read(stage.NAME, ARTIFACT_UNIT) or {}
        if rec.get("status") == "failed":
            return f"failed at {stage.NAME}: {rec.get('error', '')}"
    up = ctx.state.read(upload.NAME, ARTIFACT_UNIT) or {}
    return f"uploaded to {up.get('info', {}).get('destination', '?')}" if up.get("status") == "done" else "not built"


def status_text(plan: Plan) -> tuple[str, bool]:
    """The `slurm status` table and whether anything failed."""
    ctx = _open(plan)
    jobs = read_jobs(plan)
    lines = [f"{plan.manifest.name}: {len(ctx.units)} shard(s), source {ctx.source.name}@{ctx.source.revision}, "
             f"workdir {plan.workdir}"]  # fmt: skip
    for sub in jobs["submissions"]:
        lines.append(f"  {sub['kind']} {sub['submitted_at']}: array job {sub['array_job']} (--array={sub['array']}), "
                     f"finalize job {sub['finalize_job']}")  # fmt: skip
    if not jobs["submissions"]:
        lines.append("  no Slurm submission recorded in this workdir")
    shards = shard_statuses(plan, ctx)
    lines.append(f"{'shard':>5}  {'unit':<28} {'state':<9} {'slurm task':<14} {'slurm state':<12} note")
    for s in shards:
        lines.append(f"{s.index:>5}  {s.unit:<28} {s.state:<9} {s.task:<14} {s.slurm_state:<12} {s.note}".rstrip())
    fin_failed = False
    if jobs["submissions"] and jobs["submissions"][-1].get("finalize_job"):
        fin = jobs["submissions"][-1]["finalize_job"]
        rec = job_records(fin).get(fin, {})
        fstate = rec.get("JobState", "gone")
        fin_failed = fstate in TERMINAL and fstate not in ("COMPLETED", "CANCELLED")
        reason = rec.get("Reason", "None")
        lines.append(f"finalize job {fin}: {fstate}{'' if reason == 'None' else f' ({reason})'}"
                     + (f" (log {plan.log_dir}/finalize-{fin}.out)" if fin_failed else ""))  # fmt: skip
    art = artifact_status(ctx)
    lines.append(f"artifact: {art}")
    bad = [s for s in shards if s.state == "failed"]
    if bad:
        lines.append(f"failed shard(s): {', '.join(f'{s.index} ({s.unit})' for s in bad)}; after fixing the cause: "
                     f"hlwq slurm resubmit {plan.manifest_path} --workdir {plan.workdir}")  # fmt: skip
    return "\n".join(lines), bool(bad) or fin_failed or art.startswith("failed")


def resubmit(plan: Plan, dry_run: bool = False) -> tuple[str, dict[str, Any] | None]:
    """An array over the shards not verified (failed or missing), then finalize again; nothing when all is done."""
    from pipeline.runner import ARTIFACT_UNIT, artifact_fingerprint
    from stages import publish, upload

    ctx = _open(plan)
    shards = shard_statuses(plan, ctx)
    busy = [s for s in shards if s.state in ("queued", "running")]
    if busy:
        raise SlurmError(f"shard(s) {', '.join(str(s.index) for s in busy)} still queued or running; "
                         "wait for them (hlwq slurm status) or scancel them first")  # fmt: skip
    todo = [s.index for s in shards if s.state != "verified"]
    up = ctx.state.read(upload.NAME, ARTIFACT_UNIT) or {}
    built = ctx.state.is_done(publish.NAME, ARTIFACT_UNIT, artifact_fingerprint(ctx))
    if not todo and built and up.get("status") == "done":
        return "", None
    return submit(plan, todo, dry_run=dry_run, kind="resubmit")


# ----------------------------------------------------------------------------------------------- periodic runs


def current_revision(m: Manifest) -> str:
    """The source revision as it is now, ignoring any revision pinned in a workdir."""
    from pipeline.state import RunState
    from stages import download

    with tempfile.TemporaryDirectory(prefix="hlwq-rev-") as tmp:
        return download.resolve(m, RunState(Path(tmp))).revision


def published_revision(m: Manifest) -> str | None:
    """The source revision the published artifact was built from, or None when nothing is published."""
    if m.destination.repo is not None:
        try:
            ask = getattr(importlib.import_module("stages.hub"), "published_revision", None)
        except ModuleNotFoundError:
            ask = None
        if ask is None:
            raise SlurmError("nightly with a Hub destination needs stages.hub.published_revision (not available yet)")
        rev = ask(m)
        return None if rev is None else str(rev)
    from stages.finalize import REPORT

    try:
        report = json.loads((Path(m.destination.path or ".") / REPORT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return str(report.get("source", {}).get("revision")) or None


def _unpin(plan: Plan, rev: str) -> None:
    """A Hub source stays pinned to the commit its workdir first saw; a nightly run must convert the new one."""
    from pipeline.state import RunState
    from stages import hub

    state = RunState(plan.workdir)
    pinned = state.read(hub.PIN_STAGE, hub.PIN_UNIT)
    if pinned and pinned.get("sha") != rev:
        log.info("source moved from %s to %s: re-pinning %s", pinned.get("sha"), rev, plan.workdir)
        state.clear(hub.PIN_STAGE, hub.PIN_UNIT)


def nightly(plan: Plan, dry_run: bool = False) -> tuple[str, str]:
    """(outcome, text): 'up-to-date' or 'in-progress' (nothing submitted), 'dry-run' or 'submitted' with the text
    of the scripts (as --dry-run prints them)."""
    rev = current_revision(plan.manifest)
    if published_revision(plan.manifest) == rev:
        return "up-to-date", f"{plan.manifest.name}: the artifact for source revision {rev} is already published"
    if not dry_run:
        live = live_jobs(plan)
        if live:
            return "in-progress", f"{plan.manifest.name}: an earlier submission is still queued or running ({live[0]})"
        if plan.manifest.source.repo is not None:
            _unpin(plan, rev)
    text, sub = submit(plan, dry_run=dry_run, kind="nightly")
    if sub is None:
        return "dry-run", text
    return "submitted", (f"{plan.manifest.name}: source revision {rev} is not published yet: submitted array job "
                         f"{sub['array_job']} and finalize job {sub['finalize_job']}")  # fmt: skip


def cron_text(plan: Plan, schedule: str, scrontab: bool) -> str:
    if len(schedule.split()) != 5:
        raise SlurmError(f"--schedule {schedule!r}: expected 5 cron fields, e.g. '17 3 * * *'")
    cmd = " ".join(shlex.quote(a) for a in (plan.python, "-m", "pipeline.cli", "slurm", "nightly",
                                            str(plan.manifest_path), "--workdir", str(plan.workdir)))  # fmt: skip
    cd = f"cd {shlex.quote(str(plan.cwd))} && "
    plan.log_dir.mkdir(parents=True, exist_ok=True)  # cron and scrontab open the log before hlwq runs
    if not scrontab:
        logf = shlex.quote(str(plan.log_dir / "nightly.log"))
        return f"{schedule} {cd}{cmd} >> {logf} 2>&1\n"
    s = plan.manifest.slurm
    opts = [f"--job-name=hlwq-{plan.manifest.name}-nightly", "--time=00:15:00", "--cpus-per-task=1",
            f"--output={plan.log_dir}/nightly-%j.out"]  # fmt: skip
    opts += [f"--partition={s.partition}"] if s.partition else []
    opts += [f"--account={s.account}"] if s.account else []
    return "".join(f"#SCRON {o}\n" for o in opts) + f"{schedule} {cd}{cmd}\n"


# ----------------------------------------------------------------------------------------------- CLI
# These handlers are `hlwq slurm ...` subcommands registered into pipeline/cli.py: CLI code, so they print.


def _cmd_submit(args: argparse.Namespace) -> int:
    plan = make_plan(args.manifest, args.workdir)
    text, sub = submit(plan, begin=args.begin, dry_run=args.dry_run)
    if sub is None:
        print(text, end="")
        return 0
    print(f"hlwq: submitted array job {sub['array_job']} (--array={sub['array']}) and finalize job "
          f"{sub['finalize_job']}; scripts and logs in {plan.slurm_dir}")  # fmt: skip
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    text, failed = status_text(make_plan(args.manifest, args.workdir))
    print(text)
    return 1 if failed else 0


def _cmd_resubmit(args: argparse.Namespace) -> int:
    plan = make_plan(args.manifest, args.workdir)
    text, sub = resubmit(plan, dry_run=args.dry_run)
    if not text:
        print(f"hlwq: {plan.manifest.name}: every shard is verified and the artifact uploaded; nothing to resubmit")
    elif sub is None:
        print(text, end="")
    else:
        print(f"hlwq: resubmitted shard(s) {sub['array'] or 'none'} as array job {sub['array_job']}, "
              f"finalize job {sub['finalize_job']}")  # fmt: skip
    return 0


def _cmd_nightly(args: argparse.Namespace) -> int:
    outcome, text = nightly(make_plan(args.manifest, args.workdir), dry_run=args.dry_run)
    if outcome == "dry-run":
        print(text, end="")
    elif outcome == "submitted":
        print(f"hlwq: {text}")
    else:
        print(f"hlwq: {text}; nothing to do")
    return 0


def _cmd_cron(args: argparse.Namespace) -> int:
    print(cron_text(make_plan(args.manifest, args.workdir), args.schedule, args.scrontab), end="")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("slurm", help="run a manifest on a Slurm cluster: one array task per shard + finalize")
    sub = p.add_subparsers(dest="slurm_command", required=True)

    def add(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("manifest")
        c.add_argument("--workdir", help="shared by every node; default: work/<name>")
        c.set_defaults(func=func)
        return c

    s = add("submit", "submit the shard array and its finalize job", _cmd_submit)
    s.add_argument("--begin", metavar="TIME", help="start no earlier than TIME (sbatch --begin, e.g. 22:00, now+1hour)")
    s.add_argument("--dry-run", action="store_true", help="print the scripts and sbatch calls; submit nothing")
    add("status", "per shard: verified / failed / running / missing, with Slurm task states", _cmd_status)
    r = add("resubmit", "an array over the failed or missing shards only, then finalize again", _cmd_resubmit)
    r.add_argument("--dry-run", action="store_true")
    n = add("nightly", "submit only if the source revision has no published artifact yet (for cron)", _cmd_nightly)
    n.add_argument("--dry-run", action="store_true")
    c = add("cron", "print a crontab (or scrontab) line that runs `hlwq slurm nightly`", _cmd_cron)
    c.add_argument("--schedule", default="17 3 * * *", help="5 cron fields (default: 03:17 every day)")
    c.add_argument("--scrontab", action="store_true", help="print a Slurm scrontab entry instead of a crontab line")
