# Throwaway: timing-only ablations of the rotating stream kernel (wrong results by design).
import re, sys
src = open("pipeline/runtime/kernels/hlwq.cu").read()
def sub(old, new, count=1):
    global src
    assert src.count(old) >= 1, old
    src = src.replace(old, new, count)
# rotation
sub("""    if (PRE == PRE_NORM2) {
      norm2_input<T>(x, pre, sg, inv_smooth, n_blocks, warp, lane, KS, xsm, xss);""",
"""#ifdef ABL_NOROT
    if (false) {
#else
    if (PRE == PRE_NORM2) {
#endif
      norm2_input<T>(x, pre, sg, inv_smooth, n_blocks, warp, lane, KS, xsm, xss);""")
sub("""      for (int first = warp; first < n_blocks; first += RG * KS) {""",
"""#ifdef ABL_NOROT
      for (int first = warp; first < 0; first += RG * KS) {
#else
      for (int first = warp; first < n_blocks; first += RG * KS) {
#endif""")
# flush
sub("""    stream_flush<T>(acc, t, w, W, U, n_blocks, ws, counters, y, n, R);
    // The next tile starts at block 0.""",
"""#ifdef ABL_NOFLUSH
    stream_store<T>(acc, y, t, g, q, n, R);
#else
    stream_flush<T>(acc, t, w, W, U, n_blocks, ws, counters, y, n, R);
#endif
    // The next tile starts at block 0.""")
# math
sub("""  const uint32_t scw = reinterpret_cast<const uint32_t*>(u + Unit<BITS>::NIB + Unit<BITS>::SGN)[lane >> 2];
  float c[4] = {0.f, 0.f, 0.f, 0.f};""",
"""  const uint32_t scw = reinterpret_cast<const uint32_t*>(u + Unit<BITS>::NIB + Unit<BITS>::SGN)[lane >> 2];
#ifdef ABL_NOMATH
  { const uint32_t z = n0.x ^ n0.y ^ n0.z ^ n0.w ^ n1.x ^ n1.y ^ n1.z ^ n1.w ^ s0 ^ s1 ^ scw ^ x0.x ^ x1.y ^ x2.z ^ x3.w;
    acc[0] += __uint_as_float(z & 0x3f80ffffu) * x0s; return; }
#endif
  float c[4] = {0.f, 0.f, 0.f, 0.f};""")
# table fill in stream2
sub("""  fill_pair_table<BITS, 64>(tab, codebook);
  // ROT:""", """#ifndef ABL_NOTAB
  fill_pair_table<BITS, 64>(tab, codebook);
#endif
  // ROT:""")
if "ST3" in sys.argv[1]:
    src = re.sub(r"launch_stream2<([45]), 2, true", r"launch_stream2<\1, 3, true", src)
defs = "".join(f"#define ABL_{d}\n" for d in sys.argv[1].split("+") if d not in ("BASE", "ST3"))
open(f"abl/{sys.argv[1].replace('+','_').lower()}.cu", "w").write(defs + src)
