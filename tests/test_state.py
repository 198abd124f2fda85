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
