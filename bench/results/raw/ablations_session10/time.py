# Throwaway timing of the shipped one-token launch (gemv_tc_rot, 32 warps, trigger) for one kernel source.
import functools, json, os, sys, torch
from bench.kernel import graph_time_us, quantized, copies_for
from pipeline.runtime import kernels
from pipeline.runtime.kernels import layout, build, ops  # noqa: F401  (registers the ops)
dev = torch.device("cuda")
out = {"source": os.environ.get("HLWQ_KERNEL_SOURCE", "main"), "lib": build.library_name()}
for name, (rows, cols) in {"down": (5376, 21504), "gate_up": (21504, 5376)}.items():
    d = quantized(rows, cols, 5, dev, seed=rows + cols)
    q = d["q"]
    qbytes = q.codes.numel() + q.scales.numel() * 2
    tiles = [layout.to_tiles(q.codes.clone(), q.scales.clone(), 5) for _ in range(copies_for(qbytes))]
    cb = q.codebook.to(dev)
    x = torch.randn(1, cols, device=dev, dtype=torch.bfloat16)
    for warps in (32, 24):
        for trig in (True, False):
            launch = kernels.tc_launch(warps, 6, stream=True, pdl=True, trigger=trig)
            try:
                us = graph_time_us([functools.partial(torch.ops.hlwq.gemv_tc_rot, x, d["signs"], None, t, cb, 5, rows, launch) for t in tiles])
                out[f"{name}_w{warps}{'_trig' if trig else ''}"] = round(us, 2)
            except Exception as e:
                out[f"{name}_w{warps}{'_trig' if trig else ''}"] = str(e)[:80]
    xp, xs = torch.ops.hlwq.rotate_pairs(x, d["signs"], None)
    us = graph_time_us([functools.partial(torch.ops.hlwq.gemv_tc, xp, xs, t, cb, 5, rows, torch.bfloat16, kernels.tc_launch(32, 6, stream=True, pdl=True)) for t in tiles])
    out[f"{name}_plain_w32_pdl"] = round(us, 2)
    out[f"{name}_bytes"] = qbytes
    del tiles
print(json.dumps(out))
