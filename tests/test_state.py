import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import LockedError
from pipeline.state import RunState


def test_records_and_fingerprints(tmp_path: Path):
    s = RunState(tmp_path)
    out = tmp_path / "out.bin"
    out.write_bytes(b"12345")
    fp = {"inputs": "a", "params": "b"}
    s.write("quantize", "u1", {"status": "done", "fingerprint": fp, "outputs": {"out.bin": {"size": 5}}})
    assert s.is_done("quantize", "u1", fp)
    assert not s.is_done("quantize", "u1", {"inputs": "a", "params": "c"})
    out.write_bytes(b"123")  # an output changed size behind our back: redo
    assert not s.is_done("quantize", "u1", fp)
    assert s.clear("quantize") == 1 and s.read("quantize", "u1") is None


def test_lock_is_exclusive_and_released(tmp_path: Path):
    s = RunState(tmp_path)
    with s.lock("quantize", "u1"):
        assert s.holder("quantize", "u1")["pid"] == os.getpid()
        with pytest.raises(LockedError, match="being worked on"):
            with s.lock("quantize", "u1"):
                pass
    assert s.holder("quantize", "u1") is None
    with s.lock("quantize", "u1"):
        pass


def test_lock_of_a_dead_process_is_broken(tmp_path: Path):
    s = RunState(tmp_path)
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(p.stdout)
    lock = tmp_path / "locks" / "verify" / "u1.lock"
    lock.parent.mkdir(parents=True)
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "token": "x"}))
    with s.lock("verify", "u1"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_lock_of_another_host_goes_stale_by_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import pipeline.state as state

    s = RunState(tmp_path)
    lock = tmp_path / "locks" / "verify" / "u1.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "token": "x"}))
    with pytest.raises(LockedError, match="other-node"):
        with s.lock("verify", "u1"):
            pass
    old = time.time() - state.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    with s.lock("verify", "u1"):
        assert json.loads(lock.read_text())["host"] != "other-node"


def _race(args: tuple[str, float, int]) -> tuple[int, int]:
    """One of many processes: take the lock again and again for `seconds`; (times inside, overlaps seen)."""
    workdir, seconds, seed = args
    import random

    until = time.time() + seconds
    s = RunState(Path(workdir))
    inside = Path(workdir) / "inside"
    rng = random.Random(seed)
    entered = overlaps = 0
    while time.time() < until:
        try:
            with s.lock("quantize", "u1"):
                try:
                    os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    overlaps += 1
                    continue
                entered += 1
                time.sleep(0.002)
                inside.unlink()
        except LockedError:
            time.sleep(rng.random() * 0.002)
    return entered, overlaps


@pytest.mark.parametrize("stale_first", [False, True])
def test_many_processes_racing_on_one_lock_never_overlap(stale_first: bool, tmp_path: Path):
    """24 processes hammer one lock for 2 s each (optionally starting from a dead process's lock that all of them try to
    break at once): nobody is ever inside with another, and the lock is really used."""
    import multiprocessing as mp
    import socket

    if stale_first:
        lock = tmp_path / "locks" / "quantize" / "u1.lock"
        lock.parent.mkdir(parents=True)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x"}))
    with mp.get_context("fork").Pool(24) as pool:
        results = pool.map(_race, [(str(tmp_path), 2.0, i) for i in range(24)])
    assert sum(o for _, o in results) == 0, results
    assert sum(e for e, _ in results) > 10, results
    assert not list((tmp_path / "locks" / "quantize").glob(".*.tmp"))
