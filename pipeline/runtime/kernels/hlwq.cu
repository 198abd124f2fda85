// HLWQ native kernels: the activation rotation, a batch 1-4 matvec straight from FORMAT v1's packed codes, and a
// dequantize-to-rotated-basis kernel for the tensor-core prefill path. Plain C ABI (no torch headers): the library is
// built with nvcc in seconds and called through ctypes on the caller's stream, so it is captured by CUDA graphs.
//
// The math: W·x = Σ_b s_b/√B · L[c_b] · (H·D·x)_b, so the codes are never un-rotated; the activation is rotated once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

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

// ---- rotation: out[n, k] = (H·D·(x ⊙ inv_smooth))[n, k] per 128-block, float32 -----------------------------------
// One warp per (row, block); lane l holds elements 4l..4l+3: strides 1 and 2 inside the lane, 4..64 by shuffles.
template <typename T>
__global__ void rotate_kernel(const T* __restrict__ x, const float* __restrict__ signs,
                              const float* __restrict__ inv_smooth, float* __restrict__ out, int rows, int K, int n_blocks) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int row = warp / n_blocks, blk = warp % n_blocks;
  if (row >= rows) return;
  const size_t base = (size_t)row * K + (size_t)blk * B + lane * 4;
  float v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float s = signs[lane * 4 + i];
    if (inv_smooth) s *= inv_smooth[blk * B + lane * 4 + i];
    v[i] = to_f32<T>(x[base + i]) * s;
  }
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

// ---- C ABI ----------------------------------------------------------------------------------------------------------
// dtype codes: 0 = float32, 1 = bfloat16, 2 = float16. Every entry returns the launch's cudaError_t (0 = success).
extern "C" {

int hlwq_rotate(const void* x, const float* signs, const float* inv_smooth, float* out, int rows, int K, int dtype,
                cudaStream_t stream) {
  const int n_blocks = K / B;
  const long warps = (long)rows * n_blocks;
  const int threads = 256;
  const unsigned grid = (unsigned)((warps * 32 + threads - 1) / threads);
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
  if (!resident[ks]) {
    int per_sm = 0, dev = 0, sms = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_kernel<BITS, ROWS, N, T>, threads, 0);
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    resident[ks] = per_sm * sms > 0 ? per_sm * sms : 1;
  }
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
