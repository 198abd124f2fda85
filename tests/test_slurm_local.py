"""Tests against a real one-node Slurm (tests/slurm_local.py): arrays, dependencies and failure reporting."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works with or without a conftest / package __init__
from slurm_local import LocalSlurm, pid_alive, unavailable_reason

_CI = bool(os.environ.get("CI"))
_WHY_NOT = unavailable_reason()
# Locally a missing Slurm only skips; in CI these tests must run, so the fixture fails instead.
if _WHY_NOT and not _CI:
    pytest.skip(_WHY_NOT, allow_module_level=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    if _WHY_NOT:
        pytest.fail(f"CI is set but {_WHY_NOT}")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    return path


def test_array_tasks_write_their_files(slurm: LocalSlurm, tmp_path: Path) -> None:
    # `python` must resolve to the submitter's venv interpreter inside the job (exported PATH).
    script = _script(
        tmp_path / "task.sh",
        'python -c "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.executable)" '
        '"$PWD/out_$SLURM_ARRAY_TASK_ID"\n',
    )
    job = slurm.sbatch("--array=0-2%2", f"--chdir={tmp_path}", f"--output={tmp_path}/%A_%a.log", str(script))
    states = slurm.wait_jobs([job], timeout=60)
    assert states == {f"{job}_{i}": "COMPLETED" for i in range(3)}
    for i in range(3):
        assert (tmp_path / f"out_{i}").read_text() == sys.executable


def test_dependent_job_runs_after(slurm: LocalSlurm, tmp_path: Path) -> None:
    first = slurm.sbatch(
        f"--chdir={tmp_path}", f"--output={tmp_path}/first.log", "--wrap", "sleep 1; echo from-first > first.txt"
    )
    # afterok: the second job only starts once the first finished OK, so first.txt must already exist.
    second = slurm.sbatch(
        f"--dependency=afterok:{first}",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/second.log",
        "--wrap",
        "cp first.txt second.txt",
    )
    assert slurm.wait_jobs([first, second], timeout=60) == {first: "COMPLETED", second: "COMPLETED"}
    assert (tmp_path / "second.txt").read_text() == "from-first\n"


def test_failing_task_is_reported_failed(slurm: LocalSlurm, tmp_path: Path) -> None:
    script = _script(tmp_path / "task.sh", '[ "$SLURM_ARRAY_TASK_ID" != 1 ] || exit 1\n')
    job = slurm.sbatch("--array=0-1", f"--chdir={tmp_path}", f"--output={tmp_path}/%A_%a.log", str(script))
    # A job depending on the failed array is cancelled (kill_invalid_depend), not left pending forever.
    after = slurm.sbatch(f"--dependency=afterok:{job}", f"--output={tmp_path}/after.log", "--wrap", "true")
    states = slurm.wait_jobs([job, after], timeout=60)
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "FAILED", after: "CANCELLED"}


def test_second_cluster_with_more_cpus_stops_by_pid(slurm: LocalSlurm, tmp_path: Path) -> None:
    # Own ports per cluster: a second one runs beside the module's cluster, and stop() leaves no daemon behind.
    with LocalSlurm(tmp_path / "other", cpus=4) as other:
        assert other.ctld_port != slurm.ctld_port
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%c %t"], env=other.env, capture_output=True, text=True, check=True
        ).stdout.split()
        assert out == ["4", "idle"]
        pids = [other.read_pid(d) for d in ("slurmctld", "slurmd")]
        assert all(p is not None and pid_alive(p) for p in pids)
    # Dead or a zombie (init in this VM does not reap daemonized processes).
    assert not any(p is not None and pid_alive(p) for p in pids)
