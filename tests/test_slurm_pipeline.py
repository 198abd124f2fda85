"""`hlwq slurm` against a real one-node Slurm (tests/slurm_local.py): an array task per shard + a finalize job give
the single-process bytes; a failed task is named by `status` and `resubmit` reruns only it; the dry run is what
gets submitted. The periodic mode and the error paths need no cluster."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline import cli
from stages import slurm as hs
from tests.conftest import artifact_bytes, run_cli, write_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_local import LocalSlurm, unavailable_reason

_CI = bool(os.environ.get("CI"))
_WHY_NOT = unavailable_reason()
UNITS = [f"model-0000{i}-of-00003" for i in (1, 2, 3)]
# One CPU per task and 4 slots: the three array tasks run side by side on the 2-core CI box.
SLURM_SECTION = {"cpus": 1, "mem": "500M", "time": "00:10:00", "parallel": 4}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    if _WHY_NOT:
        if _CI:
            pytest.fail(f"CI is set but {_WHY_NOT}")
        pytest.skip(_WHY_NOT)
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=4) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def reference(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process `hlwq convert` of the same manifest: the bytes the Slurm runs must reproduce."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    m = write_manifest(tmp / "m.yaml", tiny_src, tmp / "published", slurm=SLURM_SECTION)
    assert cli.main(["convert", str(m), "--workdir", str(tmp / "work")]) == 0
    return tmp / "work" / "artifact"


def _close(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_same_artifact(got: Path, want: Path) -> None:
    """Every file byte-identical, except that the report's verify metrics may differ in the last float bits: torch
    reduces in another order with another thread count (the tasks run with OMP_NUM_THREADS=1). A published local
    folder also holds upload's ownership marker, which is not part of the artifact."""
    from stages.upload import MARKER

    report = "hlwq_report.json"
    assert artifact_bytes(got, skip=(report, MARKER)) == artifact_bytes(want, skip=(report, MARKER))
    assert _close(json.loads((got / report).read_text()), json.loads((want / report).read_text()))


def _hlwq(slurm: LocalSlurm, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a fresh process (what a user or cron runs); sbatch passes this environment to the jobs."""
    return run_cli(*args, env={**slurm.env, **env})


@pytest.fixture
def hlwq_here(
    slurm: LocalSlurm, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> Callable[..., tuple[int, str]]:
    """The CLI in this process (torch already imported: ~3 s saved per call) -> (exit code, stdout)."""
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])

    def call(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = cli.main(list(args))
        return rc, capsys.readouterr().out

    return call


def _last_submission(workdir: Path) -> dict:
    return json.loads((workdir / "slurm" / "jobs.json").read_text())["submissions"][-1]


def _dry_run_scripts(text: str) -> dict[Path, str]:
    """'==> PATH <==' blocks of the --dry-run output -> their text, byte for byte."""
    parts = re.split(r"^==> (.+) <==\n", text, flags=re.M)
    blocks = dict(zip(parts[1::2], parts[2::2], strict=True))
    blocks.pop("submitted with")
    # Blocks are separated by one newline after each script's own final newline.
    return {Path(p): t.removesuffix("\n") for p, t in blocks.items()}


def _batch_script(slurm: LocalSlurm, job: str) -> str:
    """The script slurmctld stored for the job: what was really submitted."""
    return subprocess.run(["scontrol", "write", "batch_script", job, "-"], env=slurm.env, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


def test_array_gives_single_process_bytes_and_dry_run_is_what_ran(
    slurm: LocalSlurm, hlwq_here, tiny_src: Path, reference: Path, tmp_path: Path
) -> None:
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "published", slurm=SLURM_SECTION)
    work = tmp_path / "work"
    rc, out = hlwq_here("slurm", "submit", str(m), "--workdir", str(work), "--dry-run")
    assert rc == 0
    scripts = _dry_run_scripts(out)
    assert set(scripts) == {work / "slurm" / hs.ARRAY_SCRIPT, work / "slurm" / hs.FINALIZE_SCRIPT}
    assert not (work / "slurm").exists()  # a dry run writes and submits nothing
    assert "#SBATCH --array=0-2%4\n" in scripts[work / "slurm" / hs.ARRAY_SCRIPT]

    r = _hlwq(slurm, "slurm", "submit", str(m), "--workdir", str(work))
    assert r.returncode == 0, r.stderr
    sub = _last_submission(work)
    arr, fin = sub["array_job"], sub["finalize_job"]
    states = slurm.wait_jobs([arr, fin], timeout=120)
    assert states == {f"{arr}_0": "COMPLETED", f"{arr}_1": "COMPLETED", f"{arr}_2": "COMPLETED", fin: "COMPLETED"}
    for path, job in ((work / "slurm" / hs.ARRAY_SCRIPT, arr), (work / "slurm" / hs.FINALIZE_SCRIPT, fin)):
        assert path.read_text() == scripts[path] == _batch_script(slurm, job)
    # Each shard was done by its own array task (the pid in its record), not by the finalize job.
    pids = {u: json.loads((work / "state" / "quantize" / f"{u}.json").read_text())["pid"] for u in UNITS}
    assert len(set(pids.values())) == 3

    assert_same_artifact(work / "artifact", reference)
    assert_same_artifact(tmp_path / "published", reference)
    rc, out = hlwq_here("slurm", "status", str(m), "--workdir", str(work))
    assert rc == 0 and out.count(" verified ") == 3 and f"finalize job {fin}: COMPLETED" in out, out


def test_failed_task_is_named_and_resubmit_reruns_only_it(
    slurm: LocalSlurm, hlwq_here, tiny_src: Path, reference: Path, tmp_path: Path
) -> None:
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "published", slurm=SLURM_SECTION)
    work = tmp_path / "work"
    # Jobs inherit the submitter's environment: shard 1's task fails in quantize, the others succeed.
    r = _hlwq(slurm, "slurm", "submit", str(m), "--workdir", str(work), HLWQ_FAIL_AT=f"quantize:{UNITS[1]}")
    assert r.returncode == 0, r.stderr
    first = _last_submission(work)
    arr, fin = first["array_job"], first["finalize_job"]
    states = slurm.wait_jobs([arr, fin], timeout=120)
    assert states == {f"{arr}_0": "COMPLETED", f"{arr}_1": "FAILED", f"{arr}_2": "COMPLETED", fin: "CANCELLED"}

    rc, out = hlwq_here("slurm", "status", str(m), "--workdir", str(work))
    assert rc == 1, out
    row = next(line for line in out.splitlines() if UNITS[1] in line and "failed" in line)
    assert f"{arr}_1" in row and "FAILED" in row and "injected failure" in row
    assert f"failed shard(s): 1 ({UNITS[1]});" in out
    assert out.count(" verified ") == 2
    assert not (work / "artifact").exists()
    before = {u: (work / "state" / "quantize" / f"{u}.json").read_text() for u in (UNITS[0], UNITS[2])}

    # The cause is gone (no fault injected this time): only shard 1 is resubmitted.
    assert hlwq_here("slurm", "resubmit", str(m), "--workdir", str(work))[0] == 0
    second = _last_submission(work)
    assert (second["kind"], second["array"], second["shards"]) == ("resubmit", "1%4", [1])
    arr2, fin2 = second["array_job"], second["finalize_job"]
    assert slurm.wait_jobs([arr2, fin2], timeout=120) == {f"{arr2}_1": "COMPLETED", fin2: "COMPLETED"}
    logs = sorted(p.name for p in (work / "slurm" / "logs").glob(f"{arr2}_*.out"))
    assert logs == [f"{arr2}_1.out"]
    assert (work / "slurm" / hs.ARRAY_SCRIPT).read_text() == _batch_script(slurm, arr2)
    # The shards that had succeeded were not redone by anyone: their records are untouched.
    assert {u: (work / "state" / "quantize" / f"{u}.json").read_text() for u in before} == before

    assert_same_artifact(work / "artifact", reference)
    rc, out = hlwq_here("slurm", "status", str(m), "--workdir", str(work))
    assert rc == 0 and out.count(" verified ") == 3, out
    rc, out = hlwq_here("slurm", "resubmit", str(m), "--workdir", str(work))
    assert rc == 0 and "nothing to resubmit" in out, out


def test_sbatch_refusing_is_one_line(
    slurm: LocalSlurm, tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub", slurm={**SLURM_SECTION, "partition": "nosuch"})
    assert cli.main(["slurm", "submit", str(m), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hlwq: error: sbatch failed:") and "partition" in err.lower() and "\n" not in err
    assert hs.read_jobs(hs.make_plan(m, tmp_path / "w"))["submissions"] == []


def test_missing_sbatch_is_one_line(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to find there
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub", slurm=SLURM_SECTION)
    assert cli.main(["slurm", "submit", str(m), "--workdir", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == "hlwq: error: sbatch not found on PATH (run this on a Slurm submit host)\n"


def test_nightly_does_nothing_when_the_revision_is_published(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: only a run that submits nothing can pass
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub", slurm=SLURM_SECTION)
    work = tmp_path / "w"
    rev = hs.current_revision(hs.make_plan(m, work).manifest)
    assert rev.startswith("local-")

    # Nothing published yet, then an older revision published: a new run is due (shown by --dry-run).
    for published in (None, "local-0000000000000000"):
        if published:
            (tmp_path / "pub").mkdir()
            (tmp_path / "pub" / "hlwq_report.json").write_text(json.dumps({"source": {"revision": published}}))
        assert cli.main(["slurm", "nightly", str(m), "--workdir", str(work), "--dry-run"]) == 0
        assert "#SBATCH --array=0-2%4\n" in capsys.readouterr().out
    # Without --dry-run it has to submit, and there is no sbatch here.
    assert cli.main(["slurm", "nightly", str(m), "--workdir", str(work)]) == 2
    assert "sbatch not found" in capsys.readouterr().err

    (tmp_path / "pub" / "hlwq_report.json").write_text(json.dumps({"source": {"revision": rev}}))
    assert cli.main(["slurm", "nightly", str(m), "--workdir", str(work)]) == 0
    assert f"source revision {rev} is already published; nothing to do" in capsys.readouterr().out
    assert not (work / "slurm" / "jobs.json").exists()

    assert cli.main(["slurm", "cron", str(m), "--workdir", str(work), "--schedule", "5 2 * * *"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("5 2 * * * cd ") and f"-m pipeline.cli slurm nightly {m} --workdir {work}" in line
    assert cli.main(["slurm", "cron", str(m), "--workdir", str(work), "--scrontab"]) == 0
    assert "#SCRON --job-name=hlwq-tiny-nightly\n" in capsys.readouterr().out


def test_array_spec_and_script_options(tiny_src: Path, tmp_path: Path) -> None:
    assert hs.array_spec([7, 0, 1, 2, 5, 8], 3) == "0-2,5,7-8%3"
    assert hs.array_spec([3], 16) == "3%16"
    section = {**SLURM_SECTION, "partition": "gpu", "account": "lab", "gpus": 2, "extra": ["--qos=low"]}
    plan = hs.make_plan(write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub", slurm=section), tmp_path / "w")
    text = hs.array_script(plan, "1,3%4", begin="now+1hour")
    for opt in ("--array=1,3%4", "--partition=gpu", "--account=lab", "--gres=gpu:2", "--qos=low",
                "--begin=now+1hour", f"--output={tmp_path}/w/slurm/logs/%A_%a.out"):  # fmt: skip
        assert f"#SBATCH {opt}\n" in text
    assert text.rstrip().endswith('--shard "$SLURM_ARRAY_TASK_ID" --no-finalize')
    assert f"exec {sys.executable} -m pipeline.cli convert {tmp_path}/m.yaml --workdir {tmp_path}/w\n" in (
        hs.finalize_script(plan)
    )
    with pytest.raises(hs.ManifestError, match="--begin"):
        hs.array_script(plan, "0%1", begin="now +1 hour")


def test_held_lock_is_kept_fresh_for_other_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Array tasks on other nodes judge a lock by its age alone (they cannot see the holder's pid): a unit that
    # runs longer than the stale limit must keep refreshing its lock, or another node would take it over.
    from pipeline import state

    monkeypatch.setattr(state, "STALE_AFTER_S", 4.0)  # heartbeat every 1 s
    rs = state.RunState(tmp_path)
    with rs.lock("quantize", "model-00001-of-00003") as lock:
        os.utime(lock.path, (0, 0))  # as if it had not been refreshed since 1970
        assert rs.holder("quantize", "model-00001-of-00003") is None
        time.sleep(1.5)
        assert rs.holder("quantize", "model-00001-of-00003") is not None
    assert not lock.path.exists()
