"""bench.trace_stream's timeline on the CPU: a synthetic trace with known clocks gives back its phases, spans and
clock rate, and the warps' roles follow the kernel's finisher rule (kernels.stream_finisher), in both layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import trace_stream
from pipeline.runtime import kernels


def _trace(n_tiles: int, n_blocks: int, runs: int, grid_warps: int, order: list[int]) -> np.ndarray:
    """A trace where the grid's j-th warp ran run order[j]: it started at 100·j ns (clock 1000 + 200·j at 2 GHz), took
    400 cycles of prologue, 10 000 of loop and 600 + 2·j of flush; warps past the runs stored nothing at their end."""
    units = n_tiles * n_blocks
    raw = np.zeros((grid_warps, trace_stream.SLOTS), dtype=np.uint64)
    base_ns = 1_700_000_000_000_000_000  # a globaltimer-sized origin: offsets must survive it
    for j in range(grid_warps):
        c0 = 1000 + 200 * j
        raw[j, 0], raw[j, 1], raw[j, 2] = base_ns + 100 * j, c0, c0 + 400
        if j >= len(order):
            continue
        w = order[j]
        lo, hi = kernels.stream_start(w, units, runs), kernels.stream_start(w + 1, units, runs)
        end = c0 + 400 + 10_000 + 600 + 2 * j
        raw[j, 3], raw[j, 4] = c0 + 10_400, end
        raw[j, 5] = base_ns + 100 * j + (end - c0) // 2
        raw[j, 6], raw[j, 7] = w, lo | hi << 32
    return raw


@pytest.mark.parametrize(("n_tiles", "n_blocks", "grid_warps", "parts"), [(5, 10, 8, 0), (19, 5, 64, 3)])
def test_timeline_recovers_a_synthetic_trace(n_tiles: int, n_blocks: int, grid_warps: int, parts: int) -> None:
    units = n_tiles * n_blocks
    runs = n_tiles * parts if parts else kernels.stream_warps(grid_warps, units)
    order = [kernels.stream_part_warp(j, n_tiles, parts) for j in range(runs)] if parts else list(range(runs))
    raw = _trace(n_tiles, n_blocks, runs, grid_warps, order)
    out = trace_stream.timeline(raw, n_blocks, units, runs, parts)
    assert out["warps"] == runs and out["sm_clock_ghz"] == pytest.approx(2.0, rel=1e-3)
    assert out["start_skew_us"] == pytest.approx(0.1 * (runs - 1), abs=1e-3)
    for name in ("finishers_us", "others_us"):
        assert out[name]["prologue"]["p50"] == pytest.approx(0.2, abs=1e-3)  # 400 cycles at 2 GHz
        assert out[name]["loop"]["max"] == pytest.approx(5.0, abs=1e-3)
    # roles: a tile with several owners has exactly one finisher, by the kernel's rule
    hi = (raw[:runs, 7] >> np.uint64(32)).astype(np.int64)
    roles = trace_stream.warp_roles(np.array(order), hi, n_blocks, units, runs, parts)
    for j, w in enumerate(order):
        t = (hi[j] - 1) // n_blocks
        shared = kernels.stream_owner(t * n_blocks, units, runs) != kernels.stream_owner((t + 1) * n_blocks - 1, units,
                                                                                          runs)  # fmt: skip
        want = 0 if not shared else 2 if kernels.stream_finisher(t, n_blocks, units, runs, parts) == w else 1
        assert roles[j] == want
    assert out["finishers"] == int((roles == 2).sum()) > 0
    assert out["finishers"] + out["parkers"] <= runs


def test_timeline_refuses_an_empty_trace() -> None:
    with pytest.raises(ValueError, match="no warp"):
        trace_stream.timeline(np.zeros((4, trace_stream.SLOTS), dtype=np.uint64), 10, 50, 4)


def test_trace_marks_fit_the_kernel_source() -> None:
    """The trace is patched into a copy of hlwq.cu at anchors in tc_stream2_kernel: each is there once (an edit of the
    kernel that moves one fails here, not on a GPU), and a source without them is refused in one line."""
    from pipeline.runtime.kernels import build

    text = trace_stream.traced_text(build.SOURCE.read_text())
    assert text.count("trace_mark(") == trace_stream.SLOTS + 1  # the definition and one store per slot
    assert 'extern "C" int hlwq_trace_buffer' in text
    with pytest.raises(ValueError, match="trace mark"):
        trace_stream.traced_text("__global__ void other() {}")


def test_traced_source_is_written_once_under_its_hash(tmp_path: Path) -> None:
    """The traced copy lands in the kernel cache (made if missing) under its text's hash, with no temp file left
    beside it, and a second call finds it there rather than writing again."""
    from pipeline.runtime.kernels import build

    cache = tmp_path / "kcache"
    path = trace_stream.traced_source(cache)
    assert path.parent == cache and path.name.startswith("hlwq_trace_") and path.suffix == ".cu"
    assert path.read_text() == trace_stream.traced_text(build.source().read_text())
    assert [p.name for p in cache.iterdir()] == [path.name]
    mtime = path.stat().st_mtime_ns
    assert trace_stream.traced_source(cache) == path and path.stat().st_mtime_ns == mtime
