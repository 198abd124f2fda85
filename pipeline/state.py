"""Run state: one JSON record per (stage, unit), written only by the lock holder, always by atomic rename.

Locks are files linked into place with link(2) (atomic on local disks and NFS), so tasks on different hosts
sharing a workdir never work on the same unit; a lock whose owner died (same host, dead pid) or that has not
been refreshed for STALE_AFTER_S seconds is broken, one breaker at a time.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import LockedError
from pipeline.shards import atomic_write_json

STALE_AFTER_S = float(os.environ.get("HLWQ_LOCK_STALE_S", "600"))
BREAK_STALE_S = 30.0


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host; an exited process not yet reaped (a zombie) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@dataclass(frozen=True)
class Lock:
    path: Path

    def refresh(self) -> None:
        """Heartbeat: long units call this so other hosts do not take the lock for stale."""
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass


def _heartbeat(lock: Lock, stop: threading.Event) -> None:
    while not stop.wait(max(1.0, STALE_AFTER_S / 4)):
        lock.refresh()


class RunState:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.lock_dir = workdir / "locks"

    def _record_path(self, stage: str, unit: str) -> Path:
        return self.state_dir / stage / f"{unit}.json"

    def read(self, stage: str, unit: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self._record_path(stage, unit).read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write(self, stage: str, unit: str, record: dict[str, Any]) -> None:
        record = {**record, "stage": stage, "unit": unit, "host": socket.gethostname(), "pid": os.getpid(),
                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        atomic_write_json(self._record_path(stage, unit), record)

    def clear(self, stage: str, unit: str | None = None) -> int:
        paths = [self._record_path(stage, unit)] if unit else list((self.state_dir / stage).glob("*.json"))
        n = 0
        for p in paths:
            if p.exists():
                p.unlink()
                n += 1
        return n

    def records(self, stage: str) -> dict[str, dict[str, Any]]:
        out = {}
        for p in sorted((self.state_dir / stage).glob("*.json")):
            rec = self.read(stage, p.stem)
            if rec is not None:
                out[p.stem] = rec
        return out

    def is_done(self, stage: str, unit: str, fingerprint: dict[str, str]) -> bool:
        """Done, shaped by the same inputs and parameters, and every recorded output still there at its size."""
        rec = self.read(stage, unit)
        if not rec or rec.get("status") != "done" or rec.get("fingerprint") != fingerprint:
            return False
        return self.missing_output(rec) is None

    def missing_output(self, rec: dict[str, Any]) -> str | None:
        """The first recorded output that is gone or changed size (paths relative to the workdir, or absolute)."""
        for rel, meta in rec.get("outputs", {}).items():
            p = self.workdir / rel
            if not p.exists() or p.stat().st_size != meta["size"]:
                return str(rel)
        return None

    def _lock_path(self, stage: str, unit: str) -> Path:
        return self.lock_dir / stage / f"{unit}.lock"

    @staticmethod
    def _read_lock(p: Path) -> tuple[str, dict[str, Any], float] | None:
        """(raw text, owner, age in seconds) of a lock file, or None when there is none."""
        try:
            text = p.read_text()
            age = time.time() - p.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            info = None
        return text, info if isinstance(info, dict) else {}, age

    @staticmethod
    def _stale(info: dict[str, Any], age: float) -> bool:
        """A lock of a dead process on this host, or one not refreshed for STALE_AFTER_S (another host, or a file
        that is not ours: ours are never visible half-written)."""
        try:
            dead = info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", -1)))
        except (TypeError, ValueError):
            dead = False
        return dead or age > STALE_AFTER_S

    def holder(self, stage: str, unit: str) -> dict[str, Any] | None:
        """Who holds the lock, or None when it is free or stale."""
        got = self._read_lock(self._lock_path(stage, unit))
        if got is None or self._stale(got[1], got[2]):
            return None
        return dict(got[1])

    @staticmethod
    def _break(p: Path, seen: str) -> None:
        """Remove the stale lock `p` if it still holds `seen`. Breakers take turns through a `.break` file, so one
        that judged the old lock stale can never remove a fresh lock that another process took meanwhile."""
        brk = p.with_name(p.name + ".break")
        try:
            os.close(os.open(brk, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with suppress(FileNotFoundError):
                if time.time() - brk.stat().st_mtime > BREAK_STALE_S:  # a breaker died mid-break (it takes ms)
                    brk.unlink()
            return
        try:
            with suppress(FileNotFoundError):
                if p.read_text() == seen:
                    p.unlink()
        finally:
            brk.unlink(missing_ok=True)

    @contextmanager
    def lock(self, stage: str, unit: str) -> Iterator[Lock]:
        p = self._lock_path(stage, unit)
        p.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token})
        # The owner is written to a private file first, then linked into place: link(2) fails when the lock exists
        # (atomic on local disks and NFS) and the lock file is never visible empty or half-written.
        tmp = p.with_name(f".{p.name}.{token}.tmp")
        tmp.write_text(mine)
        try:
            for _ in range(5):
                try:
                    os.link(tmp, p)
                    break
                except FileExistsError:
                    got = self._read_lock(p)
                    if got is None:
                        continue  # released meanwhile
                    if self._stale(got[1], got[2]):
                        self._break(p, got[0])
                        continue
                    raise LockedError(f"{stage}/{unit} is being worked on by {got[1].get('host')}:"
                                      f"{got[1].get('pid')}") from None  # fmt: skip
            else:
                raise LockedError(f"{stage}/{unit}: could not take the lock")
        finally:
            tmp.unlink(missing_ok=True)
        # Heartbeat while held: otherwise a unit running longer than STALE_AFTER_S looks stale to other hosts.
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(Lock(p), stop), daemon=True)
        beat.start()
        try:
            yield Lock(p)
        finally:
            stop.set()
            beat.join()
            try:
                if p.read_text() == mine:  # never remove a lock that someone else took after ours went stale
                    p.unlink()
            except FileNotFoundError:
                pass

    @contextmanager
    def claim(self, identity: dict[str, str], describe: str) -> Iterator[None]:
        """Hold the workdir for one manifest (`identity`): any number of processes with the same identity may share
        it; while one holds it, another identity is refused. Each holder registers itself first and looks second,
        so of two different manifests starting at once at least one sees the other."""
        d = self.lock_dir / "workdir"
        d.mkdir(parents=True, exist_ok=True)
        me = d / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        atomic_write_json(me, {"identity": identity, "describe": describe, "host": socket.gethostname(),
                               "pid": os.getpid()})  # fmt: skip
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(Lock(me), stop), daemon=True)
        try:
            for other in sorted(d.glob("*.json")):
                got = None if other == me else self._read_lock(other)
                if got is None:
                    continue
                _, info, age = got
                if self._stale(info, age):
                    other.unlink(missing_ok=True)  # a holder that died: its registration is ours to drop
                elif info.get("identity") != identity:
                    raise LockedError(
                        f"workdir {self.workdir} is in use by {str(info.get('describe'))[:200]} "
                        f"({info.get('host')}:{info.get('pid')}); a different manifest (name, source or quantize "
                        "parameters) cannot share it while that run lasts: wait for it or use another --workdir"
                    )
            beat.start()
            yield
        finally:
            stop.set()
            if beat.is_alive():
                beat.join()
            me.unlink(missing_ok=True)
