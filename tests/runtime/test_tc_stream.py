"""gemv_tc's stream mode on the CPU: the launch word, the choice rule, and the warp runs and fix-up arithmetic emulated
in torch (the parts of layout.tiled_matvec summed as the kernel's fix-up sums them give the whole product)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.quant.codec import QuantParams, quantize
from pipeline.quant.hadamard import rotate, sign_vector
from pipeline.runtime import kernels
from pipeline.runtime.kernels import layout, ops


def test_launch_word() -> None:
    assert kernels.tc_launch() == 12 | 1 << 8  # the tile kernel's word is unchanged by stream mode's bit
    for warps, pf in [(16, 2), (24, 3), (32, 2), (16, 5)]:
        word = kernels.tc_launch(warps, pf, stream=True)
        assert word & 255 == warps and (word >> 8) & 15 == pf and ops.launch_streamed(word)
    assert not ops.launch_streamed(kernels.tc_launch(16, 2))
    with pytest.raises(ValueError, match="prefetch"):
        kernels.tc_launch(32, 1, stream=True)
    word = kernels.tc_launch(32, 6, stream=True, pdl=True)
    assert word == 32 | 6 << 8 | 1 << 16 | 1 << 17 and ops.launch_streamed(word)
    for warps, pf, stream in [(32, 2, True), (12, 1, False)]:  # only the lean-issue kernel waits for its input
        with pytest.raises(ValueError, match="pdl"):
            kernels.tc_launch(warps, pf, stream=stream, pdl=True)
    assert kernels.tc_launch(24, 6, stream=True, pdl=True, trigger=True) == 24 | 6 << 8 | 1 << 16 | 1 << 17 | 1 << 18
    for pf, pdl in [(7, True), (6, False)]:  # only gemv_tc_rot's 2-slot programmatic launch triggers its dependents
        with pytest.raises(ValueError, match="trigger"):
            kernels.tc_launch(32, pf, stream=True, pdl=pdl, trigger=True)
    rot = kernels.tc_launch(32, 6, stream=True, pdl=True, trigger=True)
    assert kernels.tc_launch(32, 6, stream=True, pdl=True, trigger=True, cluster=1) == rot
    for cluster in (2, 4, 8):  # bits 20-23, which hlwq_gemv_tc_rot reads
        assert kernels.tc_launch(32, 6, stream=True, pdl=True, trigger=True, cluster=cluster) == rot | cluster << 20
    for cluster, pf, pdl in [(3, 6, True), (16, 6, True), (2, 7, True), (2, 6, False)]:
        with pytest.raises(ValueError, match="cluster"):
            kernels.tc_launch(32, pf, stream=True, pdl=pdl, cluster=cluster)
    assert kernels.tc_launch(32, 6, stream=True, pdl=True, trigger=True, parts=True) == rot | 1 << 24  # bit 24
    for pf, pdl in [(7, True), (6, False)]:
        with pytest.raises(ValueError, match="parts"):
            kernels.tc_launch(32, pf, stream=True, pdl=pdl, parts=True)


def test_cluster_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: pairs from CLUSTER_MIN_BLOCKS input blocks (down_proj's 168, a full-attention o_proj's 128), none below
    (gate/up's 42) nor for a launch that shares no rotation (0); a set size applies to every sharing launch."""
    monkeypatch.setattr(kernels, "TC_CLUSTER", "auto")
    assert [kernels.cluster_for(n) for n in (0, 42, 64, 127, 128, 168)] == [1, 1, 1, 1, 2, 2]
    monkeypatch.setattr(kernels, "TC_CLUSTER", "4")
    assert [kernels.cluster_for(n) for n in (0, 1, 42, 168)] == [1, 4, 4, 4]


def test_parts_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: the part-major layout from PARTS_MIN_BLOCKS input blocks, not for a launch that rotates all its input
    anyway (0 blocks: the norm-making prologue); 1 / 0 every sharing launch / none."""
    monkeypatch.setattr(kernels, "TC_PARTS", "auto")
    assert [kernels.parts_for(n) for n in (0, 42, 64, 127, 128, 168)] == [False] * 4 + [True] * 2
    monkeypatch.setattr(kernels, "TC_PARTS", "1")
    assert [kernels.parts_for(n) for n in (0, 1, 42, 168)] == [False, True, True, True]
    monkeypatch.setattr(kernels, "TC_PARTS", "0")
    assert not any(kernels.parts_for(n) for n in (0, 1, 42, 168))


@pytest.mark.parametrize(("cluster", "parts"), [("auto", "auto"), ("1", "auto"), ("2", "0"), ("4", "1")])
def test_rotating_launch(monkeypatch: pytest.MonkeyPatch, cluster: str, parts: str) -> None:
    """The one-token stream word becomes gemv_tc_rot's (same warps and ring, the trigger per HLWQ_TC_TRIGGER, its
    CTAs in clusters per cluster_for and the part-major layout per parts_for); the tile kernel's, the first stream
    kernel's and a 3-slot ring rotate nothing themselves."""
    monkeypatch.setattr(kernels, "TC_CLUSTER", cluster)
    monkeypatch.setattr(kernels, "TC_PARTS", parts)
    word = kernels.tc_launch(32, 6, stream=True, pdl=True)
    forced = int(cluster) if cluster != "auto" else None
    for n_blocks, auto in ((0, 1), (42, 1), (168, 2)):
        rot = kernels.rotating_launch(word, n_blocks)
        if kernels.TC_ROTATE == "0":
            assert rot is None
        else:
            size = 1 if n_blocks == 0 else forced or auto  # 0 blocks: a launch that shares no rotation
            part = n_blocks > 0 and (parts == "1" or (parts == "auto" and n_blocks >= 128))
            assert rot == (word | int(kernels.TC_TRIGGER == "1") << 18 | (size if size > 1 else 0) << 20
                           | int(part) << 24)  # fmt: skip
    for other in (kernels.tc_launch(), kernels.tc_launch(32, 2, stream=True), kernels.tc_launch(32, 7, True, True)):
        assert kernels.rotating_launch(other) is None


@pytest.mark.parametrize(
    ("tokens", "rows", "n_blocks", "streamed"),
    [
        (1, 21504, 42, True),  # gate_up: 115M weights
        (1, 5376, 128, True),  # o_proj of a global layer: 88M
        (1, 5376, 64, False),  # o_proj of a sliding layer: 44M, the tile kernel measured faster
        (8, 21504, 42, False),  # 8 tokens: the tile kernel
    ],
)
def test_choose_rule(tokens: int, rows: int, n_blocks: int, streamed: bool) -> None:
    word = kernels.tc_choose(tokens, rows, n_blocks, stream_ok=True)
    assert ops.launch_streamed(word) == (streamed and kernels.TC_STREAM == "auto")
    if ops.launch_streamed(word) and kernels.TC_LEAN == "1":  # the lean-issue kernel, fewer warps for smaller weights
        assert (word >> 8) & 15 == 6 and (word >> 17) & 1
        assert word & 255 == (32 if rows * n_blocks * 128 >= kernels.STREAM_FULL_WEIGHTS else 24)
    assert not ops.launch_streamed(kernels.tc_choose(tokens, rows, n_blocks, stream_ok=False))


def test_choose_rule_when_the_matvec_rotates() -> None:
    """With the rotation inside the matvec, one token of a sliding layer's o_proj (44M weights) streams too; a
    smaller weight and eight tokens stay on the tile kernel."""
    for rows, n_blocks, tokens, streamed in [(5376, 64, 1, True), (4096, 32, 1, False), (5376, 64, 8, False)]:
        word = kernels.tc_choose(tokens, rows, n_blocks, stream_ok=True, rotating=True)
        assert ops.launch_streamed(word) == (streamed if kernels.TC_STREAM == "auto" else kernels.TC_STREAM == "1")


def test_stream_fits_only_where_its_shared_memory_does() -> None:
    need5, need4 = kernels.stream_smem_bytes(5), kernels.stream_smem_bytes(4)
    assert need5 == 65536 + 32 * (3 * 1312 + 24) and need4 < need5
    assert kernels.stream_smem_bytes(5, 32, 6) == 65536 + 32 * (2 * 1312 + 16)
    assert kernels.stream_smem_bytes(5, 16, 4) == 65536 + 16 * (3 * 2 * 1312 + 24)
    assert kernels.stream_fits((9, 0), 232448, 5)  # H100 / H200: 227 KB per block
    assert not kernels.stream_fits((12, 0), 101376, 5)  # consumer Blackwell: 99 KB
    assert not kernels.stream_fits((8, 0), 232448, 5)  # no TMA
    assert kernels.stream_fits((10, 0), None, 5) and not kernels.stream_fits((12, 0), None, 4)
    # gemv_tc_rot holds the rotated input too: 260 bytes per block after the 2-slot ring (16-byte aligned)
    assert kernels.stream_smem_bytes(5, 32, 6, 168) == 65536 + 32 * (2 * 1312 + 16) + 168 * 260
    assert kernels.stream_smem_bytes(5, 32, 7, 1) == (65536 + 32 * (3 * 1312 + 24) + 15) // 16 * 16 + 260
    assert kernels.stream_fits((9, 0), 232448, 5, 168)  # 31B's down_proj (21504 columns) fits an H200
    assert not kernels.stream_fits((9, 0), 232448, 5, 320)  # 40960 columns do not: rotate_pairs + gemv_tc then


@pytest.mark.parametrize(
    ("units", "warps"), [(56448, 3168), (21504, 3168), (95, 60), (1, 24), (24, 24), (7, 3), (2, 32), (15, 32)]
)
def test_stream_runs_partition_the_units(units: int, warps: int) -> None:
    """Stream mode's runs cover every unit once, differ by at most one unit, none is empty (an empty run between a
    tile's owners would never park its part), and stream_owner inverts them (a tile's finisher reads the parts of
    owners owner(first unit) .. owner(last unit))."""
    warps = kernels.stream_warps(warps, units)  # the kernel gives runs to at most one warp per unit
    runs = [(kernels.stream_start(w, units, warps), kernels.stream_start(w + 1, units, warps)) for w in range(warps)]
    assert runs[0][0] == 0 and runs[-1][1] == units
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    sizes = {hi - lo for lo, hi in runs}
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    for w, (lo, hi) in enumerate(runs):
        for u in {lo, hi - 1, (lo + hi) // 2} if hi > lo else ():
            assert kernels.stream_owner(u, units, warps) == w


@pytest.mark.parametrize(
    ("n_tiles", "n_blocks", "warps"), [(336, 168, 4224), (1344, 42, 4224), (1024, 42, 3168), (336, 64, 3168),
                                       (5, 10, 7), (3, 2, 5), (40, 3, 64), (9, 1, 4)]
)  # fmt: skip
def test_stream_finisher_ends_its_run_in_the_tile(n_tiles: int, n_blocks: int, warps: int) -> None:
    """Every shared tile's finisher is one of its owners, and the tile is the last of the finisher's run: it waits for
    the other parts only at the end of its run, and no run waits mid-way (hlwq.cu's FINAL flush)."""
    units = n_tiles * n_blocks
    warps = kernels.stream_warps(warps, units)
    shared = 0
    for t in range(n_tiles):
        first = kernels.stream_owner(t * n_blocks, units, warps)
        last = kernels.stream_owner((t + 1) * n_blocks - 1, units, warps)
        if first == last:
            continue
        shared += 1
        f = kernels.stream_finisher(t, n_blocks, units, warps)
        assert first <= f <= last
        assert t * n_blocks < kernels.stream_start(f + 1, units, warps) <= (t + 1) * n_blocks
    assert shared > 0 or warps <= n_tiles


# (n_tiles, n_blocks, CTAs, warps per CTA, parts expected): 31B's down_proj (5376 x 21504) and a full-attention
# o_proj (5376 x 16384, at 32 and at its rule's 24 warps) on an H200's 132 SMs, gate/up's 42 blocks, small and ragged
# shapes, and grids too small for it.
PART_CASES = [
    (336, 168, 132, 32, 12),
    (336, 128, 132, 32, 12),
    (336, 128, 132, 24, 0),  # 9 parts of 15 blocks would outrun the contiguous runs' 14
    (1344, 42, 132, 32, 3),
    (19, 5, 8, 32, 5),
    (40, 7, 5, 32, 4),
    (40, 7, 3, 32, 0),
    (10, 3, 1, 4, 0),  # 4 warps for 10 tiles: not even one run per tile
    (336, 168, 1, 32, 0),  # one CTA: the contiguous runs are shorter
]


@pytest.mark.parametrize(("n_tiles", "n_blocks", "ctas", "kw", "want"), PART_CASES)
def test_part_major_layout(n_tiles: int, n_blocks: int, ctas: int, kw: int, want: int) -> None:
    """The part-major layout (hlwq.cu's stream_part_warp): its runs are stream_start's for W = n_tiles·parts, each
    inside one tile and no longer than the contiguous layout's longest; the grid's warps take each run once; and a
    CTA's warps read only the blocks stream_part_blocks names, which it rotates (for down_proj 14 or 28 of 168)."""
    units, grid_warps = n_tiles * n_blocks, ctas * kw
    parts = kernels.stream_parts(n_tiles, n_blocks, grid_warps)
    assert parts == want
    if not parts:
        return
    runs = n_tiles * parts
    longest = max(kernels.stream_start(w + 1, units, runs) - kernels.stream_start(w, units, runs) for w in range(runs))
    contiguous = kernels.stream_warps(grid_warps, units)
    assert longest <= -(-units // contiguous)
    taken = [kernels.stream_part_warp(j, n_tiles, parts) for j in range(-(-runs // kw) * kw)]
    assert sorted(w for w in taken if w < runs) == list(range(runs)) and all(w == runs for w in taken[runs:])
    widest = 0
    for c in range(-(-runs // kw)):
        j0, j1 = c * kw, min((c + 1) * kw, runs)
        b0, b1 = kernels.stream_part_blocks(j0, j1, n_tiles, n_blocks, parts)
        widest = max(widest, b1 - b0)
        for w in taken[j0:j1]:
            lo, hi = kernels.stream_start(w, units, runs), kernels.stream_start(w + 1, units, runs)
            assert lo // n_blocks == (hi - 1) // n_blocks  # one tile
            assert b0 <= lo % n_blocks and (hi - 1) % n_blocks < b1
    if (n_tiles, n_blocks, ctas) == (336, 168, 132):
        assert widest == 28 and -(-runs // kw) == 126
    # The flush's rule holds for these runs too: each tile's finisher is one of its owners, whose run is inside the
    # tile; the finishers spread over the grid (the rule's last owners would fill its last CTAs).
    per_cta = [0] * -(-runs // kw)
    position = {w: j for j, w in enumerate(taken[:runs])}
    for t in range(n_tiles):
        # stream_flush's shortcut: the owners are t·parts ... t·parts + parts - 1, each run starting inside t (slot 0).
        first, last = t * parts, t * parts + parts - 1
        assert kernels.stream_owner(t * n_blocks, units, runs) == first
        assert kernels.stream_owner((t + 1) * n_blocks - 1, units, runs) == last
        assert all(kernels.stream_start(w, units, runs) // n_blocks == t for w in range(first, last + 1))
        f = kernels.stream_finisher(t, n_blocks, units, runs, parts)
        assert t * parts <= f < (t + 1) * parts
        assert t * n_blocks <= kernels.stream_start(f, units, runs) < kernels.stream_start(f + 1, units, runs)
        assert kernels.stream_start(f + 1, units, runs) <= (t + 1) * n_blocks
        per_cta[position[f] // kw] += 1
    if (n_tiles, n_blocks, ctas) == (336, 168, 132):
        assert max(per_cta) <= 4  # 336 finishers over 126 CTAs


def test_stream_tiles_summed_in_warp_order_match_whole() -> None:
    """The stream fix-up's arithmetic in torch: each warp's run cut at tile edges, the parts of a tile added in warp
    order, equals the whole product (float64, up to rounding)."""
    rows, cols, bits, warps = 80, 1280, 5, 7  # 5 tiles x 10 blocks = 50 units over 7 warps
    params = QuantParams(bits=bits)
    q = quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16), params)
    tiles = layout.to_tiles(q.codes, q.scales, bits)
    x = rotate(torch.randn(2, cols, dtype=torch.float64), sign_vector(params.sign_bits(), 128)).reshape(2, cols)
    full = layout.tiled_matvec(x, tiles, q.codebook, rows, bits)
    n_tiles, n_blocks = tiles.shape[:2]
    units = n_tiles * n_blocks
    out = torch.zeros_like(full)
    for w in range(warps):
        lo, hi = kernels.stream_start(w, units, warps), kernels.stream_start(w + 1, units, warps)
        for t in range(lo // n_blocks, (hi - 1) // n_blocks + 1 if hi > lo else lo // n_blocks):
            b0, b1 = max(lo, t * n_blocks) - t * n_blocks, min(hi, (t + 1) * n_blocks) - t * n_blocks
            part = tiles.clone()
            keep = torch.zeros(n_tiles, n_blocks, 1, dtype=torch.bool)
            keep[t, b0:b1] = True
            part[..., -32:] = torch.where(keep, part[..., -32:], torch.zeros_like(part[..., -32:]))  # zero scales
            out[:, t * 16 : (t + 1) * 16] += layout.tiled_matvec(x, part, q.codebook, rows, bits)[
                :, t * 16 : (t + 1) * 16
            ]
    assert torch.allclose(out, full, rtol=1e-9, atol=1e-9)


def test_warps_switch_forces_the_stream_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """HLWQ_TC_WARPS (read at import) overrides the 24 / 32 warps rule for every stream launch, for A/B runs, and a
    benchmark's JSON records it among the switches set (nothing else from the environment)."""
    assert kernels.tc_fields(kernels.stream_default(5376 * 21504))[0] == 32
    assert kernels.tc_fields(kernels.stream_default(16384 * 5376))[0] == 24
    monkeypatch.setattr(kernels, "TC_WARPS", "24")
    assert kernels.tc_fields(kernels.stream_default(5376 * 21504))[0] == 24
    monkeypatch.setattr(kernels, "TC_WARPS", "32")
    assert kernels.tc_fields(kernels.stream_default(16384 * 5376))[0] == 32
    monkeypatch.setenv("HLWQ_TC_WARPS", "24")
    monkeypatch.setenv("HLWQ_HUB_TOKEN_FILE", "/somewhere")
    switches = kernels.measured_variant()["switches"]
    assert switches["HLWQ_TC_WARPS"] == "24" and "HLWQ_HUB_TOKEN_FILE" not in switches


def test_scratch_marker_and_finisher_match_the_kernel_source() -> None:
    """ops fills the stream scratch with the marker hlwq.cu polls for (a mismatch would read garbage as arrived
    parts), and kernels.stream_finisher, which the tests above check, is the kernel's rule."""
    from pipeline.runtime.kernels import build

    src = build.SOURCE.read_text()
    assert f"#define PART_EMPTY {ops.PART_EMPTY:#x}u" in src
    assert "return stream_start(last + 1, U, W) <= (t + 1) * n_blocks ? last : last - 1;" in src
    assert "if (parts) return t * parts + t % parts;" in src
    assert "const int first = parts ? t * parts : stream_owner(t * n_blocks, U, W);" in src
    assert "const int last = parts ? first + parts - 1 : stream_owner((t + 1) * n_blocks - 1, U, W);" in src


def test_compact_gather_polls_each_part_once_and_sums_what_it_polled() -> None:
    """The compact gather's lanes poll every (owner, row group) item of up to COMPACT_OWNERS owners exactly once, in
    COMPACT_OWNERS / 4 float4s each, and lane 4g's shuffle for owner k reads the lane and register that polled (k, g);
    the kernel's source has the same arithmetic and bound."""
    from pipeline.runtime.kernels import build

    regs = kernels.COMPACT_OWNERS // 4
    polled = [kernels.compact_item(lane, r) for lane in range(32) for r in range(regs)]
    assert sorted(polled) == [(k, g) for k in range(kernels.COMPACT_OWNERS) for g in range(8)]
    for k in range(kernels.COMPACT_OWNERS):
        for g in range(8):
            src, r = kernels.compact_source(k, 4 * g)
            assert kernels.compact_item(src, r) == (k, g)
    src_text = build.SOURCE.read_text()
    assert f"#define COMPACT_OWNERS {kernels.COMPACT_OWNERS}" in src_text
    kernel_lines = (
        "m = last - first + 1, k0 = lane >> 3;",
        "+ (lane & 7) * 4;",
        "if (k0 + 4 * r < m && first + k0 + 4 * r != w)",
        "const int src = (k & 3) * 8 + g;",
        "const float4& x = p[k >> 2];",
    )
    for line in kernel_lines:
        assert line in src_text, line
