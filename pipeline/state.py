"""Run state: one JSON record per (stage, unit), written only by the lock holder, always by atomic rename.

Locks are files created with O_CREAT|O_EXCL (atomic on local disks and NFSv3+), so tasks on different hosts
sharing a workdir never work on the same unit; a lock whose owner died (same host, dead pid) or that has not
been refreshed for `stale_after` seconds is broken by renaming it away (only one breaker's rename succeeds).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import LockedError
from pipeline.shards import atomic_write_json

STALE_AFTER_S = float(os.environ.get("HLWQ_LOCK_STALE_S", "600"))


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
        for rel, meta in rec.get("outputs", {}).items():
            p = self.workdir / rel
            if not p.exists() or p.stat().st_size != meta["size"]:
                return False
        return True

    def _lock_path(self, stage: str, unit: str) -> Path:
        return self.lock_dir / stage / f"{unit}.lock"

    def holder(self, stage: str, unit: str) -> dict[str, Any] | None:
        """Who holds the lock, or None when it is free or stale."""
        p = self._lock_path(stage, unit)
        try:
            info = json.loads(p.read_text())
            age = time.time() - p.stat().st_mtime
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        dead = info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", -1)))
        return None if dead or age > STALE_AFTER_S else dict(info)

    @contextmanager
    def lock(self, stage: str, unit: str) -> Iterator[Lock]:
        p = self._lock_path(stage, unit)
        p.parent.mkdir(parents=True, exist_ok=True)
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex})
        for _ in range(3):
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.holder(stage, unit) is None and p.exists():
                    try:  # stale: move it aside; a concurrent breaker's rename fails and it retries the create
                        os.rename(p, p.with_name(f"{p.name}.stale-{uuid.uuid4().hex[:8]}"))
                    except FileNotFoundError:
                        pass
                    continue
                h = self.holder(stage, unit) or {}
                raise LockedError(f"{stage}/{unit} is being worked on by {h.get('host')}:{h.get('pid')}") from None
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            break
        else:
            raise LockedError(f"{stage}/{unit}: could not take the lock")
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
