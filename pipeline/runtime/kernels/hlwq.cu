// HLWQ native kernels: the activation rotation, a batch 1-4 matvec straight from FORMAT v1's packed codes, and a
// dequantize-to-rotated-basis kernel for the tensor-core prefill path. Plain C ABI (no torch headers): the library is
// built with nvcc in seconds and called through ctypes on the caller's stream, so it is captured by CUDA graphs.
//
// The math: W·x = Σ_b s_b/√B · L[c_b] · (H·D·x)_b, so the codes are never un-rotated; the activation is rotated once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#define B 128
#define LANES_PER_BLOCK 4  // each lane owns 32 codes of a 128-block: 16 low-nibble slots + 16 high-nibble slots
#define BLOCKS_PER_CHUNK 8  // 32 lanes / 4

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// One warp, one 128-block: v holds lane l's elements 4l..4l+3 of D·(x ⊙ inv_smooth); they become those of H·D·(...)
// (unnormalized): strides 1 and 2 inside the lane, 4..64 by shuffles.
__device__ __forceinline__ void warp_fwht_regs(float (&v)[4], int lane) {
  float a0 = v[0] + v[1], a1 = v[0] - v[1], a2 = v[2] + v[3], a3 = v[2] - v[3];
  v[0] = a0 + a2; v[2] = a0 - a2; v[1] = a1 + a3; v[3] = a1 - a3;
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float p = __shfl_xor_sync(0xffffffffu, v[i], m);
      v[i] = (lane & m) ? p - v[i] : v[i] + p;
    }
  }
}

// One warp, one 128-block: lane l gets elements 4l..4l+3 of H·D·(x ⊙ inv_smooth) (unnormalized). `xb` points at the
// lane's first element.
template <typename T>
__device__ __forceinline__ void warp_fwht128(const T* __restrict__ xb, const float* __restrict__ signs,
                                             const float* __restrict__ inv_smooth, int blk, int lane, float (&v)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float s = signs[lane * 4 + i];
    if (inv_smooth) s *= inv_smooth[blk * B + lane * 4 + i];
    v[i] = to_f32<T>(xb[i]) * s;
  }
  warp_fwht_regs(v, lane);
}

// The two rotation kernels: one warp per (row, 128-block) of x [rows, K]; false for the warps past the last row.
// `base` is the lane's first element, v its four rotated values (unnormalized).
template <typename T>
__device__ __forceinline__ bool warp_rotated_block(const T* __restrict__ x, const float* __restrict__ signs,
                                                   const float* __restrict__ inv_smooth, int rows, int K, int n_blocks,
                                                   int& row, int& blk, int& lane, size_t& base, float (&v)[4]) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  lane = threadIdx.x & 31;
  row = warp / n_blocks;
  blk = warp % n_blocks;
  if (row >= rows) return false;
  base = (size_t)row * K + (size_t)blk * B + lane * 4;
  warp_fwht128<T>(x + base, signs, inv_smooth, blk, lane, v);
  return true;
}

// One warp's rotated block v (warp_fwht128) in the pair layout (rotate_pairs_kernel says what it is): lane l < 16's 16
// bytes (pairs 4l..4l+3) and the block's power-of-two scale (every lane), and with `lo` each pair's fp16 remainder
// (the exact value less its fp16), so that hi + lo carries ~22 bits. The rotation kernel writes them to memory, the
// stream matvec that rotates its own input to shared memory.
__device__ __forceinline__ void pair_block(const float (&v)[4], uint4& pk, float& scale, uint4* lo = nullptr) {
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  amax *= 0.08838834764831845f;
  int e = 0;
  frexpf(amax, &e);  // amax < 2^e
  scale = amax > 0.f ? ldexpf(1.f, e - 14) : 1.f;
  const float f = 0.08838834764831845f / scale;
  float hi[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) hi[i] = __shfl_down_sync(0xffffffffu, v[i], 16);
  uint32_t ph[4], pl[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float a = v[i] * f, b = hi[i] * f;
    const __half2 p = __floats2half2_rn(a, b);
    ph[i] = *reinterpret_cast<const uint32_t*>(&p);
    if (lo) {
      const __half2 r = __floats2half2_rn(a - __low2float(p), b - __high2float(p));
      pl[i] = *reinterpret_cast<const uint32_t*>(&r);
    }
  }
  pk = make_uint4(ph[0], ph[1], ph[2], ph[3]);
  if (lo) *lo = make_uint4(pl[0], pl[1], pl[2], pl[3]);
}

// ---- rotation: out[n, k] = (H·D·(x ⊙ inv_smooth))[n, k] per 128-block, float32 -----------------------------------
template <typename T>
__global__ void rotate_kernel(const T* __restrict__ x, const float* __restrict__ signs,
                              const float* __restrict__ inv_smooth, float* __restrict__ out, int rows, int K, int n_blocks) {
  int row, blk, lane;
  size_t base;
  float v[4];
  if (!warp_rotated_block<T>(x, signs, inv_smooth, rows, K, n_blocks, row, blk, lane, base, v)) return;
  const float norm = 0.08838834764831845f;  // 1/sqrt(128)
  float4 o = make_float4(v[0] * norm, v[1] * norm, v[2] * norm, v[3] * norm);
  *reinterpret_cast<float4*>(out + base) = o;
}

// ---- code decoding: 4 codes of a 32-bit word -> 4 byte offsets (code*4) into the float LUT -------------------------
// `w` is a word of the 4-bit plane (low nibbles = slot 0, high nibbles = slot 1). For 5 bits `h` is the word of the
// high-bit plane at the same byte positions; bit `q` (slot 0) or `q+4` (slot 1) of each byte is the code's bit 4.
// For 6 bits `h` is the word of the 2-bit plane; field `q>>1` (slot 0) or `2+(q>>1)` (slot 1) holds bits 4-5.
template <int BITS>
__device__ __forceinline__ void offsets(uint32_t w, uint32_t h, int q, uint32_t& lo, uint32_t& hi) {
  lo = (w << 2) & 0x3C3C3C3Cu;
  hi = (w >> 2) & 0x3C3C3C3Cu;
  if (BITS == 5) {
    uint32_t t = h >> q;
    lo |= (t << 6) & 0x40404040u;
    hi |= (t << 2) & 0x40404040u;
  } else if (BITS == 6) {
    uint32_t t = h >> (2 * (q >> 1));
    lo |= (t << 6) & 0xC0C0C0C0u;
    hi |= (t << 2) & 0xC0C0C0C0u;
  }
}

__device__ __forceinline__ float lut_at(const float* lut, uint32_t off) {
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(lut) + off);
}

// ---- matvec: y[n, r] = Σ_b scale[r,b] · Σ_i LUT[code] · xr[n, b*128+i] ----------------------------------------------
// A CTA owns ROWS rows (grid-stride over row groups); its KS warps split K: warp w takes chunks w, w+KS, ... where a
// chunk is 8 blocks (1024 columns) and lane = 4*(block in chunk) + q. The lane's 32 activations per batch row stay in
// registers across the ROWS rows; partial sums meet in shared memory once per row group. (A register double buffer
// for the next chunk's codes measured slower on the H200: it costs occupancy.)
template <int BITS, int ROWS>
struct Tile {
  uint4 w[ROWS], h[ROWS];
  float s[ROWS];
};

template <int BITS, int ROWS>
__device__ __forceinline__ void load_tile(Tile<BITS, ROWS>& t, const uint8_t* __restrict__ codes,
                                          const __half* __restrict__ scales, int row0, int R, int c, int bl, int q,
                                          int n_blocks, size_t row_bytes) {
  constexpr int BPB = 16 * BITS;
  const bool active = c * BLOCKS_PER_CHUNK + bl < n_blocks;
  const int blk = active ? c * BLOCKS_PER_CHUNK + bl : n_blocks - 1;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = min(row0 + r, R - 1);
    const uint8_t* blkp = codes + (size_t)row * row_bytes + (size_t)blk * BPB;
    t.w[r] = __ldg(reinterpret_cast<const uint4*>(blkp) + q);
    if (BITS == 5) t.h[r] = __ldg(reinterpret_cast<const uint4*>(blkp + 64));
    else if (BITS == 6) t.h[r] = __ldg(reinterpret_cast<const uint4*>(blkp + 64) + (q & 1));
    else t.h[r] = make_uint4(0, 0, 0, 0);
    t.s[r] = active ? __half2float(scales[(size_t)row * n_blocks + blk]) : 0.f;
  }
}

template <int BITS, int ROWS, int N, typename T>
__global__ void __launch_bounds__(256) gemv_kernel(const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
                                                   const float* __restrict__ codebook, const float* __restrict__ xr,
                                                   T* __restrict__ y, int R, int K, int n_blocks) {
  __shared__ float lut[1 << BITS];
  __shared__ float red[8][ROWS * N];
  for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) lut[i] = codebook[i] * 0.08838834764831845f;
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, KS = blockDim.x >> 5;
  const int q = lane & 3, bl = lane >> 2;
  const int n_chunks = (n_blocks + BLOCKS_PER_CHUNK - 1) / BLOCKS_PER_CHUNK;
  const size_t row_bytes = (size_t)n_blocks * 16 * BITS;
  const int groups = (R + ROWS - 1) / ROWS;

  for (int g = blockIdx.x; g < groups; g += gridDim.x) {
    const int row0 = g * ROWS;
    float acc[ROWS][N];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int n = 0; n < N; ++n) acc[r][n] = 0.f;

    for (int c = warp; c < n_chunks; c += KS) {
      if (c * BLOCKS_PER_CHUNK + bl >= n_blocks) continue;
      Tile<BITS, ROWS> cur;
      load_tile<BITS, ROWS>(cur, codes, scales, row0, R, c, bl, q, n_blocks, row_bytes);
      const int blk = min(c * BLOCKS_PER_CHUNK + bl, n_blocks - 1);
      // Activations for this lane's codes: positions 16q+[0,16) (slot 0) and 64+16q+[0,16) (slot 1).
      float4 xa[N][4], xb[N][4];
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const float4* p = reinterpret_cast<const float4*>(xr + (size_t)n * K + (size_t)blk * B + 16 * q);
#pragma unroll
        for (int k = 0; k < 4; ++k) { xa[n][k] = __ldg(p + k); xb[n][k] = __ldg(p + 16 + k); }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const uint32_t ws[4] = {cur.w[r].x, cur.w[r].y, cur.w[r].z, cur.w[r].w};
        const uint32_t hs[4] = {cur.h[r].x, cur.h[r].y, cur.h[r].z, cur.h[r].w};
        float part[N];
#pragma unroll
        for (int n = 0; n < N; ++n) part[n] = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          uint32_t lo, hi;
          offsets<BITS>(ws[k], hs[k], q, lo, hi);
          const float l0 = lut_at(lut, lo & 0xFF), l1 = lut_at(lut, (lo >> 8) & 0xFF);
          const float l2 = lut_at(lut, (lo >> 16) & 0xFF), l3 = lut_at(lut, lo >> 24);
          const float h0 = lut_at(lut, hi & 0xFF), h1 = lut_at(lut, (hi >> 8) & 0xFF);
          const float h2 = lut_at(lut, (hi >> 16) & 0xFF), h3 = lut_at(lut, hi >> 24);
#pragma unroll
          for (int n = 0; n < N; ++n) {
            float p = part[n];
            p = fmaf(l0, xa[n][k].x, p); p = fmaf(l1, xa[n][k].y, p);
            p = fmaf(l2, xa[n][k].z, p); p = fmaf(l3, xa[n][k].w, p);
            p = fmaf(h0, xb[n][k].x, p); p = fmaf(h1, xb[n][k].y, p);
            p = fmaf(h2, xb[n][k].z, p); p = fmaf(h3, xb[n][k].w, p);
            part[n] = p;
          }
        }
#pragma unroll
        for (int n = 0; n < N; ++n) acc[r][n] = fmaf(part[n], cur.s[r], acc[r][n]);
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int n = 0; n < N; ++n) {
        float v = acc[r][n];
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
        if (lane == 0) red[warp][r * N + n] = v;
      }
    __syncthreads();
    if (threadIdx.x < ROWS * N) {
      const int r = threadIdx.x / N, n = threadIdx.x % N;
      float v = 0.f;
      for (int w = 0; w < KS; ++w) v += red[w][threadIdx.x];
      if (row0 + r < R) y[(size_t)n * R + row0 + r] = from_f32<T>(v);
    }
    __syncthreads();
  }
}

// ---- tensor-core matvec from the tiled layout (4- and 5-bit, batch 1-8) -------------------------------------------
// The codes are repacked at load time (pipeline/runtime/kernels/layout.py says how) into units of 16 rows x one
// 128-block, contiguous per 16-row tile. Byte j of a row's 64-byte nibble plane indexes a pair table (levels of codes j
// and j+64 as fp16x2), so one shared-memory load yields two weights; 5-bit codes are sign + 4-bit magnitude (the
// Lloyd-Max codebooks are symmetric) and the sign plane is XORed in. The pairs feed mma.m16n8k16 directly as its A
// fragment: the k order inside a block is free, because the activation is laid out in the same pair order
// (rotate_pairs). The table has one copy per lane (address idx*128 + lane*4), so lookups never conflict on banks.
template <int BITS> struct Unit {
  static constexpr int NIB = 1024;                   // [half h][lane] 16 bytes: row g+8h, pairs 16q..16q+15
  static constexpr int SGN = BITS == 5 ? 256 : 0;    // [half h][lane] u32: bit 15-k / 31-k = sign of j / j+64
  static constexpr int SC = 32;                      // [g] half2: scales of rows g and g+8
  static constexpr int BYTES = NIB + SGN + SC;
};
#define TC_TABLE_WORDS (256 * 32)

// fp16 operands (11-bit significands; bf16's 8 cost ~2e-4 KL on the bench model), fp32 accumulation.
__device__ __forceinline__ void mma_f16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int BITS>
struct TcRegs {
  uint4 n0, n1;
  uint32_t s0, s1, sc;
  float x0s, x1s;  // the activation's block scales for batch rows 2q and 2q+1
};

template <int BITS>
__device__ __forceinline__ void tc_load(TcRegs<BITS>& r, const uint8_t* __restrict__ u, int lane,
                                        const float* __restrict__ xs, int n, int n_blocks, int b) {
  // Prefetched with the codes: loaded at use, this small read sits on every block's critical path.
  const int q = lane & 3;
  r.x0s = 2 * q < n ? __ldg(xs + (size_t)(2 * q) * n_blocks + b) : 0.f;
  r.x1s = 2 * q + 1 < n ? __ldg(xs + (size_t)(2 * q + 1) * n_blocks + b) : 0.f;
  r.n0 = __ldg(reinterpret_cast<const uint4*>(u) + lane);
  r.n1 = __ldg(reinterpret_cast<const uint4*>(u + 512) + lane);
  if (BITS == 5) {
    r.s0 = __ldg(reinterpret_cast<const uint32_t*>(u + 1024) + lane);
    r.s1 = __ldg(reinterpret_cast<const uint32_t*>(u + 1024 + 128) + lane);
  } else {
    r.s0 = r.s1 = 0;
  }
  r.sc = __ldg(reinterpret_cast<const uint32_t*>(u + Unit<BITS>::NIB + Unit<BITS>::SGN) + (lane >> 2));
}

template <int BITS, int K>
__device__ __forceinline__ uint32_t tc_pair(uint32_t lb, uint4 n, uint32_t s) {
  const uint32_t w = K < 4 ? n.x : K < 8 ? n.y : K < 12 ? n.z : n.w;
  const uint32_t idx = __byte_perm(w, 0u, 0x4440u + (K & 3));
  uint32_t v;
  // A 32-bit shared address (one LEA from the byte): the generic-pointer form costs an extra add per lookup.
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(lb + (idx << 7)));
  if (BITS == 5) v ^= (s << K) & 0x80008000u;
  return v;
}

// One block of one 16-row tile: 8 mma steps over the lane's 16 pairs of rows g and g+8, then the block's scales.
// SPLIT (a float32 input): the activation's lo plane and the levels' remainders (the table at `ll`) join in, three
// mma per step (hi·hi + hi·lo + lo·hi; lo·lo is below fp32's rounding). The activation carries ~22 bits; the small
// levels' remainders (level/√B < 2^-2) fall into fp16's subnormals, so the table ~18-19 (4-bit 19.1, 5-bit 17.7).
template <int BITS, bool SPLIT>
__device__ __forceinline__ void tc_block(float (&acc)[4], const TcRegs<BITS>& cur, uint32_t lb, uint32_t ll,
                                         const uint4* __restrict__ xp, const float* __restrict__ xs, int n,
                                         int n_blocks, int b, int g, int q) {
  // Activation pairs for batch row g (lanes of absent rows feed zeros): block b, pairs 16q..16q+15.
  uint4 x0 = make_uint4(0, 0, 0, 0), x1 = x0, x2 = x0, x3 = x0, l0 = x0, l1 = x0, l2 = x0, l3 = x0;
  if (g < n) {
    const uint4* p = xp + ((size_t)g * (SPLIT ? 2 : 1) * n_blocks + b) * 16 + q * 4;
    x0 = __ldg(p); x1 = __ldg(p + 1); x2 = __ldg(p + 2); x3 = __ldg(p + 3);
    if (SPLIT) {
      const uint4* pl = p + (size_t)n_blocks * 16;  // the row's lo plane
      l0 = __ldg(pl); l1 = __ldg(pl + 1); l2 = __ldg(pl + 2); l3 = __ldg(pl + 3);
    }
  }
  float c[4] = {0.f, 0.f, 0.f, 0.f};
#define HLWQ_STEP(S, XA, XB, LA, LB)                                                                               \
  {                                                                                                                \
    const uint32_t a0 = tc_pair<BITS, 2 * S>(lb, cur.n0, cur.s0), a1 = tc_pair<BITS, 2 * S>(lb, cur.n1, cur.s1);   \
    const uint32_t a2 = tc_pair<BITS, 2 * S + 1>(lb, cur.n0, cur.s0);                                              \
    const uint32_t a3 = tc_pair<BITS, 2 * S + 1>(lb, cur.n1, cur.s1);                                              \
    mma_f16_16816(c, a0, a1, a2, a3, XA, XB);                                                                      \
    if (SPLIT) {                                                                                                   \
      mma_f16_16816(c, a0, a1, a2, a3, LA, LB);                                                                    \
      mma_f16_16816(c, tc_pair<BITS, 2 * S>(ll, cur.n0, cur.s0), tc_pair<BITS, 2 * S>(ll, cur.n1, cur.s1),         \
                    tc_pair<BITS, 2 * S + 1>(ll, cur.n0, cur.s0), tc_pair<BITS, 2 * S + 1>(ll, cur.n1, cur.s1), XA, \
                    XB);                                                                                           \
    }                                                                                                              \
  }
  HLWQ_STEP(0, x0.x, x0.y, l0.x, l0.y); HLWQ_STEP(1, x0.z, x0.w, l0.z, l0.w);
  HLWQ_STEP(2, x1.x, x1.y, l1.x, l1.y); HLWQ_STEP(3, x1.z, x1.w, l1.z, l1.w);
  HLWQ_STEP(4, x2.x, x2.y, l2.x, l2.y); HLWQ_STEP(5, x2.z, x2.w, l2.z, l2.w);
  HLWQ_STEP(6, x3.x, x3.y, l3.x, l3.y); HLWQ_STEP(7, x3.z, x3.w, l3.z, l3.w);
#undef HLWQ_STEP
  // Block scales of the weight rows (g, g+8) times those of the activation rows (2q, 2q+1) this lane's C holds.
  const float2 sc = __half22float2(*reinterpret_cast<const __half2*>(&cur.sc));
  const float x0s = cur.x0s, x1s = cur.x1s;
  acc[0] = fmaf(c[0], sc.x * x0s, acc[0]); acc[1] = fmaf(c[1], sc.x * x1s, acc[1]);
  acc[2] = fmaf(c[2], sc.y * x0s, acc[2]); acc[3] = fmaf(c[3], sc.y * x1s, acc[3]);
}

// The pair table: entry (byte idx, lane) = fp16x2 levels of the byte's two nibbles / sqrt(B), one copy per lane, at
// word idx * ROW + lane (ROW 32: the tile kernel's packed table; 64: stream mode's wide one). With `rem`, a second
// table of the same shape there: each level's fp16 remainder (level/√B less its fp16; the sign XOR flips it too).
template <int BITS, int ROW = 32>
__device__ __forceinline__ void fill_pair_table(uint32_t* tab, const float* __restrict__ codebook,
                                                uint32_t* rem = nullptr) {
  // A thread makes one entry and stores it for 4 lanes at once (16 bytes): the fill runs before any unit, so its
  // instruction count is on every launch's critical path.
  for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
    const int idx = i >> 3, lane = (i & 7) * 4;
    const int lo = idx & 15, hi = idx >> 4;
    // 5-bit: magnitudes are the upper half of the symmetric codebook; 4-bit: the codes themselves.
    const float a = codebook[BITS == 5 ? 16 + lo : lo] * 0.08838834764831845f;
    const float b = codebook[BITS == 5 ? 16 + hi : hi] * 0.08838834764831845f;
    const __half2 v = __floats2half2_rn(a, b);
    const uint32_t vw = *reinterpret_cast<const uint32_t*>(&v);
    *reinterpret_cast<uint4*>(tab + idx * ROW + lane) = make_uint4(vw, vw, vw, vw);
    if (rem) {
      const __half2 r = __floats2half2_rn(a - __low2float(v), b - __high2float(v));
      const uint32_t rw = *reinterpret_cast<const uint32_t*>(&r);
      *reinterpret_cast<uint4*>(rem + idx * ROW + lane) = make_uint4(rw, rw, rw, rw);
    }
  }
}

template <int BITS, int PF, bool SPLIT, typename T>
__global__ void __launch_bounds__(512) tc_gemv_kernel(const uint8_t* __restrict__ tiles,
                                                      const float* __restrict__ codebook,
                                                      const uint4* __restrict__ xp, const float* __restrict__ xs,
                                                      T* __restrict__ y, int n, int R,
                                                      int n_blocks, int n_tiles) {
  // The pair table (SPLIT: then the remainders' table), then one 16x8 partial-sum tile per warp.
  extern __shared__ __align__(16) uint32_t tab[];  // filled 16 bytes at a time
  constexpr int TABLES = SPLIT ? 2 : 1;
  float (*red)[16 * 8] = reinterpret_cast<float (*)[16 * 8]>(tab + TABLES * TC_TABLE_WORDS);
  fill_pair_table<BITS>(tab, codebook, SPLIT ? tab + TC_TABLE_WORDS : nullptr);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, KS = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const uint32_t lb = (uint32_t)__cvta_generic_to_shared(tab) + lane * 4, ll = lb + TC_TABLE_WORDS * 4;
  constexpr int UB = Unit<BITS>::BYTES;

  for (int t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const uint8_t* base = tiles + (size_t)t * n_blocks * UB;
    // PF + 1 register sets in turn: the codes of the next PF blocks are in flight while this one computes.
    TcRegs<BITS> r[PF + 1];
    int b = warp;
#pragma unroll
    for (int i = 0; i < PF; ++i)
      if (b + i * KS < n_blocks)
        tc_load<BITS>(r[i], base + (size_t)(b + i * KS) * UB, lane, xs, n, n_blocks, b + i * KS);
    bool more = b < n_blocks;
    while (more) {
#pragma unroll
      for (int i = 0; i <= PF; ++i) {
        if (more) {
          if (b + PF * KS < n_blocks)
            tc_load<BITS>(r[(i + PF) % (PF + 1)], base + (size_t)(b + PF * KS) * UB, lane, xs, n, n_blocks, b + PF * KS);
          tc_block<BITS, SPLIT>(acc, r[i], lb, ll, xp, xs, n, n_blocks, b, g, q);
          b += KS;
          more = b < n_blocks;
        }
      }
    }
    // c0/c1: row g, batch 2q/2q+1; c2/c3: row g+8. Warps met in shared memory, one thread per (row, batch) writes.
    red[warp][g * 8 + 2 * q] = acc[0]; red[warp][g * 8 + 2 * q + 1] = acc[1];
    red[warp][(g + 8) * 8 + 2 * q] = acc[2]; red[warp][(g + 8) * 8 + 2 * q + 1] = acc[3];
    __syncthreads();
    if (threadIdx.x < 128) {
      const int row = threadIdx.x >> 3, col = threadIdx.x & 7;
      float v = 0.f;
      for (int w = 0; w < KS; ++w) v += red[w][threadIdx.x];
      const int r = t * 16 + row;
      if (col < n && r < R) y[(size_t)col * R + r] = from_f32<T>(v);
    }
    __syncthreads();
  }
}

// ---- stream mode: every warp of the grid takes an equal run of (tile, block) units ----------------------------------
// Units are numbered tile-major, u = t*n_blocks + b, which is also their order in memory, so warp w of W reads the
// contiguous bytes of units [w*U/W, (w+1)*U/W). Its prefetch pipeline runs straight across tile boundaries and no
// CTA-wide barrier ever stops it: the tile kernel drains its pipeline once per tile and leaves a part-empty last wave.
// A tile the warp covers whole is written to y at once; a tile shared with neighbouring warps is parked in ws[w][0]
// (the run's first tile) or ws[w][1] (its last), and one of its owners adds the parts in warp order (stream_flush).
// 32-bit division where the products fit (every shape of the 31B model, its head too): the 64-bit one is a ~100
// instruction call, and the flush that waits on these sits at the end of every run.
__device__ __forceinline__ int stream_owner(int u, int U, int W) {
  const unsigned long long num = ((unsigned long long)u + 1) * (unsigned)W + (unsigned)(U - 1);
  if ((unsigned long long)U * (unsigned)(W + 1) < (1ull << 32)) return (int)((unsigned)num / (unsigned)U) - 1;
  return (int)(num / (unsigned)U) - 1;  // the warp w with w*U/W <= u < (w+1)*U/W
}
__device__ __forceinline__ int stream_start(int w, int U, int W) {
  const unsigned long long num = (unsigned long long)w * (unsigned)U;
  if ((unsigned long long)U * (unsigned)(W + 1) < (1ull << 32)) return (int)((unsigned)num / (unsigned)W);
  return (int)(num / (unsigned)W);
}

// The part-major layout (a rotating launch's `parts` > 0): every tile is cut into `parts` runs, W = n_tiles·parts, so
// that warp w = t·parts + p runs tile t's blocks [p·n_blocks/parts, (p+1)·n_blocks/parts) (stream_start with U/W =
// n_blocks/parts), and the grid's j-th warp takes w by part first: the warps of a CTA then share one or two parts, and
// the CTA rotates only their blocks (stream_part_blocks) instead of the whole input. The runs, their owners and
// finishers are stream_start's for that W: the flush is unchanged. j >= W: no run (W).
__device__ __forceinline__ int stream_part_warp(int j, int n_tiles, int parts) {
  return j < n_tiles * parts ? (j % n_tiles) * parts + j / n_tiles : n_tiles * parts;
}
// The input blocks [*b0, *b1) that grid warps [j0, j1) read in the part-major layout (j0 < j1 <= W).
__device__ __forceinline__ void stream_part_blocks(int j0, int j1, int n_tiles, int n_blocks, int parts, int& b0,
                                                   int& b1) {
  b0 = stream_start(j0 / n_tiles, n_blocks, parts);
  b1 = stream_start((j1 - 1) / n_tiles + 1, n_blocks, parts);
}

template <typename T>
__device__ __forceinline__ void stream_store(const float (&v)[4], T* __restrict__ y, int t, int g, int q, int n,
                                             int R) {
  // c0/c1: row g, batch 2q/2q+1; c2/c3: row g+8.
  const int r0 = t * 16 + g, r1 = r0 + 8;
  if (2 * q < n && r0 < R) y[(size_t)(2 * q) * R + r0] = from_f32<T>(v[0]);
  if (2 * q + 1 < n && r0 < R) y[(size_t)(2 * q + 1) * R + r0] = from_f32<T>(v[1]);
  if (2 * q < n && r1 < R) y[(size_t)(2 * q) * R + r1] = from_f32<T>(v[2]);
  if (2 * q + 1 < n && r1 < R) y[(size_t)(2 * q + 1) * R + r1] = from_f32<T>(v[3]);
}

// A parked part carries its own arrival: the scratch holds PART_EMPTY wherever no part is parked (a signalling-NaN
// pattern that no arithmetic produces, NaN results being canonical 0x7fffffff), so a part has arrived once none of its
// words is PART_EMPTY, whatever order its stores land in: no fence and no counter. The last-arrival count it replaces
// cost two fences and an atomic round trip at the end of every run (the end-of-run flush was ~2.9 µs of down_proj's
// 29.3: bench/results/raw/ablations_session10; the A/B: kernel_flush2_ab.json).
#define PART_EMPTY 0x7fbadbadu
// A finisher waits for owners in later CTAs, so the grid must be resident all at once (stream_grid sizes it by
// occupancy on an idle GPU; an MPS limit, a persistent kernel on another stream, or, with clusters, a GPC short of
// free SMs could break that): ~seconds of polling for a part that never comes trap, rather than hang.
#define PART_SPINS (1 << 22)

__device__ __forceinline__ float4 ld_part(const float* p) {  // from L2, again each time (a relaxed load)
  float4 v;
  asm volatile("ld.relaxed.gpu.global.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ bool part_here(const float4& p) {
  return __float_as_uint(p.x) != PART_EMPTY && __float_as_uint(p.y) != PART_EMPTY &&
         __float_as_uint(p.z) != PART_EMPTY && __float_as_uint(p.w) != PART_EMPTY;
}

// The owner that adds tile t's parts: the last one whose run ends inside t (`last` itself, unless its run goes on to
// the next tile). Tile t is then its run's last, so it waits only while the other owners finish their runs too; an
// owner whose run starts inside t parks that part first thing. In the part-major layout (parts > 0) every owner's run
// is inside t, so any owner can: owner t mod parts, which spreads the finishers, and their gathers' L2 reads, over
// the whole grid (the last owners, part parts - 1 of every tile, are the grid's last CTAs).
__device__ __forceinline__ int stream_finisher(int t, int last, int U, int W, int n_blocks, int parts) {
  if (parts) return t * parts + t % parts;
  return stream_start(last + 1, U, W) <= (t + 1) * n_blocks ? last : last - 1;
}

// The finisher's gather for up to two tokens: owner first + k's part is 8 float4s (row group g's at 4g in the slot),
// item 8k + g of at most 8·COMPACT_OWNERS, and lane l polls items l, l + 32, ... at once: every missing part is one
// L2 round trip away, where the float4-per-lane gather needed one round per batch of four owners. The sums then reach
// lane 4g by shuffles in owner order, its own part from registers: the same sum, bit for bit.
// Inlined: as a __noinline__ call the same gather made down_proj 28.78 us against 24.72 (kernel_compact_ab.json),
// cause unknown.
#define COMPACT_OWNERS 12
__device__ __forceinline__ void stream_gather_compact(const float (&acc)[4], int w, int first, int last, int first_slot,
                                                      float* __restrict__ ws, float (&v)[4]) {
  const int lane = threadIdx.x & 31, m = last - first + 1, k0 = lane >> 3;
  constexpr int NR = COMPACT_OWNERS / 4;
  // Item 8(k0 + 4r) + (lane & 7): one pointer, a constant step per r (only owner `first` may sit in slot 1), and a
  // bit per item still awaited, so that the gather holds few registers beside the run's.
  float* const base = ws + ((size_t)(first + k0) * 2 + (k0 == 0 ? first_slot : 0)) * 128 + (lane & 7) * 4;
  const auto at = [&](int r) { return r == 0 ? base : base + r * 1024 - (k0 == 0 ? first_slot * 128 : 0); };
  unsigned want = 0;
#pragma unroll
  for (int r = 0; r < NR; ++r)
    if (k0 + 4 * r < m && first + k0 + 4 * r != w) want |= 1u << r;
  float4 p[NR] = {};
#pragma unroll
  for (int r = 0; r < NR; ++r)
    if (want >> r & 1) p[r] = ld_part(at(r));
  for (int spins = 0;; ++spins) {
    bool missing = false;
#pragma unroll
    for (int r = 0; r < NR; ++r)
      if ((want >> r & 1) && !part_here(p[r])) {
        p[r] = ld_part(at(r));
        missing = true;
      }
    if (!missing) break;
    if (spins == PART_SPINS) __trap();
  }
  const float e = __uint_as_float(PART_EMPTY);
#pragma unroll
  for (int r = 0; r < NR; ++r)
    if (want >> r & 1) *reinterpret_cast<float4*>(at(r)) = make_float4(e, e, e, e);
  v[0] = v[1] = v[2] = v[3] = 0.f;
  const int g = lane >> 2;
#pragma unroll
  for (int k = 0; k < COMPACT_OWNERS; ++k) {
    if (k >= m) break;  // warp-uniform
    const int src = (k & 3) * 8 + g;
    const float4& x = p[k >> 2];
    const float a = __shfl_sync(0xffffffffu, x.x, src), b = __shfl_sync(0xffffffffu, x.y, src),
                c = __shfl_sync(0xffffffffu, x.z, src), d = __shfl_sync(0xffffffffu, x.w, src);
    if (first + k == w) {
      v[0] += acc[0]; v[1] += acc[1]; v[2] += acc[2]; v[3] += acc[3];
    } else {
      v[0] += a; v[1] += b; v[2] += c; v[3] += d;
    }
  }
}

// Tile t's part of warp w's run: a tile the run covers whole goes to y at once; a shared one is parked in ws[w][0] (the
// run's first tile) or ws[w][1] (its last), and its finisher adds the parts in warp order, its own from registers (the
// same sum whatever the arrival order) and leaves each slot PART_EMPTY for the next launch. FINAL: t is the run's last
// tile (only there can w be its finisher); BATCH parts are polled per L2 round trip past two tokens (up to two, the
// compact gather polls them all at once); parts: the launch's part-major layout (0: the contiguous one), which has its
// own finishers.
template <typename T, bool FINAL, int BATCH = 1>
__device__ __forceinline__ void stream_flush(const float (&acc)[4], int t, int w, int W, int U, int n_blocks,
                                          float* __restrict__ ws, T* __restrict__ y, int n, int R, int parts = 0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  // In the part-major layout tile t's owners are warps t·parts ... t·parts + parts - 1, each run starting inside t
  // (slot 0): the same values without the divisions, at the end of the run where the last parts hold up the launch.
  const int first = parts ? t * parts : stream_owner(t * n_blocks, U, W);
  const int last = parts ? first + parts - 1 : stream_owner((t + 1) * n_blocks - 1, U, W);
  if (first == last) {
    stream_store<T>(acc, y, t, g, q, n, R);
    return;
  }
  // Up to two tokens, only lanes q = 0 hold sums (c0..c3: rows g and g + 8, tokens 0 and 1): a part is their 8
  // float4s, and a finisher gathers up to COMPACT_OWNERS owners' parts in one round (stream_gather_compact).
  const bool compact = n <= 2 && last - first < COMPACT_OWNERS;
  if (!FINAL || w != stream_finisher(t, last, U, W, n_blocks, parts)) {
    const int slot = parts || t == stream_start(w, U, W) / n_blocks ? 0 : 1;
    // Compact: lane 4g's float4 at 4g, the part one whole 128-byte line (a first version at 16g, called rather than
    // inlined, made down_proj 29.7 µs against 25.2; kernel_compact_ab.json).
    if (!compact)
      reinterpret_cast<float4*>(ws + ((size_t)w * 2 + slot) * 128)[lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    else if (q == 0)
      reinterpret_cast<float4*>(ws + ((size_t)w * 2 + slot) * 128)[g] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    return;
  }
  // Every owner after the first starts its run inside tile t, so parked it in slot 0; the first did so only if its
  // run starts at the tile's first unit (otherwise t is its last tile: slot 1).
  const int first_slot = parts || stream_start(first, U, W) == t * n_blocks ? 0 : 1;
  if (compact) {
    float v[4];
    stream_gather_compact(acc, w, first, last, first_slot, ws, v);
    stream_store<T>(v, y, t, g, q, n, R);
    return;
  }
  float* const base = ws + lane * 4;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  for (int o0 = first; o0 <= last; o0 += BATCH) {
    // Owner o0 + j's part: one pointer and a constant offset per j (only o0 == first moves to slot 1), so that a
    // batch's addresses hold no registers of their own.
    float* const b = base + (size_t)o0 * 256 + (o0 == first ? first_slot * 128 : 0);
    const auto at = [&](int j) { return j == 0 ? b : base + (size_t)o0 * 256 + j * 256; };
    float4 p[BATCH];
#pragma unroll
    for (int j = 0; j < BATCH; ++j)
      if (o0 + j <= last && o0 + j != w) p[j] = ld_part(at(j));
    // Until the whole batch is here, every part still missing is asked for again at once: one L2 round trip per
    // round, not one per late part.
    for (int spins = 0;; ++spins) {
      bool missing = false;
#pragma unroll
      for (int j = 0; j < BATCH; ++j)
        if (o0 + j <= last && o0 + j != w && !part_here(p[j])) {
          p[j] = ld_part(at(j));
          missing = true;
        }
      if (!missing) break;
      if (spins == PART_SPINS) __trap();
    }
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      const int o = o0 + j;
      if (o > last) break;
      if (o == w) {
        p[j] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      } else {
        const float e = __uint_as_float(PART_EMPTY);
        *reinterpret_cast<float4*>(at(j)) = make_float4(e, e, e, e);
      }
      v[0] += p[j].x; v[1] += p[j].y; v[2] += p[j].z; v[3] += p[j].w;
    }
  }
  stream_store<T>(v, y, t, g, q, n, R);
}

// A warp's units travel by TMA bulk copies (issued from lane 0 per stage of G units, completion counted in bytes on a
// per-slot mbarrier) into its ring of STAGES slots in shared memory: (STAGES - 1) x G units are in flight per warp
// without holding registers (Hopper and later). The issue still costs the warp ~30 instructions per stage (SASS).
// Programmatic dependent launch (sm_90+): a kernel launched with it may start while the previous one runs, and must
// wait before reading that kernel's output. A kernel that calls pdl_trigger lets its dependents start early; as in
// inductor's Triton kernels (which may be such dependents), it does so only once every thread of the CTA has read its
// inputs, since a dependent that does not read this kernel's output may not wait and may reuse their memory.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void bulk_fetch(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n .reg .pred p;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT;\n}\n"
      ::"r"(bar), "r"(parity) : "memory");
#else
  __trap();
#endif
}

// Stream mode's table: entry (byte, lane) at byte offset byte*256 + lane*4 (64 KB, half of each row unused), so one
// byte_perm builds a lookup's whole offset from the code byte and the lane's own 4*lane byte: the tiled kernel's
// table (byte*128 + lane*4) needs a shift-and-add beside it. One table per SM: stream mode runs one CTA per SM.
#define TC_WIDE_TABLE_WORDS (256 * 64)

template <int BITS, int K>
__device__ __forceinline__ uint32_t wide_pair(uint32_t tb, uint32_t lane4, uint4 n, uint32_t s) {
  const uint32_t w = K < 4 ? n.x : K < 8 ? n.y : K < 12 ? n.z : n.w;
  // result bytes: [lane4, code byte K&3 of w, 0, 0] = byte*256 + 4*lane
  const uint32_t off = __byte_perm(w, lane4, 0x5504u | ((K & 3) << 4));
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(tb + off));
  if (BITS == 5) v ^= (s << K) & 0x80008000u;
  return v;
}

// One unit in shared memory `u` (its codes, signs and the two rows' scales) against this lane's activation pairs
// x0..x3 (the B fragments) and the block scales of batch rows 2q, 2q + 1: acc += the unit's part of the tile.
template <int BITS>
__device__ __forceinline__ void unit_mma(float (&acc)[4], const uint8_t* u, uint32_t tb, uint32_t lane4, int lane,
                                         const uint4& x0, const uint4& x1, const uint4& x2, const uint4& x3, float x0s,
                                         float x1s) {
  const uint4 n0 = reinterpret_cast<const uint4*>(u)[lane];
  const uint4 n1 = reinterpret_cast<const uint4*>(u + 512)[lane];
  uint32_t s0 = 0, s1 = 0;
  if (BITS == 5) {
    s0 = reinterpret_cast<const uint32_t*>(u + 1024)[lane];
    s1 = reinterpret_cast<const uint32_t*>(u + 1024 + 128)[lane];
  }
  const uint32_t scw = reinterpret_cast<const uint32_t*>(u + Unit<BITS>::NIB + Unit<BITS>::SGN)[lane >> 2];
  float c[4] = {0.f, 0.f, 0.f, 0.f};
#define HLWQ_WSTEP(S, XA, XB)                                                                       \
  mma_f16_16816(c, wide_pair<BITS, 2 * S>(tb, lane4, n0, s0), wide_pair<BITS, 2 * S>(tb, lane4, n1, s1), \
                 wide_pair<BITS, 2 * S + 1>(tb, lane4, n0, s0), wide_pair<BITS, 2 * S + 1>(tb, lane4, n1, s1), XA, XB)
  HLWQ_WSTEP(0, x0.x, x0.y); HLWQ_WSTEP(1, x0.z, x0.w); HLWQ_WSTEP(2, x1.x, x1.y); HLWQ_WSTEP(3, x1.z, x1.w);
  HLWQ_WSTEP(4, x2.x, x2.y); HLWQ_WSTEP(5, x2.z, x2.w); HLWQ_WSTEP(6, x3.x, x3.y); HLWQ_WSTEP(7, x3.z, x3.w);
#undef HLWQ_WSTEP
  const float2 sc = __half22float2(*reinterpret_cast<const __half2*>(&scw));
  acc[0] = fmaf(c[0], sc.x * x0s, acc[0]); acc[1] = fmaf(c[1], sc.x * x1s, acc[1]);
  acc[2] = fmaf(c[2], sc.y * x0s, acc[2]); acc[3] = fmaf(c[3], sc.y * x1s, acc[3]);
}

// The first stream kernel's unit: the activation from global memory at offsets the caller advances per block (xo:
// uint4 units into xp for batch row g; so: into xs for row 2q, row 2q + 1 being n_blocks further on).
template <int BITS>
__device__ __forceinline__ void stream_block(float (&acc)[4], const uint8_t* u, uint32_t tb, uint32_t lane4, int lane,
                                             const uint4* __restrict__ xp, const float* __restrict__ xs, bool has_x,
                                             bool has_s0, bool has_s1, int xo, int so, int n_blocks) {
  uint4 x0 = make_uint4(0, 0, 0, 0), x1 = x0, x2 = x0, x3 = x0;
  if (has_x) {
    const uint4* p = xp + xo;
    x0 = __ldg(p); x1 = __ldg(p + 1); x2 = __ldg(p + 2); x3 = __ldg(p + 3);
  }
  const float x0s = has_s0 ? __ldg(xs + so) : 0.f;
  const float x1s = has_s1 ? __ldg(xs + so + n_blocks) : 0.f;
  unit_mma<BITS>(acc, u, tb, lane4, lane, x0, x1, x2, x3, x0s, x1s);
}

template <int BITS, int STAGES, int G>
struct StreamSmem {
  static constexpr size_t RING = (size_t)STAGES * G * Unit<BITS>::BYTES;  // one warp's ring
  __host__ __device__ static size_t bytes(int warps) {
    return TC_WIDE_TABLE_WORDS * sizeof(uint32_t) + warps * (RING + STAGES * 8);
  }
  // The lean kernel's rotated input (ROT), 16-byte aligned after the rest: 256 bytes of pairs + a scale per block.
  __host__ __device__ static size_t x_offset(int warps) { return (bytes(warps) + 15) & ~(size_t)15; }
  static size_t rot_bytes(int warps, int n_blocks) { return x_offset(warps) + (size_t)n_blocks * (256 + 4); }
};

template <int BITS, int STAGES, int G, typename T>
__global__ void __launch_bounds__(1024) tc_stream_kernel(const uint8_t* __restrict__ tiles,
                                                        const float* __restrict__ codebook,
                                                        const uint4* __restrict__ xp, const float* __restrict__ xs,
                                                        T* __restrict__ y, int n, int R, int n_blocks, int n_tiles,
                                                        float* __restrict__ ws) {
  // The pair table, then each warp's ring of STAGES slots of G units, then each warp's STAGES mbarriers.
  extern __shared__ __align__(16) uint32_t tab[];
  constexpr int UB = Unit<BITS>::BYTES;
  using S = StreamSmem<BITS, STAGES, G>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, KS = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  // At most one warp per unit: a warp with an empty run inside a tile's owners would never park its part.
  const int U = n_tiles * n_blocks, W = min((int)gridDim.x * KS, U), w = blockIdx.x * KS + warp;
  const int lo = w < W ? stream_start(w, U, W) : 0, hi = w < W ? stream_start(w + 1, U, W) : 0;
  const int n_stages = (hi - lo + G - 1) / G;
  uint8_t* ring = reinterpret_cast<uint8_t*>(tab + TC_WIDE_TABLE_WORDS) + (size_t)warp * S::RING;
  const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(ring);
  const uint32_t bars = (uint32_t)__cvta_generic_to_shared(tab + TC_WIDE_TABLE_WORDS) + KS * (uint32_t)S::RING +
                        warp * STAGES * 8;
  // Stage k: units lo + kG .. min(lo + (k+1)G, hi) - 1, contiguous in memory.
  auto fetch = [&](int k) {
    const int u0 = lo + k * G, count = min(G, hi - u0);
    bulk_fetch(ring_s + (k % STAGES) * G * UB, tiles + (size_t)u0 * UB, (uint32_t)(count * UB), bars + (k % STAGES) * 8);
  };
  if (lane == 0) {
    for (int i = 0; i < STAGES; ++i) mbar_init(bars + i * 8, 1);
    // The first stages are requested before the table is built: the fill then hides under their latency.
    for (int k = 0; k < STAGES - 1 && k < n_stages; ++k) fetch(k);
  }
  fill_pair_table<BITS, 64>(tab, codebook);
  __syncthreads();
  if (lo >= hi) return;
  const uint32_t tb = (uint32_t)__cvta_generic_to_shared(tab), lane4 = lane * 4;
  const bool has_x = g < n, has_s0 = 2 * q < n, has_s1 = 2 * q + 1 < n;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int t = lo / n_blocks, b = lo - t * n_blocks;
  // Activation offsets of block b, advanced per unit: xp row g (uint4 units, pairs 16q..), xs row 2q (row 2q + 1 is
  // n_blocks further on).
  int xo = (g * n_blocks + b) * 16 + q * 4, so = 2 * q * n_blocks + b;
  for (int k = 0; k < n_stages; ++k) {
    mbar_wait(bars + (k % STAGES) * 8, (k / STAGES) & 1);
    // Stage k + STAGES - 1 reuses the slot of stage k - 1, whose units every lane finished with last iteration.
    __syncwarp();
    if (lane == 0 && k + STAGES - 1 < n_stages) fetch(k + STAGES - 1);
    const uint8_t* slot = ring + (k % STAGES) * G * UB;
#pragma unroll
    for (int i = 0; i < G; ++i) {
      const int u = lo + k * G + i;
      if (u < hi) {
        stream_block<BITS>(acc, slot + i * UB, tb, lane4, lane, xp, xs, has_x, has_s0, has_s1, xo, so, n_blocks);
        xo += 16;
        so += 1;
        if (++b == n_blocks || u + 1 == hi) {
          stream_flush<T, true>(acc, t, w, W, U, n_blocks, ws, y, n, R);  // u + 1 == hi: the run's last
          acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
          xo -= b * 16;
          so -= b;
          b = 0;
          ++t;
        }
      }
    }
  }
}

// ---- stream mode, lean issue: the same units, runs and flushes as tc_stream_kernel, with less work per unit ----------
// What SASS showed the first design spends beside its 4 instructions per lookup (~120 of ~250 per unit): a TMA issue
// that the compiler could not prove warp-uniform (an ELECT/R2UR loop per operand), a ring index modulo 3, activation
// addresses rebuilt in 64 bits, and zero-fills of the activation registers of lanes whose batch row is absent. Here the
// warp index is broadcast from lane 0 (the compiler then keeps the run, the source and the slot in uniform registers),
// the ring advances by compare-and-reset, and the activation pointers advance per unit. Launched programmatically
// (PDL), its prologue and first weight fetches overlap the kernel before it; it reads the activation only after
// griddepcontrol.wait.
// PyTorch's gelu(approximate="tanh"): 0.5·x·(1 + tanh(y)), y = √(2/π)·(x + 0.044715·x³), in its sigmoid form
// x / (1 + e^(-2y)): no cancellation for negative x (1 - 2/(1 + e^(2y)) lost all bits below x ≈ -4.9), +inf -> inf,
// large negative x -> -0, as torch.
__device__ __forceinline__ float gelu_tanh(float x) {
  const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.f + __expf(-2.f * y));
}

// What a rotating stream matvec computes its input from (PRE, below): NORM2's residual stream and norms.
template <typename T>
struct Pre {
  const T* h;         // NORM2: the residual h
  const float* w1;    // NORM2: the gain of the norm applied to x before it joins h
  const float* w2;    // NORM2: the gain of the norm of the new residual, whose output is the input
  float eps;
  T* h_out;           // NORM2: the new residual (h + rms_norm(x)·w1)·scale, written by CTA 0
  const float* scale; // NORM2: a scalar the joined residual is multiplied by (a layer's scalar), or none
};

template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f32<T>(from_f32<T>(v)); }

// The sum of every thread's v, the same float in every thread of every CTA: warps' lane-0 sums added in warp order.
__device__ __forceinline__ float cta_sum(float v, float* red, int warp, int lane, int warps) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += red[w];
  __syncthreads();  // red is reused by the next sum
  return total;
}

// One block of the input (lane's 4 values, before the sign diagonal) -> the pair layout in shared memory.
__device__ __forceinline__ void rotate_store(float (&v)[4], const float (&sg)[4], const float* __restrict__ inv_smooth,
                                             int blk, int lane, uint4* xsm, float* xss) {
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] *= sg[i];
  if (inv_smooth) {
    const float4 is = *reinterpret_cast<const float4*>(inv_smooth + (size_t)blk * B + lane * 4);
    v[0] *= is.x; v[1] *= is.y; v[2] *= is.z; v[3] *= is.w;
  }
  warp_fwht_regs(v, lane);
  uint4 pk;
  float scale;
  pair_block(v, pk, scale);
  if (lane < 16) xsm[blk * 16 + lane] = pk;
  if (lane == 0) xss[blk] = scale;
}

// The prologue's rotation, four blocks per warp at a time: lane l takes block l >> 3 of the warp's four and holds 16
// of its elements, j < 16 at index quad_index(j, l & 7), so that the transform's strides 1, 2, 4 and 64 are in
// registers and 8, 16, 32 are shuffles among 8 lanes: 12 shuffles per block where warp_fwht_regs takes 20, each
// added with one fma by +-1, and pair_block's (z[i], z[i + 64]) in one lane. The stages run in warp_fwht_regs's order
// (stride 1 first, 64 last), each sum rounded as there: the same bits as rotate_store.
__device__ __forceinline__ int quad_index(int j, int sub) { return (j & 7) | sub << 3 | (j >> 3) << 6; }

__device__ __forceinline__ void quad_fwht(float (&v)[16], int sub) {
#pragma unroll
  for (int m = 1; m < 8; m <<= 1)
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if (!(j & m)) {
        const float a = v[j], b = v[j | m];
        v[j] = a + b;
        v[j | m] = a - b;
      }
#pragma unroll
  for (int m = 1; m < 8; m <<= 1) {
    const float sign = (sub & m) ? -1.f : 1.f;  // bit set: partner - own; clear: own + partner
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = fmaf(sign, v[j], __shfl_xor_sync(0xffffffffu, v[j], m));
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float a = v[j], b = v[j + 8];
    v[j] = a + b;
    v[j + 8] = a - b;
  }
}

// quad_fwht's block in the pair layout in shared memory, as pair_block + rotate_store write it: lane sub's pairs
// 8·sub .. 8·sub + 7 (two uint4) and, from sub 0, the block's scale. Every lane of the warp calls it (its shuffles
// name them all: a lane left out would hang the others); only `live` ones store.
__device__ __forceinline__ void quad_store(const float (&v)[16], int sub, int blk, bool live, uint4* xsm,
                                           float* xss) {
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(v[j]));
#pragma unroll
  for (int m = 4; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  amax *= 0.08838834764831845f;
  int e = 0;
  frexpf(amax, &e);  // amax < 2^e
  const float scale = amax > 0.f ? ldexpf(1.f, e - 14) : 1.f;
  const float f = 0.08838834764831845f / scale;
  uint32_t ph[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const __half2 p = __floats2half2_rn(v[k] * f, v[k + 8] * f);
    ph[k] = *reinterpret_cast<const uint32_t*>(&p);
  }
  if (!live) return;
  xsm[blk * 16 + sub * 2] = make_uint4(ph[0], ph[1], ph[2], ph[3]);
  xsm[blk * 16 + sub * 2 + 1] = make_uint4(ph[4], ph[5], ph[6], ph[7]);
  if (sub == 0) xss[blk] = scale;
}

// Eight consecutive elements of x from p (16-byte aligned when `vec`), as float.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, bool vec, float* out) {
  if (vec) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = to_f32<T>(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = to_f32<T>(p[k]);
  }
}

// NORM2's input, one token of width K = n_blocks·128 (at most 2 blocks per warp): t = rms_norm(x)·w1, h2 = (h + t)
// [·scale], input = rms_norm(h2)·w2, each rounded to T as the step's eager ops round them (Gemma-4's attention output joining
// the residual, then the MLP's pre-norm). Every CTA computes all of it; CTA 0 writes h2.
template <typename T>
__device__ __forceinline__ void norm2_input(const T* __restrict__ x, const Pre<T>& pre, const float (&sg)[4],
                                            const float* __restrict__ inv_smooth, int n_blocks, int warp, int lane,
                                            int warps, uint4* xsm, float* xss) {
  __shared__ float red[32];
  const float inv_k = 1.f / (float)(n_blocks * B);
  // Everything the three phases read, loaded at once: one L2 round trip before the first sum.
  const float sc = pre.scale ? *pre.scale : 1.f;
  float a[2][4], h[2][4], g1[2][4], g2[2][4], ss = 0.f;
  // Element i of the lane's j-th block (blk), at `at` in the row: the loop both phases below run.
#define HLWQ_NORM2_EACH(...)                                                                                       \
  _Pragma("unroll") for (int j = 0; j < 2; ++j) {                                                                  \
    const int blk = warp + j * warps;                                                                              \
    _Pragma("unroll") for (int i = 0; i < 4; ++i) {                                                                \
      const size_t at = (size_t)blk * B + lane * 4 + i;                                                            \
      __VA_ARGS__                                                                                                  \
    }                                                                                                              \
  }
  HLWQ_NORM2_EACH({
    const bool live = blk < n_blocks;
    a[j][i] = live ? to_f32<T>(x[at]) : 0.f;
    h[j][i] = live ? to_f32<T>(pre.h[at]) : 0.f;
    g1[j][i] = live ? pre.w1[at] : 0.f;
    g2[j][i] = live ? pre.w2[at] : 0.f;
    ss = fmaf(a[j][i], a[j][i], ss);
  })
  const float r1 = rsqrtf(cta_sum(ss, red, warp, lane, warps) * inv_k + pre.eps);
  float ss2 = 0.f;
  HLWQ_NORM2_EACH({
    if (blk < n_blocks) {
      h[j][i] = round_to<T>(h[j][i] + round_to<T>(a[j][i] * r1 * g1[j][i]));
      if (pre.scale) h[j][i] = round_to<T>(h[j][i] * sc);
      if (blockIdx.x == 0) pre.h_out[at] = from_f32<T>(h[j][i]);
    }
    ss2 = fmaf(h[j][i], h[j][i], ss2);
  })
#undef HLWQ_NORM2_EACH
  const float r2 = rsqrtf(cta_sum(ss2, red, warp, lane, warps) * inv_k + pre.eps);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int blk = warp + j * warps;
    if (blk < n_blocks) {
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = round_to<T>(h[j][i] * r2 * g2[j][i]);
      rotate_store(v, sg, inv_smooth, blk, lane, xsm, xss);
    }
  }
}

// Thread-block clusters (sm_90+): the CTAs of a cluster run at once on one GPC and read each other's shared memory.
// Outside a cluster launch a CTA is a cluster of one (rank 0 of 1), and these are never reached on sm_80.
__device__ __forceinline__ int cluster_rank() {
  unsigned r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return (int)r;
}
__device__ __forceinline__ int cluster_size() {
  unsigned n = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
#endif
  return (int)n;
}
// The barrier's .aligned form needs the whole warp converged; __syncwarp makes sure after divergent code (the copy's
// ragged tail, the flush's per-lane polls). Once per launch: no cost worth a second form.
__device__ __forceinline__ void cluster_arrive() {
  __syncwarp();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
  __syncwarp();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// The rotated input's blocks that other CTAs of the cluster made (blk % n != rank), copied from the same offsets of
// their shared memory: [n_blocks][16] uint4 of pairs at xsm, then the n_blocks scales (xss), one 16- or 4-byte word
// per thread and step. n is a power of two.
__device__ __forceinline__ void copy_cluster_blocks(uint4* xsm, float* xss, int n_blocks, int n, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  for (int i = threadIdx.x; i < n_blocks * 17; i += blockDim.x) {
    const bool pairs = i < n_blocks * 16;
    const int blk = pairs ? i >> 4 : i - n_blocks * 16, from = blk & (n - 1);
    if (from == rank) continue;
    void* const local = pairs ? static_cast<void*>(xsm + i) : static_cast<void*>(xss + blk);
    uint32_t addr;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
                 : "=r"(addr) : "r"((uint32_t)__cvta_generic_to_shared(local)), "r"(from));
    if (pairs) {
      uint4 v;
      asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
      xsm[i] = v;
    } else {
      float v;
      asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
      xss[blk] = v;
    }
  }
#endif
}

// ROT (one token): the kernel rotates its own input. After the weight fetches are under way and the table is built,
// each warp turns blocks of x into the pair layout in shared memory (pair_block, as rotate_pairs), and the units read
// the activation from there: no rotation launch, and no wait for its output to reach memory. `trigger` then lets the
// kernel after it launch once every warp has read x (the rotation kernel's rule). PRE (with ROT) says what the input
// is: 0 x itself; PRE_GLU x holds [gate | up] (2K values) and the input is gelu_tanh(gate)·up, rounded to T once, as
// the compiled step's fused kernel stores it; PRE_NORM2 norm2_input of x and the residual (pre).
#define PRE_GLU 1
#define PRE_NORM2 2
template <int BITS, int STAGES, bool ROT, int PRE, typename T>
__global__ void __launch_bounds__(1024) tc_stream2_kernel(const uint8_t* __restrict__ tiles,
                                                         const float* __restrict__ codebook,
                                                         const uint4* __restrict__ xp, const float* __restrict__ xs,
                                                         const T* __restrict__ x, const float* __restrict__ signs,
                                                         const float* __restrict__ inv_smooth, bool trigger,
                                                         Pre<T> pre, T* __restrict__ y, int n, int R, int n_blocks,
                                                         int n_tiles, int parts_arg, float* __restrict__ ws) {
  extern __shared__ __align__(16) uint32_t tab[];
  constexpr int UB = Unit<BITS>::BYTES;
  using S = StreamSmem<BITS, STAGES, 1>;
  const int lane = threadIdx.x & 31, KS = blockDim.x >> 5;
  const int warp = __shfl_sync(0xffffffffu, (int)threadIdx.x >> 5, 0);  // provably warp-uniform
  const int g = lane >> 2, q = lane & 3;
  // parts > 0 (ROT, not PRE_NORM2): the part-major layout (stream_part_warp); else the grid's warps in order. A
  // constant 0 elsewhere, so that those kernels compile as before.
  const int parts = ROT && PRE != PRE_NORM2 ? parts_arg : 0;
  const int U = n_tiles * n_blocks, W = parts ? n_tiles * parts : min((int)gridDim.x * KS, U);
  const int w = parts ? stream_part_warp(blockIdx.x * KS + warp, n_tiles, parts) : blockIdx.x * KS + warp;
  const int lo = w < W ? stream_start(w, U, W) : 0, hi = w < W ? stream_start(w + 1, U, W) : 0;
  const int count = hi - lo;
  const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(tab + TC_WIDE_TABLE_WORDS) + warp * (uint32_t)S::RING;
  const uint32_t bars = (uint32_t)__cvta_generic_to_shared(tab + TC_WIDE_TABLE_WORDS) + KS * (uint32_t)S::RING +
                        warp * STAGES * 8;
  const uint8_t* src = tiles + (size_t)lo * UB;  // the next unit to request
  if (lane == 0) {
    for (int i = 0; i < STAGES; ++i) mbar_init(bars + i * 8, 1);
    for (int k = 0; k < STAGES - 1 && k < count; ++k, src += UB) bulk_fetch(ring_s + k * UB, src, UB, bars + k * 8);
  }
  fill_pair_table<BITS, 64>(tab, codebook);
  // ROT: the rotated input after the mbarriers, [n_blocks][16] uint4 of pairs, then [n_blocks] block scales.
  uint4* xsm = reinterpret_cast<uint4*>(reinterpret_cast<uint8_t*>(tab) + S::x_offset(KS));
  float* xss = reinterpret_cast<float*>(xsm + (size_t)n_blocks * 16);
  // A cluster shares the rotation (not PRE_NORM2, whose norm needs all of x in every CTA anyway).
  const int CN = ROT && PRE != PRE_NORM2 ? cluster_size() : 1, CR = CN > 1 ? cluster_rank() : 0;
  if (ROT) {
    pdl_wait();  // x is the previous kernel's output
    float sg[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) sg[i] = signs[lane * 4 + i];
    if (PRE == PRE_NORM2) {
      norm2_input<T>(x, pre, sg, inv_smooth, n_blocks, warp, lane, KS, xsm, xss);
    } else {
      // Four blocks per warp at a time (quad_fwht), of the blocks [b0, b1) this CTA's warps read: all of them, or in
      // the part-major layout their parts' only. In a cluster of CN CTAs (never with parts) this CTA rotates the
      // blocks blk % CN == CR only (its m-th: blk = m·CN + CR), and copies the others from the other CTAs below.
      int b0 = 0, b1 = n_blocks;
      if (parts)
        stream_part_blocks(blockIdx.x * KS, min((int)(blockIdx.x + 1) * KS, W), n_tiles, n_blocks, parts, b0, b1);
      const int sub = lane & 7, quad = lane >> 3, mine = (b1 - b0 - CR + CN - 1) / CN;
      const bool vec = sizeof(T) == 2 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
      float sq[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) sq[j] = signs[quad_index(j, sub)];
      for (int m0 = warp * 4; m0 < mine; m0 += KS * 4) {
        const int m = m0 + quad, blk = b0 + m * CN + CR;
        float v[16];  // absent blocks (m >= mine) take part in the shuffles with zeros and store nothing
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] = 0.f;
        if (m < mine) {
          const T* xb = x + (size_t)blk * B + sub * 8;
          load8<T>(xb, vec, v);
          load8<T>(xb + 64, vec, v + 8);
          if (PRE == PRE_GLU) {
            float up[16];
            load8<T>(xb + (size_t)n_blocks * B, vec, up);
            load8<T>(xb + (size_t)n_blocks * B + 64, vec, up + 8);
#pragma unroll
            for (int j = 0; j < 16; ++j) v[j] = round_to<T>(gelu_tanh(v[j]) * up[j]);
          }
#pragma unroll
          for (int j = 0; j < 16; ++j) v[j] *= sq[j];
          if (inv_smooth) {
            const float4* is = reinterpret_cast<const float4*>(inv_smooth + (size_t)blk * B + sub * 8);
            const float4 a = is[0], b = is[1], c = is[16], d = is[17];  // +64 elements: 16 float4 on
            const float w[16] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w, c.x, c.y, c.z, c.w, d.x, d.y, d.z, d.w};
#pragma unroll
            for (int j = 0; j < 16; ++j) v[j] *= w[j];
          }
        }
        quad_fwht(v, sub);
        quad_store(v, sub, blk, m < mine, xsm, xss);
      }
      if (CN > 1) {
        cluster_arrive();  // the cluster's blocks are all rotated, each in its CTA's shared memory
        cluster_wait();
        copy_cluster_blocks(xsm, xss, n_blocks, CN, CR);
        // Done reading the others' shared memory; every CTA waits on this phase before it exits, so none leaves
        // while another still copies from it.
        cluster_arrive();
      }
    }
  }
  __syncthreads();
  if (ROT && trigger) pdl_trigger();
  if (count <= 0) {
    if (CN > 1) cluster_wait();
    return;
  }
  src = tiles + (size_t)(lo + STAGES - 1) * UB;
  const uint32_t tb = (uint32_t)__cvta_generic_to_shared(tab), lane4 = lane * 4;
  const uint8_t* ring = reinterpret_cast<const uint8_t*>(tab + TC_WIDE_TABLE_WORDS) + (size_t)warp * S::RING;
  int t = lo / n_blocks, b = lo - t * n_blocks;
  // Activation pointers at block b: pairs of batch row g, scales of rows 2q and 2q + 1. Lanes of absent rows load
  // nothing and keep zeros: their products land only in output columns >= n, which are never stored.
  const bool has_x = g < n, has_s0 = 2 * q < n, has_s1 = 2 * q + 1 < n;
  const uint4* xq = ROT ? xsm + b * 16 + q * 4 : xp + ((size_t)g * n_blocks + b) * 16 + q * 4;
  const float* xs0 = ROT ? xss + b : xs + (size_t)(2 * q) * n_blocks + b;
  const float* xs1 = xs0 + n_blocks;
  uint4 x0 = make_uint4(0, 0, 0, 0), x1 = x0, x2 = x0, x3 = x0;
  float x0s = 0.f, x1s = 0.f;
  if (!ROT) pdl_wait();  // the activation is the previous kernel's output (a no-op without programmatic launch)
  int slot = 0, refill = STAGES - 1;
  uint32_t phase = 0;
  int u = lo;
  float acc[4];
  while (true) {
    const int seg = min(hi, (t + 1) * n_blocks), first = u;
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
    for (; u < seg; ++u) {
      mbar_wait(bars + slot * 8, phase);
      __syncwarp();  // every lane is done with the slot refilled next (the previous unit's)
      if (lane == 0 && u + STAGES - 1 < hi) bulk_fetch(ring_s + refill * UB, src, UB, bars + refill * 8);
      src += UB;
      refill = refill + 1 == STAGES ? 0 : refill + 1;
      const uint8_t* p = ring + slot * UB;
      slot = slot + 1 == STAGES ? 0 : slot + 1;
      phase ^= slot == 0;
      if (ROT) {  // shared memory (one token: row g = 0's lanes and column 0's scale)
        if (has_x) { x0 = xq[0]; x1 = xq[1]; x2 = xq[2]; x3 = xq[3]; }
        if (has_s0) x0s = *xs0;
      } else {
        if (has_x) { x0 = __ldg(xq); x1 = __ldg(xq + 1); x2 = __ldg(xq + 2); x3 = __ldg(xq + 3); }
        if (has_s0) x0s = __ldg(xs0);
        if (has_s1) x1s = __ldg(xs1);
      }
      xq += 16; ++xs0; ++xs1;
      unit_mma<BITS>(acc, p, tb, lane4, lane, x0, x1, x2, x3, x0s, x1s);
    }
    if (u == hi) break;
    stream_flush<T, false>(acc, t, w, W, U, n_blocks, ws, y, n, R);
    // The next tile starts at block 0.
    const int done = b + (u - first);
    xq -= (size_t)done * 16; xs0 -= done; xs1 -= done;
    b = 0;
    ++t;
  }
  // The run's last tile, outside the loop: every warp gets here at about the same time, so this flush is what the
  // launch ends on, and with the loop's registers free it polls its parts in batches of four (the compact gather, up
  // to two tokens, polls all of them at once).
  stream_flush<T, true, 4>(acc, t, w, W, U, n_blocks, ws, y, n, R, parts);
  if (CN > 1) cluster_wait();  // no CTA of the cluster still copies from this one's shared memory
}

// ---- rotation into the pair layout: xp[n, b, j] = fp16x2(z[b*128+j], z[b*128+j+64]) / xs[n, b], j < 64 -------------
// z = H·D·(x / s) per block; xs[n, b] is a power of two that puts the block's largest |z| in [2^13, 2^14): exact to
// undo, and fp16 keeps its 11-bit significand for any activation range. A float32 input gets ~22 bits: its row holds
// the hi plane [n_blocks, 64] then the lo plane (fp16 of each pair's remainder), and the tile kernel multiplies both
// (SPLIT). bf16 and fp16 inputs carry no more than fp16's 11 bits: one plane.
template <typename T>
__global__ void rotate_pairs_kernel(const T* __restrict__ x, const float* __restrict__ signs,
                                    const float* __restrict__ inv_smooth, __half2* __restrict__ out,
                                    float* __restrict__ xs, int rows, int K, int n_blocks) {
  constexpr bool SPLIT = std::is_same<T, float>::value;
  int row, blk, lane;
  size_t base;
  float v[4];
  const bool live = warp_rotated_block<T>(x, signs, inv_smooth, rows, K, n_blocks, row, blk, lane, base, v);
  // Every warp of the CTA has read its input: the matvec after it may start its prologue and weight fetches (it
  // waits for this kernel's output).
  __syncthreads();
  pdl_trigger();
  if (!live) return;
  uint4 pk, lo;
  float scale;
  pair_block(v, pk, scale, SPLIT ? &lo : nullptr);
  uint4* o = reinterpret_cast<uint4*>(out + ((size_t)row * (SPLIT ? 2 : 1) * n_blocks + blk) * 64);
  if (lane < 16) o[lane] = pk;
  if (SPLIT && lane < 16) o[(size_t)n_blocks * 16 + lane] = lo;
  if (lane == 0) xs[(size_t)row * n_blocks + blk] = scale;
}

// ---- dequantize to the rotated basis: w[r, b*128+i] = LUT[code]·scale/√B (bf16), for the tensor-core prefill ------
template <int BITS>
__global__ void dequant_kernel(const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
                               const float* __restrict__ codebook, __nv_bfloat16* __restrict__ w, int R,
                               int n_blocks) {
  constexpr int BPB = 16 * BITS;
  __shared__ float lut[1 << BITS];
  for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) lut[i] = codebook[i] * 0.08838834764831845f;
  __syncthreads();
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  const int q = t & 3;
  const unsigned unit = t >> 2;  // row * n_blocks + block
  if (unit >= (unsigned)R * (unsigned)n_blocks) return;
  const uint8_t* blkp = codes + (size_t)unit * BPB;
  const uint4 wv = __ldg(reinterpret_cast<const uint4*>(blkp) + q);
  uint4 hv = make_uint4(0, 0, 0, 0);
  if (BITS == 5) hv = __ldg(reinterpret_cast<const uint4*>(blkp + 64));
  else if (BITS == 6) hv = __ldg(reinterpret_cast<const uint4*>(blkp + 64) + (q & 1));
  const float sc = __half2float(scales[unit]);
  const uint32_t ws[4] = {wv.x, wv.y, wv.z, wv.w}, hs[4] = {hv.x, hv.y, hv.z, hv.w};
  __nv_bfloat16* out = w + (size_t)unit * B + 16 * q;  // row-major [R, n_blocks*B]: unit*B is the block's start
  uint32_t lo_pk[8], hi_pk[8];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    uint32_t lo, hi;
    offsets<BITS>(ws[k], hs[k], q, lo, hi);
    __nv_bfloat162 a = __floats2bfloat162_rn(lut_at(lut, lo & 0xFF) * sc, lut_at(lut, (lo >> 8) & 0xFF) * sc);
    __nv_bfloat162 b = __floats2bfloat162_rn(lut_at(lut, (lo >> 16) & 0xFF) * sc, lut_at(lut, lo >> 24) * sc);
    __nv_bfloat162 c = __floats2bfloat162_rn(lut_at(lut, hi & 0xFF) * sc, lut_at(lut, (hi >> 8) & 0xFF) * sc);
    __nv_bfloat162 d = __floats2bfloat162_rn(lut_at(lut, (hi >> 16) & 0xFF) * sc, lut_at(lut, hi >> 24) * sc);
    lo_pk[2 * k] = *reinterpret_cast<uint32_t*>(&a);
    lo_pk[2 * k + 1] = *reinterpret_cast<uint32_t*>(&b);
    hi_pk[2 * k] = *reinterpret_cast<uint32_t*>(&c);
    hi_pk[2 * k + 1] = *reinterpret_cast<uint32_t*>(&d);
  }
  uint4* o = reinterpret_cast<uint4*>(out);
  o[0] = make_uint4(lo_pk[0], lo_pk[1], lo_pk[2], lo_pk[3]);
  o[1] = make_uint4(lo_pk[4], lo_pk[5], lo_pk[6], lo_pk[7]);
  o[8] = make_uint4(hi_pk[0], hi_pk[1], hi_pk[2], hi_pk[3]);  // +64 elements
  o[9] = make_uint4(hi_pk[4], hi_pk[5], hi_pk[6], hi_pk[7]);
}

// ---- embedding rows from pinned host memory: the table stays in host RAM, the lookup stays inside a CUDA graph ----
__global__ void gather_rows_kernel(const uint8_t* __restrict__ table, const int64_t* __restrict__ ids,
                                   uint8_t* __restrict__ out, long row_bytes) {
  const uint8_t* src = table + ids[blockIdx.x] * row_bytes;
  uint8_t* dst = out + (long)blockIdx.x * row_bytes;
  if (row_bytes % 16 == 0) {
    for (long i = threadIdx.x; i < row_bytes / 16; i += blockDim.x)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  } else {
    for (long i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[i] = src[i];
  }
}

// The rotation kernels' grid: one warp per (row, 128-block).
static unsigned rotation_grid(int rows, int n_blocks, int threads) {
  const long warps = (long)rows * n_blocks;
  return (unsigned)((warps * 32 + threads - 1) / threads);
}

// CTAs of `kernel` that fit on the device at once: the persistent grids stride over their work with this many.
template <typename Kernel>
static int resident_ctas(Kernel kernel, int threads, size_t smem) {
  int per_sm = 0, dev = 0, sms = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return per_sm * sms > 0 ? per_sm * sms : 1;
}

// ---- C ABI ----------------------------------------------------------------------------------------------------------
// dtype codes: 0 = float32, 1 = bfloat16, 2 = float16. Every entry returns the launch's cudaError_t (0 = success).
extern "C" {

int hlwq_rotate(const void* x, const float* signs, const float* inv_smooth, float* out, int rows, int K, int dtype,
                cudaStream_t stream) {
  const int n_blocks = K / B;
  const int threads = 256;
  const unsigned grid = rotation_grid(rows, n_blocks, threads);
  if (dtype == 0) rotate_kernel<float><<<grid, threads, 0, stream>>>((const float*)x, signs, inv_smooth, out, rows, K, n_blocks);
  else if (dtype == 1) rotate_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>((const __nv_bfloat16*)x, signs, inv_smooth, out, rows, K, n_blocks);
  else rotate_kernel<__half><<<grid, threads, 0, stream>>>((const __half*)x, signs, inv_smooth, out, rows, K, n_blocks);
  return (int)cudaGetLastError();
}

}  // extern "C"

template <int BITS, int ROWS, int N, typename T>
static void launch_gemv(const uint8_t* codes, const __half* scales, const float* codebook, const float* xr, void* y,
                        int R, int K, int max_warps, cudaStream_t stream) {
  const int n_blocks = K / B;
  const int n_chunks = (n_blocks + BLOCKS_PER_CHUNK - 1) / BLOCKS_PER_CHUNK;
  const int ks = n_chunks < max_warps ? n_chunks : max_warps;
  const int threads = 32 * ks;
  const int groups = (R + ROWS - 1) / ROWS;
  // A grid of at most the CTAs that fit at once, striding over row groups: no half-empty last wave.
  static int resident[9] = {0};
  if (!resident[ks]) resident[ks] = resident_ctas(gemv_kernel<BITS, ROWS, N, T>, threads, 0);
  const unsigned grid = (unsigned)(groups < resident[ks] ? groups : resident[ks]);
  gemv_kernel<BITS, ROWS, N, T><<<grid, threads, 0, stream>>>(codes, scales, codebook, xr, (T*)y, R, K, n_blocks);
}

template <int BITS, int ROWS, typename T>
static int gemv_n(int n, const uint8_t* codes, const __half* scales, const float* codebook, const float* xr, void* y,
                  int R, int K, int wpc, cudaStream_t stream) {
  switch (n) {
    case 1: launch_gemv<BITS, ROWS, 1, T>(codes, scales, codebook, xr, y, R, K, wpc, stream); break;
    case 2: launch_gemv<BITS, ROWS, 2, T>(codes, scales, codebook, xr, y, R, K, wpc, stream); break;
    case 3: launch_gemv<BITS, ROWS, 3, T>(codes, scales, codebook, xr, y, R, K, wpc, stream); break;
    case 4: launch_gemv<BITS, ROWS, 4, T>(codes, scales, codebook, xr, y, R, K, wpc, stream); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return 0;
}

template <int BITS, typename T>
static int gemv_rows(int rows_per_warp, int n, const uint8_t* codes, const __half* scales, const float* codebook,
                     const float* xr, void* y, int R, int K, int wpc, cudaStream_t stream) {
  switch (rows_per_warp) {
    case 2: return gemv_n<BITS, 2, T>(n, codes, scales, codebook, xr, y, R, K, wpc, stream);
    case 4: return gemv_n<BITS, 4, T>(n, codes, scales, codebook, xr, y, R, K, wpc, stream);
    case 8: return gemv_n<BITS, 8, T>(n, codes, scales, codebook, xr, y, R, K, wpc, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

template <typename T>
static int gemv_bits(int bits, int rows_per_warp, int n, const uint8_t* codes, const __half* scales,
                     const float* codebook, const float* xr, void* y, int R, int K, int wpc, cudaStream_t stream) {
  switch (bits) {
    case 4: return gemv_rows<4, T>(rows_per_warp, n, codes, scales, codebook, xr, y, R, K, wpc, stream);
    case 5: return gemv_rows<5, T>(rows_per_warp, n, codes, scales, codebook, xr, y, R, K, wpc, stream);
    case 6: return gemv_rows<6, T>(rows_per_warp, n, codes, scales, codebook, xr, y, R, K, wpc, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

extern "C" {

// y: [n, R] in `dtype`; xr: float32 [n, K] already rotated; n in 1..4.
int hlwq_gemv(const uint8_t* codes, const void* scales, const float* codebook, const float* xr, void* y, int n, int R,
              int K, int bits, int rows_per_warp, int warps_per_cta, int dtype, cudaStream_t stream) {
  int rc;
  const __half* s = (const __half*)scales;
  if (dtype == 0) rc = gemv_bits<float>(bits, rows_per_warp, n, codes, s, codebook, xr, y, R, K, warps_per_cta, stream);
  else if (dtype == 1) rc = gemv_bits<__nv_bfloat16>(bits, rows_per_warp, n, codes, s, codebook, xr, y, R, K, warps_per_cta, stream);
  else rc = gemv_bits<__half>(bits, rows_per_warp, n, codes, s, codebook, xr, y, R, K, warps_per_cta, stream);
  if (rc) return rc;
  return (int)cudaGetLastError();
}

// out[i] = table[ids[i]] for n rows of row_bytes; `table` is pinned host memory (mapped into the device's space).
int hlwq_gather_pinned(const void* table, const int64_t* ids, void* out, int n, long row_bytes, cudaStream_t stream) {
  void* dev = nullptr;
  cudaError_t e = cudaHostGetDevicePointer(&dev, const_cast<void*>(table), 0);
  if (e != cudaSuccess) return (int)e;
  gather_rows_kernel<<<n, 256, 0, stream>>>((const uint8_t*)dev, ids, (uint8_t*)out, row_bytes);
  return (int)cudaGetLastError();
}

// w: bfloat16 [R, K] in the rotated basis (scale/√B folded in).
int hlwq_dequant(const uint8_t* codes, const void* scales, const float* codebook, void* w, int R, int K, int bits,
                 cudaStream_t stream) {
  const int n_blocks = K / B;
  const size_t threads_total = (size_t)R * n_blocks * 4;
  const int threads = 256;
  const unsigned grid = (unsigned)((threads_total + threads - 1) / threads);
  const __half* s = (const __half*)scales;
  __nv_bfloat16* o = (__nv_bfloat16*)w;
  switch (bits) {
    case 4: dequant_kernel<4><<<grid, threads, 0, stream>>>(codes, s, codebook, o, R, n_blocks); break;
    case 5: dequant_kernel<5><<<grid, threads, 0, stream>>>(codes, s, codebook, o, R, n_blocks); break;
    case 6: dequant_kernel<6><<<grid, threads, 0, stream>>>(codes, s, codebook, o, R, n_blocks); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

}  // extern "C"

// ---- dequantize the tiled layout to the rotated basis (prefill: fp16 [R, K] for cuBLAS; float32 for the split path)
// One thread per (tile, block, half, lane): 32 weights of row 16t + g + 8h, positions 16q..16q+15 and +64.
template <int BITS, typename O>
__global__ void dequant_tiles_kernel(const uint8_t* __restrict__ tiles, const float* __restrict__ codebook,
                                     O* __restrict__ w, int R, int n_blocks, long units) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = codebook[BITS == 5 ? 16 + threadIdx.x : threadIdx.x] * 0.08838834764831845f;
  __syncthreads();
  const long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= units * 64) return;
  const int lane = t & 31, h = (t >> 5) & 1;
  const long unit = t >> 6;  // tile * n_blocks + block
  const int blk = unit % n_blocks, tile = unit / n_blocks;
  const int g = lane >> 2, q = lane & 3;
  const int row = tile * 16 + g + 8 * h;
  if (row >= R) return;
  const uint8_t* u = tiles + unit * Unit<BITS>::BYTES;
  const uint4 nb = __ldg(reinterpret_cast<const uint4*>(u + h * 512) + lane);
  const uint32_t sg = BITS == 5 ? __ldg(reinterpret_cast<const uint32_t*>(u + 1024 + h * 128) + lane) : 0u;
  const __half2 sc2 = *reinterpret_cast<const __half2*>(u + Unit<BITS>::NIB + Unit<BITS>::SGN + g * 4);
  const float sc = h ? __high2float(sc2) : __low2float(sc2);
  const uint32_t words[4] = {nb.x, nb.y, nb.z, nb.w};
  float lo[16], hi[16];  // positions 16q + k and 64 + 16q + k
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    const uint32_t byte = (words[k >> 2] >> (8 * (k & 3))) & 0xFF;
    float a = lut[byte & 15] * sc, c = lut[byte >> 4] * sc;
    if (BITS == 5) {
      if ((sg >> (15 - k)) & 1) a = -a;
      if ((sg >> (31 - k)) & 1) c = -c;
    }
    lo[k] = a;
    hi[k] = c;
  }
  O* o = w + (size_t)row * n_blocks * B + (size_t)blk * B + 16 * q;
  if (std::is_same<O, float>::value) {
    float4* f = reinterpret_cast<float4*>(o);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[i] = make_float4(lo[4 * i], lo[4 * i + 1], lo[4 * i + 2], lo[4 * i + 3]);
      f[16 + i] = make_float4(hi[4 * i], hi[4 * i + 1], hi[4 * i + 2], hi[4 * i + 3]);  // +64 elements
    }
  } else {
    uint32_t pl[8], ph[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      __half2 pa = __floats2half2_rn(lo[2 * i], lo[2 * i + 1]), pc = __floats2half2_rn(hi[2 * i], hi[2 * i + 1]);
      pl[i] = *reinterpret_cast<uint32_t*>(&pa);
      ph[i] = *reinterpret_cast<uint32_t*>(&pc);
    }
    uint4* v = reinterpret_cast<uint4*>(o);
    v[0] = make_uint4(pl[0], pl[1], pl[2], pl[3]);
    v[1] = make_uint4(pl[4], pl[5], pl[6], pl[7]);
    v[8] = make_uint4(ph[0], ph[1], ph[2], ph[3]);  // +64 elements
    v[9] = make_uint4(ph[4], ph[5], ph[6], ph[7]);
  }
}

// ---- C ABI of the tensor-core path -----------------------------------------------------------------------------------
template <int BITS, int PF, bool SPLIT, typename T>
static int launch_tc(const uint8_t* tiles, const float* codebook, const void* xp, const float* xs, void* y, int n, int R,
                     int n_blocks, int warps, float* ws, cudaStream_t stream) {
  const int n_tiles = (R + 15) / 16;
  const int threads = 32 * warps;
  const size_t smem = ((SPLIT ? 2 : 1) * TC_TABLE_WORDS + warps * 128) * sizeof(uint32_t);
  static int resident[17] = {0};
  if (!resident[warps]) {
    // SPLIT's two tables pass the 48 KB default: opt in to the most any warps count needs, once, on the first call
    // (before any graph capture), then size the grid.
    if (SPLIT) {
      const int most = (2 * TC_TABLE_WORDS + 16 * 128) * sizeof(uint32_t);
      const cudaError_t e = cudaFuncSetAttribute(tc_gemv_kernel<BITS, PF, SPLIT, T>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, most);
      if (e != cudaSuccess) return (int)e;
    }
    resident[warps] = resident_ctas(tc_gemv_kernel<BITS, PF, SPLIT, T>, threads, smem);
  }
  const unsigned grid = (unsigned)(n_tiles < resident[warps] ? n_tiles : resident[warps]);
  tc_gemv_kernel<BITS, PF, SPLIT, T><<<grid, threads, smem, stream>>>(tiles, codebook, (const uint4*)xp, xs, (T*)y,
                                                                      n, R, n_blocks, n_tiles);
  return (int)cudaGetLastError();
}

// A stream kernel's launch setup, per kernel function (`c`): its shared-memory limit, only ever raised, so a smaller
// launch cannot lower it under a larger one's feet and, once set, no call is made inside a graph capture (one device
// per process; the eager warm-up launches every shape first); and its grid, the CTAs that fit at once for this warps
// count and shared memory (cached per pair, so a launch's grid, and with it the order of its fix-up sums, never
// depends on the calls before it), fewer when that would leave a warp under two units.
// A stream launch's grid, cluster size (1: none) and parts per tile (0: the contiguous layout).
struct StreamPlan {
  unsigned grid = 0;
  int cluster = 1;
  int parts = 0;
};

// The part-major layout's parts per tile for a launch whose grid holds grid_warps warps: as many as the grid has
// warps for, and 0 where its longest run would be longer than the contiguous layout's (then it is not used).
static int stream_parts(int n_tiles, int n_blocks, long grid_warps) {
  const long units = (long)n_tiles * n_blocks, runs = std::min(grid_warps, units);
  const int parts = (int)std::min(grid_warps / n_tiles, (long)n_blocks);
  if (parts < 1) return 0;
  return (n_blocks + parts - 1) / parts <= (units + runs - 1) / runs ? parts : 0;
}

// Per launch function: the shared memory opted into per device, and the resident CTAs per (device, warps, shared
// memory, cluster), asked once (an occupancy query per call would cost more than some launches).
struct StreamLaunchCache {
  static constexpr int SLOTS = 32, DEVICES = 16;
  size_t opted[DEVICES] = {0};
  int n = 0;
  int dev[SLOTS] = {0}, warps[SLOTS] = {0}, cluster[SLOTS] = {0}, ctas[SLOTS] = {0};
  size_t smem[SLOTS] = {0};
};

// CTAs of `kernel` resident at once in clusters of `cluster` (whole clusters only: a GPC whose free SMs are fewer
// than a cluster leaves them idle); 0 on a device without cluster launches, or where not even one fits.
template <typename Kernel>
static cudaError_t resident_cluster_ctas(Kernel kernel, int threads, size_t smem, int cluster, int dev, int& ctas) {
  ctas = 0;
  int can = 0;
  cudaError_t e = cudaDeviceGetAttribute(&can, cudaDevAttrClusterLaunch, dev);
  if (e != cudaSuccess || !can) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(cluster);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
  ctas = clusters * cluster;
  if (e != cudaSuccess) cudaGetLastError();  // returned to the caller; left set, a later launch's check would see it
  return e;
}

// The grid of a stream launch: every CTA resident at once (the finisher waits on later CTAs), at most ~2 units per
// warp's run; in clusters of `cluster`, a whole number of them, or none where no cluster fits or the launch wants
// fewer CTAs than a cluster holds.
template <typename Kernel>
static int stream_plan(Kernel kernel, size_t smem, int warps, long units, int cluster, StreamLaunchCache& c,
                       StreamPlan& plan) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return (int)e;
  if (dev >= StreamLaunchCache::DEVICES || smem > c.opted[dev]) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return (int)e;
    if (dev < StreamLaunchCache::DEVICES) c.opted[dev] = smem;
  }
  const long wanted = (units + 2L * warps - 1) / (2L * warps);
  for (;; cluster = 1) {  // at most twice: in clusters, then without
    int resident = -1;
    for (int i = 0; i < c.n && resident < 0; ++i)
      if (c.dev[i] == dev && c.warps[i] == warps && c.smem[i] == smem && c.cluster[i] == cluster)
        resident = c.ctas[i];
    if (resident < 0) {
      if (cluster > 1) {
        e = resident_cluster_ctas(kernel, 32 * warps, smem, cluster, dev, resident);
        if (e != cudaSuccess) return (int)e;
      } else {
        resident = resident_ctas(kernel, 32 * warps, smem);
      }
      if (c.n < StreamLaunchCache::SLOTS) {  // past that many shapes: asked per call
        c.dev[c.n] = dev;
        c.warps[c.n] = warps;
        c.smem[c.n] = smem;
        c.cluster[c.n] = cluster;
        c.ctas[c.n++] = resident;
      }
    }
    if (cluster == 1 || (resident >= cluster && wanted >= cluster)) {
      plan.grid = (unsigned)(wanted < resident ? wanted : resident);
      plan.grid -= plan.grid % (unsigned)cluster;
      plan.cluster = cluster;
      return 0;
    }
  }
}

template <int BITS, int STAGES, int G, typename T>
static int launch_tc_stream(const uint8_t* tiles, const float* codebook, const void* xp, const float* xs, void* y,
                            int n, int R, int n_blocks, int warps, float* ws, cudaStream_t stream) {
  const int n_tiles = (R + 15) / 16;
  const size_t smem = StreamSmem<BITS, STAGES, G>::bytes(warps);
  static StreamLaunchCache cache;
  StreamPlan plan;
  const int rc = stream_plan(tc_stream_kernel<BITS, STAGES, G, T>, smem, warps, (long)n_tiles * n_blocks, 1, cache,
                             plan);
  if (rc) return rc;
  const unsigned grid = plan.grid;
  tc_stream_kernel<BITS, STAGES, G, T><<<grid, 32 * warps, smem, stream>>>(tiles, codebook, (const uint4*)xp, xs,
                                                                           (T*)y, n, R, n_blocks, n_tiles, ws);
  return (int)cudaGetLastError();
}

// PRE's tensors, type-erased for the C ABI (the kernel's Pre<T>).
struct PreArgs {
  const void* h;
  const float* w1;
  const float* w2;
  float eps;
  void* h_out;
  const float* scale;
};

// ROT: the kernel rotates x (one token) itself instead of reading rotate_pairs' xp/xs; `trigger`: it then lets its
// dependents launch once it has read x.
template <int BITS, int STAGES, bool ROT, int PRE, typename T>
static int launch_stream2(const uint8_t* tiles, const float* codebook, const void* xp, const float* xs, const void* x,
                          const float* signs, const float* inv_smooth, bool trigger, const PreArgs& pa, void* y,
                          int n, int R, int n_blocks, int warps, float* ws, bool pdl, int cluster, bool parts,
                          cudaStream_t stream, StreamPlan* plan_only = nullptr) {
  using S = StreamSmem<BITS, STAGES, 1>;
  const int n_tiles = (R + 15) / 16;
  const size_t smem = ROT ? S::rot_bytes(warps, n_blocks) : S::bytes(warps);
  const long units = (long)n_tiles * n_blocks;
  static StreamLaunchCache cache;
  StreamPlan plan;
  // The part-major layout where it applies (a rotating launch, not PRE_NORM2, which rotates all of x for its norm),
  // else clusters where asked for: the two are the two ways to rotate less than the whole input per CTA.
  parts = parts && ROT && PRE != PRE_NORM2;
  int rc = stream_plan(tc_stream2_kernel<BITS, STAGES, ROT, PRE, T>, smem, warps, units, parts ? 1 : cluster, cache,
                       plan);
  if (!rc && parts) {
    plan.parts = stream_parts(n_tiles, n_blocks, (long)plan.grid * warps);
    if (plan.parts)
      plan.grid = (unsigned)((n_tiles * plan.parts + warps - 1) / warps);
    else if (cluster > 1)
      rc = stream_plan(tc_stream2_kernel<BITS, STAGES, ROT, PRE, T>, smem, warps, units, cluster, cache, plan);
  }
  if (rc || plan_only) {
    if (plan_only) *plan_only = plan;
    return rc;
  }
  cluster = plan.cluster;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(plan.grid);
  cfg.blockDim = dim3(32 * warps);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  int n_attrs = 0;
  if (pdl) {
    attrs[n_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n_attrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attrs[n_attrs].id = cudaLaunchAttributeClusterDimension;
    attrs[n_attrs].val.clusterDim.x = cluster;
    attrs[n_attrs].val.clusterDim.y = 1;
    attrs[n_attrs++].val.clusterDim.z = 1;
  }
  cfg.attrs = attrs;
  cfg.numAttrs = n_attrs;
  const Pre<T> pre = {(const T*)pa.h, pa.w1, pa.w2, pa.eps, (T*)pa.h_out, pa.scale};
  return (int)cudaLaunchKernelEx(&cfg, tc_stream2_kernel<BITS, STAGES, ROT, PRE, T>, tiles, codebook,
                                 (const uint4*)xp, xs, (const T*)x, signs, inv_smooth, trigger, pre, (T*)y, n, R,
                                 n_blocks, n_tiles, plan.parts, ws);
}

template <int BITS, int STAGES, typename T>
static int launch_tc_stream2(const uint8_t* tiles, const float* codebook, const void* xp, const float* xs, void* y,
                             int n, int R, int n_blocks, int warps, float* ws, bool pdl,
                             cudaStream_t stream) {
  return launch_stream2<BITS, STAGES, false, 0, T>(tiles, codebook, xp, xs, nullptr, nullptr, nullptr, false, PreArgs{},
                                                   y, n, R, n_blocks, warps, ws, pdl, 1, false, stream);
}

template <typename T>
static int tc_bits(int bits, const uint8_t* tiles, const float* codebook, const void* xp, const float* xs, void* y, int n,
                   int R, int n_blocks, int warps, int pf, bool streamed, bool pdl, bool split, float* ws,
                   cudaStream_t stream) {
  // A split activation (hi and lo planes) runs on the tile kernel with a float32 output only.
  if (split && (streamed || !std::is_same<T, float>::value)) return (int)cudaErrorInvalidValue;
  if (streamed && pf >= 6) {  // the lean-issue kernel: 6 -> 2 slots, 7 -> 3, 8 -> 4 (one unit each)
    using Launch2 = int (*)(const uint8_t*, const float*, const void*, const float*, void*, int, int, int, int, float*,
                            bool, cudaStream_t);
    Launch2 f = bits == 4 ? (pf == 6 ? launch_tc_stream2<4, 2, T> : pf == 7 ? launch_tc_stream2<4, 3, T>
                             : pf == 8 ? launch_tc_stream2<4, 4, T> : nullptr)
              : bits == 5 ? (pf == 6 ? launch_tc_stream2<5, 2, T> : pf == 7 ? launch_tc_stream2<5, 3, T>
                             : pf == 8 ? launch_tc_stream2<5, 4, T> : nullptr)
              : nullptr;
    return f ? f(tiles, codebook, xp, xs, y, n, R, n_blocks, warps, ws, pdl, stream)
             : (int)cudaErrorInvalidValue;
  }
  if (pdl) return (int)cudaErrorInvalidValue;  // only the lean-issue kernel waits for its input (griddepcontrol)
  using Launch = int (*)(const uint8_t*, const float*, const void*, const float*, void*, int, int, int, int, float*,
                         cudaStream_t);
  Launch f = nullptr;
  // Stream mode's prefetch field: 2 -> 3 slots of 1 unit, 3 -> 4 x 1, 4 -> 3 slots of 2 units, 5 -> 6 x 1.
  if (streamed)
    f = bits == 4 ? (pf == 2 ? launch_tc_stream<4, 3, 1, T> : pf == 3 ? launch_tc_stream<4, 4, 1, T>
                     : pf == 4 ? launch_tc_stream<4, 3, 2, T> : pf == 5 ? launch_tc_stream<4, 6, 1, T> : nullptr)
      : bits == 5 ? (pf == 2 ? launch_tc_stream<5, 3, 1, T> : pf == 3 ? launch_tc_stream<5, 4, 1, T>
                     : pf == 4 ? launch_tc_stream<5, 3, 2, T> : pf == 5 ? launch_tc_stream<5, 6, 1, T> : nullptr)
      : nullptr;
  else if (split)
    f = bits == 4 ? (pf == 1 ? launch_tc<4, 1, true, float> : pf == 2 ? launch_tc<4, 2, true, float> : nullptr)
      : bits == 5 ? (pf == 1 ? launch_tc<5, 1, true, float> : pf == 2 ? launch_tc<5, 2, true, float> : nullptr)
      : nullptr;
  else
    f = bits == 4 ? (pf == 1 ? launch_tc<4, 1, false, T> : pf == 2 ? launch_tc<4, 2, false, T> : nullptr)
      : bits == 5 ? (pf == 1 ? launch_tc<5, 1, false, T> : pf == 2 ? launch_tc<5, 2, false, T> : nullptr)
      : nullptr;
  if (f) return f(tiles, codebook, xp, xs, y, n, R, n_blocks, warps, ws, stream);
  return (int)cudaErrorInvalidValue;
}

// hlwq_gemv_tc_rot and its plan (below), the arguments checked once.
static int gemv_tc_rot(const uint8_t* tiles, const float* codebook, const void* x, const float* signs,
                       const float* inv_smooth, void* y, float* ws, int R, int K, int bits, int launch, int dtype,
                       int pre, const PreArgs& pa, cudaStream_t stream, StreamPlan* plan_only) {
  const int warps = launch & 255, pf = (launch >> 8) & 15;
  const bool streamed = (launch >> 16) & 1, pdl = (launch >> 17) & 1, trigger = (launch >> 18) & 1;
  const int n_blocks = K / B, cluster = (launch >> 20) & 15;
  const bool parts = (launch >> 24) & 1;
  if (cluster != 0 && cluster != 1 && cluster != 2 && cluster != 4 && cluster != 8) return (int)cudaErrorInvalidValue;
  if (!streamed || pf != 6 || warps < 4 || warps > 32 || (bits != 4 && bits != 5) || dtype == 0)
    return (int)cudaErrorInvalidValue;  // a float32 input is split in two planes: rotate_pairs + the tile kernel
  if (pre < 0 || pre > 2 || (pre == 2 && n_blocks > 2 * warps)) return (int)cudaErrorInvalidValue;
  using Launch = int (*)(const uint8_t*, const float*, const void*, const float*, const void*, const float*,
                         const float*, bool, const PreArgs&, void*, int, int, int, int, float*, bool, int, bool,
                         cudaStream_t, StreamPlan*);
  static const Launch table[3][2][2] = {  // [pre][dtype bf16, fp16][bits 4, 5]
      {{launch_stream2<4, 2, true, 0, __nv_bfloat16>, launch_stream2<5, 2, true, 0, __nv_bfloat16>},
       {launch_stream2<4, 2, true, 0, __half>, launch_stream2<5, 2, true, 0, __half>}},
      {{launch_stream2<4, 2, true, PRE_GLU, __nv_bfloat16>, launch_stream2<5, 2, true, PRE_GLU, __nv_bfloat16>},
       {launch_stream2<4, 2, true, PRE_GLU, __half>, launch_stream2<5, 2, true, PRE_GLU, __half>}},
      {{launch_stream2<4, 2, true, PRE_NORM2, __nv_bfloat16>, launch_stream2<5, 2, true, PRE_NORM2, __nv_bfloat16>},
       {launch_stream2<4, 2, true, PRE_NORM2, __half>, launch_stream2<5, 2, true, PRE_NORM2, __half>}}};
  return table[pre][dtype == 1 ? 0 : 1][bits == 4 ? 0 : 1](tiles, codebook, nullptr, nullptr, x, signs, inv_smooth,
                                                           trigger, pa, y, 1, R, n_blocks, warps, ws, pdl,
                                                           pre == PRE_NORM2 ? 1 : std::max(cluster, 1), parts,
                                                           stream, plan_only);
}


extern "C" {

// out: fp16 pairs [rows, K/128, 64, 2] (a float32 x: [rows, 2, K/128, 64, 2], hi and lo planes) and xs: float32
// block scales [rows, K/128] (see rotate_pairs_kernel).
int hlwq_rotate_pairs(const void* x, const float* signs, const float* inv_smooth, void* out, float* xs, int rows, int K,
                      int dtype, cudaStream_t stream) {
  const int n_blocks = K / B;
  const int threads = 256;
  const unsigned grid = rotation_grid(rows, n_blocks, threads);
  __half2* o = (__half2*)out;
  if (dtype == 0) rotate_pairs_kernel<float><<<grid, threads, 0, stream>>>((const float*)x, signs, inv_smooth, o, xs, rows, K, n_blocks);
  else if (dtype == 1) rotate_pairs_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>((const __nv_bfloat16*)x, signs, inv_smooth, o, xs, rows, K, n_blocks);
  else rotate_pairs_kernel<__half><<<grid, threads, 0, stream>>>((const __half*)x, signs, inv_smooth, o, xs, rows, K, n_blocks);
  return (int)cudaGetLastError();
}

// y: [n, R] in `dtype`, n in 1..8; tiles: the layout of layout.py; xp: rotate_pairs of the input (with a split
// activation, launch bit 19: each row's hi plane then its lo plane; the tile kernel, float32 y). Stream mode (sm_90+):
// ws float32 [SMs x max resident warps per SM, 2, 128] (scratch), PART_EMPTY on entry and on return; unused
// otherwise.
int hlwq_gemv_tc(const uint8_t* tiles, const float* codebook, const void* xp, const float* xs, void* y, float* ws,
                 int n, int R, int K, int bits, int launch, int dtype, cudaStream_t stream) {
  // launch: warps per CTA (bits 0-7; stream mode up to 32), prefetch depth (bits 8-11), stream mode (bit 16),
  // programmatic launch (bit 17; the lean-issue stream kernel only), split activation (bit 19).
  const int warps = launch & 255, pf = (launch >> 8) & 15;
  const bool streamed = (launch >> 16) & 1, pdl = (launch >> 17) & 1, split = (launch >> 19) & 1;
  if (n < 1 || n > 8 || warps < 4 || warps > (streamed ? 32 : 16) || pf < 1 || pf > (streamed ? 8 : 2))
    return (int)cudaErrorInvalidValue;
  if (streamed && !ws) return (int)cudaErrorInvalidValue;
  const int n_blocks = K / B;
  if (dtype == 0) return tc_bits<float>(bits, tiles, codebook, xp, xs, y, n, R, n_blocks, warps, pf, streamed, pdl,
                                        split, ws, stream);
  if (dtype == 1) return tc_bits<__nv_bfloat16>(bits, tiles, codebook, xp, xs, y, n, R, n_blocks, warps, pf, streamed,
                                                pdl, split, ws, stream);
  return tc_bits<__half>(bits, tiles, codebook, xp, xs, y, n, R, n_blocks, warps, pf, streamed, pdl, split, ws,
                         stream);
}

// One token, rotation inside the matvec: y [1, R] in `dtype` from x [1, K] in `dtype` as it is (signs, inv_smooth: as
// rotate_pairs takes them). `pre` (the kernel's PRE): 1, x is [1, 2K] = [gate | up] and the input gelu_tanh(gate)·up;
// 2, the input is rms_norm(h2)·w2 with h2 = (h + rms_norm(x)·w1)·scale (h [1, K] in `dtype`, w1/w2 float32 [K],
// scale float32 [1] or null), and h_out [1, K] gets h2 (at most 2 blocks per warp). launch: a stream-mode word of
// the lean-issue kernel with 2 slots (prefetch 6: the largest ring that leaves room for the rotated input); bit 18
// lets the kernel's dependents launch once it has read its inputs; bits 20-23, a cluster size (0 or 1: none; 2, 4, 8:
// the CTAs of a cluster share the rotation, each rotating 1/cluster of the blocks; not with pre 2, and none where a
// cluster does not fit); bit 24, the part-major layout where it applies (stream_part_warp; not with pre 2; it takes
// precedence over a cluster size). ws as hlwq_gemv_tc's stream mode.
int hlwq_gemv_tc_rot(const uint8_t* tiles, const float* codebook, const void* x, const float* signs,
                     const float* inv_smooth, void* y, float* ws, int R, int K, int bits, int launch,
                     int dtype, int pre, const void* h, const float* w1, const float* w2, float eps, void* h_out,
                     const float* scale, cudaStream_t stream) {
  const PreArgs pa = {h, w1, w2, eps, h_out, scale};
  if (!ws || (pre == 2 && (!h || !w1 || !w2 || !h_out))) return (int)cudaErrorInvalidValue;
  return gemv_tc_rot(tiles, codebook, x, signs, inv_smooth, y, ws, R, K, bits, launch, dtype, pre, pa, stream,
                     nullptr);
}

// What hlwq_gemv_tc_rot would launch for these arguments, without launching: *grid CTAs in clusters of *cluster (1:
// none), *parts per tile (0: the contiguous layout). For tests and benchmarks, which can then tell a clustered or
// part-major launch from its fallback.
int hlwq_gemv_tc_rot_plan(int R, int K, int bits, int launch, int dtype, int pre, int* grid, int* cluster,
                          int* parts) {
  StreamPlan plan;
  const int rc = gemv_tc_rot(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, R, K, bits, launch, dtype,
                             pre, PreArgs{}, nullptr, &plan);
  *grid = (int)plan.grid;
  *cluster = plan.cluster;
  *parts = plan.parts;
  return rc;
}

// w: [R, K] in the rotated basis, from the tiled layout: float16 (dtype 2) or float32 (dtype 0).
int hlwq_dequant_tiles(const uint8_t* tiles, const float* codebook, void* w, int R, int K, int bits, int dtype,
                       cudaStream_t stream) {
  const int n_blocks = K / B;
  const long units = (long)((R + 15) / 16) * n_blocks;
  const int threads = 256;
  const unsigned grid = (unsigned)((units * 64 + threads - 1) / threads);
  if ((bits != 4 && bits != 5) || (dtype != 0 && dtype != 2)) return (int)cudaErrorInvalidValue;
  if (dtype == 0) {
    float* o = (float*)w;
    if (bits == 4) dequant_tiles_kernel<4, float><<<grid, threads, 0, stream>>>(tiles, codebook, o, R, n_blocks, units);
    else dequant_tiles_kernel<5, float><<<grid, threads, 0, stream>>>(tiles, codebook, o, R, n_blocks, units);
  } else {
    __half* o = (__half*)w;
    if (bits == 4) dequant_tiles_kernel<4, __half><<<grid, threads, 0, stream>>>(tiles, codebook, o, R, n_blocks, units);
    else dequant_tiles_kernel<5, __half><<<grid, threads, 0, stream>>>(tiles, codebook, o, R, n_blocks, units);
  }
  return (int)cudaGetLastError();
}

}  // extern "C"
