"""A real single-node Slurm cluster (slurmctld + slurmd on 127.0.0.1) for tests, kept entirely under one folder.

Needs the Debian `slurm-wlm` package (see .ci/install-slurm.sh) and root. Uses auth/none, so no munged is needed.
Clients talk to it through `LocalSlurm.env` (SLURM_CONF points at our slurm.conf), so /etc/slurm is never touched.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from pipeline.state import pid_alive  # also re-exported for the tests

# Job states after which a job never runs again; anything else (PENDING, RUNNING, COMPLETING, ...) means "wait".
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)

_DAEMONS = ("slurmctld", "slurmd")


def _which(exe: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-login or non-root PATH often lacks.
    return shutil.which(exe) or shutil.which(exe, path="/usr/sbin:/sbin:/usr/bin")


def slurm_available() -> bool:
    """True when the daemons and the submit client are installed."""
    return all(_which(exe) for exe in ("slurmctld", "slurmd", "sbatch"))


def _free_port_pair() -> tuple[int, int]:
    # Fresh ports per cluster, so a daemon left over from an earlier run (default 6817/6818) can never answer us.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in socks:
            s.bind(("0.0.0.0", 0))
        return socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(missing)"


class LocalSlurm:
    """A real single-node Slurm (slurmctld + slurmd) on 127.0.0.1, configured under one temp folder."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.node_name = ""
        self.ctld_port, self.slurmd_port = 0, 0
        self.env: dict[str, str] = {}
        self._started = False

    # ------------------------------------------------------------------ paths
    def pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    # ------------------------------------------------------------------ setup
    def _detect_node(self) -> tuple[str, int, int]:
        # slurmd -C prints what slurmd itself will detect; configuring more memory than that would drain the node.
        out = subprocess.run(
            [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", out))
        name = fields.get("NodeName") or socket.gethostname().split(".")[0]
        return name, int(fields.get("CPUs", os.cpu_count() or 1)), int(fields.get("RealMemory", 1))

    def _make_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        # Jobs inherit this environment (sbatch --export=ALL), so `python` in a job script is the venv's interpreter.
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, *(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)])
        return env

    def _write_conf(self, cpus: int, mem_mb: int) -> None:
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        plugstack = self.root / "plugstack.conf"
        plugstack.write_text("")  # isolate from /etc/slurm/plugstack.conf
        r = self.root
        lines = [
            "ClusterName=hlwqci",
            f"SlurmctldHost={self.node_name}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            # Only CPUs are consumable: jobs that do not ask for --mem still run side by side.
            "SelectTypeParameters=CR_CPU",
            # Let `cpus` exceed the real core count (more parallel array tasks on a 2-core CI box).
            "SlurmdParameters=config_overrides",
            # A job whose afterok dependency failed is cancelled instead of pending forever.
            "DependencyParameters=kill_invalid_depend",
            # Schedule on every submit/completion event instead of at most every 3 s (the default batch_sched_delay).
            "SchedulerParameters=batch_sched_delay=0",
            "ReturnToService=2",
            # scontrol is our only record of finished jobs (no slurmdbd): keep them for an hour.
            "MinJobAge=3600",
            "InactiveLimit=0",
            "KillWait=5",
            "Waittime=0",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={self.pid_file('slurmctld')}",
            f"SlurmdPidFile={self.pid_file('slurmd')}",
            f"SlurmctldLogFile={self.log_file('slurmctld')}",
            f"SlurmdLogFile={self.log_file('slurmd')}",
            f"PlugStackConfig={plugstack}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30) -> Self:
        """Write slurm.conf, start slurmctld then slurmd, and wait until the node is idle."""
        if self._started:
            return self
        if not slurm_available():
            raise RuntimeError("slurmctld/slurmd/sbatch not on PATH (run .ci/install-slurm.sh)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.node_name, detected_cpus, mem_mb = self._detect_node()
        self.ctld_port, self.slurmd_port = _free_port_pair()
        self._write_conf(self.cpus or detected_cpus, mem_mb)
        self.env = self._make_env()
        self._started = True
        atexit.register(self.stop)  # last resort if the caller never reaches stop()
        deadline = time.monotonic() + timeout
        try:
            for daemon in _DAEMONS:
                self._launch(daemon, deadline)
            self._wait_idle(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, daemon: str, deadline: float) -> None:
        # Both daemonize: the command returns once forked; stdout/stderr catch errors printed before logging is up.
        boot_log = self.root / "log" / f"{daemon}.stderr"
        with boot_log.open("w") as out:
            proc = subprocess.run(
                [_which(daemon) or daemon, "-f", str(self.conf)],
                check=False,
                env=self.env,
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        if proc.returncode != 0:
            raise RuntimeError(self._failure(f"{daemon} exited with {proc.returncode}"))
        while time.monotonic() < deadline:
            pid = self.read_pid(daemon)
            if pid is not None and pid_alive(pid):
                return
            time.sleep(0.05)
        raise RuntimeError(self._failure(f"{daemon} did not write a live PID to {self.pid_file(daemon)}"))

    def _wait_idle(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            for daemon in _DAEMONS:
                pid = self.read_pid(daemon)
                if pid is None or not pid_alive(pid):
                    raise RuntimeError(self._failure(f"{daemon} died during startup"))
            proc = subprocess.run(
                ["sinfo", "-h", "-N", "-n", self.node_name, "-o", "%t"],
                check=False,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=10,
            )
            state = proc.stdout.strip() or proc.stderr.strip()
            if proc.returncode == 0 and state == "idle":
                return
            time.sleep(0.1)
        raise RuntimeError(self._failure(f"node {self.node_name} not idle in time (last sinfo: {state!r})"))

    def _failure(self, what: str) -> str:
        parts = [f"LocalSlurm under {self.root}: {what}"]
        for daemon in _DAEMONS:
            for path in (self.root / "log" / f"{daemon}.stderr", self.log_file(daemon)):
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- tail of {path} ---\n{_tail(path)}")
        return "\n".join(parts)

    def read_pid(self, daemon: str) -> int | None:
        try:
            return int(self.pid_file(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop slurmd then slurmctld by the PIDs in their PID files (SIGTERM, wait, SIGKILL). Idempotent."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        ctld = self.read_pid("slurmctld")
        if ctld is not None and pid_alive(ctld):
            self._cancel_all_jobs()
        for daemon in reversed(_DAEMONS):
            pid = self.read_pid(daemon)
            if pid is None or not pid_alive(pid):
                continue
            # Guard against a recycled PID: only signal a process that really is this daemon.
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != daemon:
                    continue
            except OSError:
                continue
            self._signal(pid, signal.SIGTERM)
            end = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
            if pid_alive(pid):
                self._signal(pid, signal.SIGKILL)
                end = time.monotonic() + 5
                while pid_alive(pid) and time.monotonic() < end:
                    time.sleep(0.05)

    def _cancel_all_jobs(self) -> None:
        # Running jobs' slurmstepd would outlive slurmd; cancel through our own cluster and give them a moment.
        try:
            subprocess.run(
                ["scancel", "--full", "--user", "root"], check=False, env=self.env, capture_output=True, timeout=10
            )
            end = time.monotonic() + 10
            while time.monotonic() < end:
                proc = subprocess.run(
                    ["squeue", "-h", "-o", "%i"], check=False, env=self.env, capture_output=True, text=True, timeout=10
                )
                if proc.returncode != 0 or not proc.stdout.strip():
                    return
                time.sleep(0.1)
        except (OSError, subprocess.SubprocessError):
            pass

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    # ------------------------------------------------------------------ jobs
    def _job_records(self, job_id: str) -> dict[str, str]:
        """{job or array-task id: JobState} for one submitted id, from `scontrol show job` (one line per record)."""
        proc = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id],
            check=False,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return {job_id: "UNKNOWN"}
            raise RuntimeError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
        records: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            jid = re.search(r"\bJobId=(\d+)", line)
            state = re.search(r"\bJobState=(\S+)", line)
            if not jid or not state:
                continue
            array_job = re.search(r"\bArrayJobId=(\d+)", line)
            array_task = re.search(r"\bArrayTaskId=(\S+)", line)
            key = f"{array_job.group(1)}_{array_task.group(1)}" if array_job and array_task else jid.group(1)
            records[key] = state.group(1)
        return records

    def job_states(self, job_ids: list[str]) -> dict[str, str]:
        """Current states of the given jobs; array tasks keyed `<array id>_<task id>` (pending: e.g. `7_1-2%2`)."""
        states: dict[str, str] = {}
        for job_id in job_ids:
            states.update(self._job_records(str(job_id)))
        return states

    def wait_jobs(self, job_ids: list[str], timeout: float = 120) -> dict[str, str]:
        """Poll until every job (and every array task) is in a terminal state; return {job_or_task_id: state}."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while True:
            states = self.job_states(job_ids)
            if states and all(s in TERMINAL_STATES or s == "UNKNOWN" for s in states.values()):
                return states
            if time.monotonic() >= deadline:
                raise TimeoutError(f"jobs {job_ids} not finished after {timeout} s: {states}")
            time.sleep(0.2)

    def sbatch(self, *args: str, cwd: Path | None = None) -> str:
        """Run `sbatch --parsable ARGS` against this cluster and return the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            check=False,
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def unavailable_reason() -> str:
    """Why a LocalSlurm cannot run here ("" when it can): tests skip locally and fail under CI on it."""
    if not slurm_available():
        return "Slurm not installed (run .ci/install-slurm.sh)"
    if os.geteuid() != 0:
        return "LocalSlurm needs root (slurmd runs jobs as root)"
    return ""
