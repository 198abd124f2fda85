import sys
src = open("pipeline/runtime/kernels/hlwq.cu").read()
v = sys.argv[1]
def sub(a, b, n=1):
    global src
    assert src.count(a) == n, (a, src.count(a))
    src = src.replace(a, b)
if v == "midpark":  # the stream2 loop's mid-run flush only parks its part
    sub("    if (u == hi) break;\n    stream_flush<T>(acc, t, w, W, U, n_blocks, ws, counters, y, n, R);",
        "    if (u == hi) break;\n    reinterpret_cast<float4*>(ws + ((size_t)w * 2) * 128)[lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);")
if v == "endstore":
    sub("  stream_flush<T, 8>(acc, t, w, W, U, n_blocks, ws, counters, y, n, R);", "  stream_store<T>(acc, y, t, g, q, n, R);")
if v == "nofence":
    sub('  asm volatile("fence.acq_rel.gpu;\\n" ::: "memory");', "")
if v == "noatom":
    sub("  if (lane == 0) seen = atomicAdd(counters + t, 1);", "  seen = -1;")
open(f"abl/{v}.cu", "w").write(src)
