// Grouped GEMM kernels: rows [offsets[e], offsets[e+1]) of x times w[e]^T for every expert e, optionally
// with the SwiGLU epilogue of the gate_up product and a per-row output scale. Instantiated per dtype by
// csrc/cuda/grouped_gemm_{bf16,fp16,fp32}.cu.
//
// Tile schedule, built on the device (no host sync, CUDA-graph safe): the grid is static, one block per
// (m-slot, n-tile), with an upper bound of m-slots that holds for any split of the M rows,
//     sum_e ceil(rows_e / BM) <= min(M, floor((M + E * (BM - 1)) / BM)).
// Block (slot, n) finds the expert whose m-tiles cover `slot` with one warp-wide scan of the per-expert
// tile counts (find_tile) and exits when slot is past the last tile. n-tiles vary fastest in the block
// order, so the blocks resident at one time share their A rows and their expert's weights through L2.
//
// Tensor-core kernel (bf16/fp16, K a multiple of 8 elements, 16-byte aligned bases), CUTLASS-like:
//   - BM x BN x 64 tiles, STAGES-deep cp.async pipeline (zero-filling rows past the expert's last row and
//     columns past K), shared-memory rows of 128 bytes whose eight 16-byte chunks are XOR-swizzled by the
//     row index, so both the cp.async stores and the ldmatrix loads are free of bank conflicts;
//   - warps of WM x WN, ldmatrix.x4 fragments, mma.sync.m16n8k16 with fp32 accumulators;
//   - SwiGLU: the block's BN weight rows are BN/2 gate rows and the matching BN/2 up rows, and each warp's
//     n-tiles are half gate, half up, for the same output columns: gate and up of one output land in the
//     same thread's registers and silu(gate) * up is computed there before the only store.
// SIMT kernel: fp32 inputs (fp32 FMAs, as exact as a plain fp32 matmul), and the fallback for rows that
// the tensor-core loader cannot move 16 bytes at a time.
//
// On Hopper the many-rows case runs the wgmma kernel of csrc/cuda/grouped_gemm_sm90.cu instead (built
// with the 9.0a target, setup.py's default): 1.00x / 1.06x the torch._grouped_mm pipeline's time at T = 4096
// / 16384 on an H100 where the mma.sync big tile below takes 1.79x / 1.97x (bench/results/cuda_h100_wgmma.txt).
// The mma.sync tiles stay for Ampere, for builds without 9.0a and for decode (the skinny tile streams
// the weights within 1.05-1.2x of the copy floor).
// History of the mma.sync big tile (bench/results/cuda_h100*.txt): 300-340 TFLOP/s, 1.6-1.75x the
// _grouped_mm pipeline. Tried, not kept: warp-uniform skip masks per m16 / n8 sub-tile inside the k loop
// (branches between the HMMAs, 1.7x slower); 4 stages, register double-buffering, whole-warp skipping
// and a 128 x 128 tile of two blocks per SM (the variants "big4", "big4d" and "sq", within noise of
// "big"; removed, git history and bench/results keep them); cp.async copies interleaved between the
// k-steps' MMAs (spilled at the 255-register cap).
#pragma once

#include <cstdlib>
#include <cstring>

#include "common.cuh"

namespace moge {
namespace cuda {
namespace gemm {

struct Params {
  const void* x;                  // [M, Kd]
  const void* w;                  // [E, N_w, Kd]
  const int32_t* expert_offsets;  // [E+1]
  const float* row_scale;         // [M] or nullptr
  void* y;                        // [M, N_out]
  int64_t Kd, N_w, N_out;
  int M, E;
  int n_tiles;                    // blocks along N; block b is (slot = b / n_tiles, n = b % n_tiles)
};

struct Tile {
  int expert, row0, row1;         // expert < 0: no tile for this slot
};

// Rows [lo, hi) of expert e (none for e >= E), clamped so that bad offsets never leave [0, M).
__device__ __forceinline__ void expert_rows(const Params& p, int e, int& lo, int& hi) {
  lo = hi = 0;
  if (e < p.E) {
    lo = min(max(p.expert_offsets[e], 0), p.M);
    hi = min(max(p.expert_offsets[e + 1], lo), p.M);
  }
}

// Which expert and rows m-slot `slot` covers, for tiles of BM rows, found by one warp (all 32 lanes call
// it; the result is in every lane): a scan of the per-expert tile counts, 32 experts at a time.
template <int BM>
__device__ __forceinline__ Tile find_tile_warp(const Params& p, int slot) {
  const int lane = threadIdx.x & 31;
  Tile tile{-1, 0, 0};
  int carry = 0;                                     // tiles of the experts before e0
  for (int e0 = 0; e0 < p.E && carry <= slot; e0 += 32) {
    const int e = e0 + lane;
    int lo, hi;
    expert_rows(p, e, lo, hi);
    const int n = (hi - lo + BM - 1) / BM;
    const int inclusive = warp_inclusive_scan(n);
    const int first = carry + inclusive - n;
    const unsigned owner = __ballot_sync(kFullMask, slot >= first && slot < first + n);
    if (owner != 0) {
      const int src = __ffs(owner) - 1;
      const int row0 = lo + (slot - first) * BM;
      tile.expert = __shfl_sync(kFullMask, e, src);
      tile.row0 = __shfl_sync(kFullMask, row0, src);
      tile.row1 = __shfl_sync(kFullMask, min(hi, row0 + BM), src);
    }
    carry += __shfl_sync(kFullMask, inclusive, 31);
  }
  return tile;
}

// The same for a whole block: warp 0 finds it and shares it through shared memory (all threads call it;
// it holds a barrier).
template <int BM>
__device__ __forceinline__ Tile find_tile(const Params& p, int slot, int* tile_smem) {
  if (threadIdx.x < 32) {
    const Tile tile = find_tile_warp<BM>(p, slot);
    if (threadIdx.x == 0) {
      tile_smem[0] = tile.expert;
      tile_smem[1] = tile.row0;
      tile_smem[2] = tile.row1;
    }
  }
  __syncthreads();
  return Tile{tile_smem[0], tile_smem[1], tile_smem[2]};
}

inline int64_t max_slots(int64_t M, int E, int BM) {
  const int64_t bound = (M + static_cast<int64_t>(E) * (BM - 1)) / BM;
  return bound < M ? bound : M;
}

// ============================================================================ tensor-core kernel
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct TcConfig {
  static constexpr int BM = BM_, BN = BN_, BK = 64;   // BK: one 128-byte swizzled row per k-tile
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / 16, NT = WN / 8;      // m16 / n8 mma tiles per warp
  static constexpr int ROW_BYTES = BK * 2;             // 128
  static constexpr int ROWS_PER_PASS = THREADS / 8;    // rows one pass of 16-byte chunks covers
  static constexpr int A_PASSES = BM / ROWS_PER_PASS, B_PASSES = BN / ROWS_PER_PASS;
  static constexpr int STAGE_BYTES = (BM + BN) * ROW_BYTES;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be whole mma tiles");
  static_assert(NT % 4 == 0, "n-tiles go in ldmatrix pairs, half gate and half up for SwiGLU");
  static_assert(ROWS_PER_PASS % 8 == 0, "the swizzle of a thread's rows must not change between passes");
  static_assert(BM % ROWS_PER_PASS == 0 && (BN / 2) % ROWS_PER_PASS == 0, "whole loader passes");
};

// Many rows per expert (prefill): 128 x 256 tiles, 8 warps of 64 x 64, 3 stages (144 KB), one block
// per SM; the 64 x 64 warp tile gives 32 mma per 8 ldmatrix.x4.
using BigTile = TcConfig<128, 256, 2, 4, 3, 1>;
// Few rows per expert (decode): the weights are streamed once, so a short BM wastes no bandwidth; 4
// stages of 20 KB keep 48 KB of weights in flight per block and two blocks fit on an SM.
using SkinnyTile = TcConfig<32, 128, 1, 4, 4, 2>;

// First shared-memory row of n-tile j of warp column wn. SwiGLU: tiles [0, NT/2) are gate rows and
// [NT/2, NT) the up rows of the same output columns (the up half starts at BN/2).
template <class C, bool SWIGLU>
__device__ __forceinline__ int ntile_row(int j, int wn) {
  if (SWIGLU) {
    return j < C::NT / 2 ? wn * (C::WN / 2) + j * 8 : C::BN / 2 + wn * (C::WN / 2) + (j - C::NT / 2) * 8;
  }
  return wn * C::WN + j * 8;
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

template <typename T, class C, bool SWIGLU>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS) tc_kernel(const Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int tile_smem[3];
  const int slot = static_cast<int>(blockIdx.x / p.n_tiles);
  const int n_tile = static_cast<int>(blockIdx.x % p.n_tiles);
  const Tile tile = find_tile<C::BM>(p, slot, tile_smem);
  if (tile.expert < 0) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
  const int rows = tile.row1 - tile.row0;
  const int64_t Kd = p.Kd;
  const int64_t I = p.N_w / 2;                                  // SwiGLU only
  const int64_t n0 = static_cast<int64_t>(n_tile) * (SWIGLU ? C::BN / 2 : C::BN);
  const T* x_tile = static_cast<const T*>(p.x) + static_cast<int64_t>(tile.row0) * Kd;
  const T* w_expert = static_cast<const T*>(p.w) + static_cast<int64_t>(tile.expert) * p.N_w * Kd;

  // ---- loader: thread copies chunk c (16 bytes = 8 elements) of rows r0 + i * ROWS_PER_PASS.
  const int c = tid & 7, r0 = tid >> 3;
  const uint32_t swizzled = static_cast<uint32_t>(r0 * C::ROW_BYTES + ((c ^ (r0 & 7)) << 4));
  const T* a_src = x_tile + static_cast<int64_t>(r0) * Kd + c * 8;
  uint32_t a_ok = 0;                                             // bit i: row r0 + i*RPP is the expert's
#pragma unroll
  for (int i = 0; i < C::A_PASSES; ++i) a_ok |= (r0 + i * C::ROWS_PER_PASS < rows ? 1u : 0u) << i;
  // B rows: plain, weight row n0 + r; SwiGLU, the block's rows [0, BN/2) are gate rows n0 + r and
  // [BN/2, BN) the up rows I + n0 + r - BN/2.
  constexpr int B_HALF = C::B_PASSES / 2;
  const T* b_src = w_expert + (n0 + r0) * Kd + c * 8;
  const T* b_src_up = b_src + I * Kd;
  uint32_t b_ok = 0;
#pragma unroll
  for (int i = 0; i < C::B_PASSES; ++i) {
    const int64_t local = r0 + (SWIGLU ? i % B_HALF : i) * C::ROWS_PER_PASS;
    b_ok |= (n0 + local < (SWIGLU ? I : p.N_w) ? 1u : 0u) << i;
  }
  const uint32_t smem_base = smem_u32(smem);

  auto load_stage = [&](int stage, int kt) {
    const int64_t k0 = static_cast<int64_t>(kt) * C::BK;
    const bool k_ok = k0 + c * 8 < Kd;                          // Kd % 8 == 0: a chunk is all in or out
    const uint32_t a_dst = smem_base + stage * C::STAGE_BYTES + swizzled;
    const uint32_t b_dst = a_dst + C::BM * C::ROW_BYTES;
#pragma unroll
    for (int i = 0; i < C::A_PASSES; ++i) {
      const bool ok = k_ok && ((a_ok >> i) & 1u);
      const T* src = ok ? a_src + static_cast<int64_t>(i * C::ROWS_PER_PASS) * Kd + k0 : static_cast<const T*>(p.x);
      cp_async_16(a_dst + i * C::ROWS_PER_PASS * C::ROW_BYTES, src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < C::B_PASSES; ++i) {
      const bool ok = k_ok && ((b_ok >> i) & 1u);
      const T* row = SWIGLU ? (i < B_HALF ? b_src : b_src_up) + static_cast<int64_t>((i % B_HALF) * C::ROWS_PER_PASS) * Kd
                            : b_src + static_cast<int64_t>(i * C::ROWS_PER_PASS) * Kd;
      const T* src = ok ? row + k0 : static_cast<const T*>(p.w);
      cp_async_16(b_dst + i * C::ROWS_PER_PASS * C::ROW_BYTES, src, ok ? 16 : 0);
    }
  };

  float acc[C::MT][C::NT][4];
#pragma unroll
  for (int mi = 0; mi < C::MT; ++mi)
#pragma unroll
    for (int nj = 0; nj < C::NT; ++nj)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][nj][q] = 0.f;

  // Fragments of k-step ks: A as MT ldmatrix.x4, B as NT/2 ldmatrix.x4 (two n8 tiles each).
  auto load_frags = [&](uint32_t a_base, uint32_t b_base, int ks, uint32_t (&a_frag)[C::MT][4],
                        uint32_t (&b_frag)[C::NT][2]) {
#pragma unroll
    for (int mi = 0; mi < C::MT; ++mi) {
      // matrices: rows 0-7 / 8-15 of the m16 tile at k 0-7, then the same rows at k 8-15
      const int row = wm * C::WM + mi * 16 + (lane & 15);
      const int chunk = ks * 2 + (lane >> 4);
      ldmatrix_x4(a_frag[mi], a_base + row * C::ROW_BYTES + ((chunk ^ (row & 7)) << 4));
    }
#pragma unroll
    for (int pr = 0; pr < C::NT / 2; ++pr) {
      // matrices: n-tile 2pr at k 0-7, k 8-15, then n-tile 2pr+1 at k 0-7, k 8-15
      const int row = ntile_row<C, SWIGLU>(2 * pr, wn) + (lane & 7) + ((lane >> 4) << 3);
      const int chunk = ks * 2 + ((lane >> 3) & 1);
      uint32_t r[4];
      ldmatrix_x4(r, b_base + row * C::ROW_BYTES + ((chunk ^ (row & 7)) << 4));
      b_frag[2 * pr][0] = r[0];
      b_frag[2 * pr][1] = r[1];
      b_frag[2 * pr + 1][0] = r[2];
      b_frag[2 * pr + 1][1] = r[3];
    }
  };
  auto mma_all = [&](const uint32_t (&a_frag)[C::MT][4], const uint32_t (&b_frag)[C::NT][2]) {
#pragma unroll
    for (int mi = 0; mi < C::MT; ++mi)
#pragma unroll
      for (int nj = 0; nj < C::NT; ++nj) mma_16816<T>(acc[mi][nj], a_frag[mi], b_frag[nj]);
  };

  auto compute_stage = [&](int stage) {
    const uint32_t a_base = smem_base + stage * C::STAGE_BYTES;
    const uint32_t b_base = a_base + C::BM * C::ROW_BYTES;
#pragma unroll
    for (int ks = 0; ks < C::BK / 16; ++ks) {
      uint32_t a_frag[C::MT][4];
      uint32_t b_frag[C::NT][2];
      load_frags(a_base, b_base, ks, a_frag, b_frag);
      mma_all(a_frag, b_frag);
    }
  };

  // ---- pipeline: k-tile kt lives in stage kt % STAGES; STAGES-1 tiles are in flight ahead of the math.
  const int k_tiles = static_cast<int>(ceil_div(Kd, C::BK));
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();   // k-tile kt has landed (for this thread) ...
    __syncthreads();                  // ... for every thread, and stage (kt-1) % STAGES is free again
    const int next = kt + C::STAGES - 1;
    if (next < k_tiles) load_stage(next % C::STAGES, next);
    cp_async_commit();
    compute_stage(kt % C::STAGES);
  }
  cp_async_wait<0>();

  // ---- epilogue: accumulator q of tile (mi, nj) is row (lane/4) + 8*(q/2), column 2*(lane%4) + q%2.
  T* y = static_cast<T*>(p.y);
  const bool pairs = (p.N_out % 2) == 0;                        // 4-byte stores stay aligned
  const int col_in_tile = 2 * (lane & 3);
#pragma unroll
  for (int mi = 0; mi < C::MT; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wm * C::WM + mi * 16 + (lane >> 2) + 8 * h;
      if (r >= rows) continue;
      const int64_t grow = static_cast<int64_t>(tile.row0) + r;
      T* y_row = y + grow * p.N_out;
      const float scale = (!SWIGLU && p.row_scale != nullptr) ? p.row_scale[grow] : 1.f;
#pragma unroll
      for (int nj = 0; nj < (SWIGLU ? C::NT / 2 : C::NT); ++nj) {
        float v0, v1;
        if (SWIGLU) {
          v0 = silu(acc[mi][nj][2 * h]) * acc[mi][nj + C::NT / 2][2 * h];
          v1 = silu(acc[mi][nj][2 * h + 1]) * acc[mi][nj + C::NT / 2][2 * h + 1];
        } else {
          v0 = acc[mi][nj][2 * h] * scale;
          v1 = acc[mi][nj][2 * h + 1] * scale;
        }
        const int64_t col = n0 + ntile_row<C, SWIGLU>(nj, wn) + col_in_tile;
        if (pairs && col + 1 < p.N_out) {
          store_pair(y_row + col, v0, v1);
        } else {
          if (col < p.N_out) y_row[col] = from_float<T>(v0);
          if (col + 1 < p.N_out) y_row[col + 1] = from_float<T>(v1);
        }
      }
    }
  }
}

template <typename T, class C, bool SWIGLU>
cudaError_t launch_tc(const Params& base, cudaStream_t stream) {
  static uint64_t configured_devices = 0;
  Params p = base;
  const int64_t n_out_per_tile = SWIGLU ? C::BN / 2 : C::BN;
  const int64_t n_tiles = ceil_div(p.N_out, n_out_per_tile);
  const int64_t blocks = n_tiles * max_slots(p.M, p.E, C::BM);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  p.n_tiles = static_cast<int>(n_tiles);
  cudaError_t err = allow_dynamic_smem(tc_kernel<T, C, SWIGLU>, C::SMEM_BYTES, configured_devices);
  if (err != cudaSuccess) return err;
  tc_kernel<T, C, SWIGLU><<<static_cast<unsigned>(blocks), C::THREADS, C::SMEM_BYTES, stream>>>(p);
  return cudaGetLastError();
}

// ============================================================================ SIMT kernel
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;

// 16 x 16 threads, 4 rows x 4 columns each. Thread column tx owns shared-memory columns 2tx, 2tx+1,
// 32+2tx, 33+2tx: for SwiGLU the first two are gate rows and the last two the up rows of the same output
// columns n0 + 2tx, n0 + 2tx + 1.
template <typename T, bool SWIGLU>
__global__ void __launch_bounds__(kSimtThreads) simt_kernel(const Params p) {
  __shared__ float a_s[kSimtBK][kSimtBM + 4];
  __shared__ float b_s[kSimtBK][kSimtBN + 4];
  __shared__ int tile_smem[3];
  const int slot = static_cast<int>(blockIdx.x / p.n_tiles);
  const int n_tile = static_cast<int>(blockIdx.x % p.n_tiles);
  const Tile tile = find_tile<kSimtBM>(p, slot, tile_smem);
  if (tile.expert < 0) return;

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int rows = tile.row1 - tile.row0;
  const int64_t Kd = p.Kd, I = p.N_w / 2;
  const int64_t n0 = static_cast<int64_t>(n_tile) * (SWIGLU ? kSimtBN / 2 : kSimtBN);
  const T* x_tile = static_cast<const T*>(p.x) + static_cast<int64_t>(tile.row0) * Kd;
  const T* w_expert = static_cast<const T*>(p.w) + static_cast<int64_t>(tile.expert) * p.N_w * Kd;

  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < Kd; k0 += kSimtBK) {
    for (int i = threadIdx.x; i < kSimtBM * kSimtBK; i += kSimtThreads) {
      const int r = i / kSimtBK, kk = i % kSimtBK;
      a_s[kk][r] = (r < rows && k0 + kk < Kd) ? to_float(x_tile[static_cast<int64_t>(r) * Kd + k0 + kk]) : 0.f;
    }
    for (int i = threadIdx.x; i < kSimtBN * kSimtBK; i += kSimtThreads) {
      const int cc = i / kSimtBK, kk = i % kSimtBK;
      int64_t wrow;
      bool ok;
      if (SWIGLU) {
        const int64_t local = n0 + (cc % (kSimtBN / 2));
        wrow = (cc < kSimtBN / 2 ? 0 : I) + local;
        ok = local < I;
      } else {
        wrow = n0 + cc;
        ok = wrow < p.N_w;
      }
      b_s[kk][cc] = (ok && k0 + kk < Kd) ? to_float(w_expert[wrow * Kd + k0 + kk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = a_s[kk][ty * 4 + i];
      b[0] = b_s[kk][2 * tx];
      b[1] = b_s[kk][2 * tx + 1];
      b[2] = b_s[kk][32 + 2 * tx];
      b[3] = b_s[kk][33 + 2 * tx];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    if (r >= rows) continue;
    const int64_t grow = static_cast<int64_t>(tile.row0) + r;
    T* y_row = y + grow * p.N_out;
    if (SWIGLU) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t col = n0 + 2 * tx + j;
        if (col < p.N_out) y_row[col] = from_float<T>(silu(acc[i][j]) * acc[i][j + 2]);
      }
    } else {
      const float scale = p.row_scale != nullptr ? p.row_scale[grow] : 1.f;
      const int64_t cols[4] = {n0 + 2 * tx, n0 + 2 * tx + 1, n0 + 32 + 2 * tx, n0 + 33 + 2 * tx};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (cols[j] < p.N_out) y_row[cols[j]] = from_float<T>(acc[i][j] * scale);
      }
    }
  }
}

template <typename T, bool SWIGLU>
cudaError_t launch_simt(const Params& base, cudaStream_t stream) {
  Params p = base;
  const int64_t n_tiles = ceil_div(p.N_out, SWIGLU ? kSimtBN / 2 : kSimtBN);
  const int64_t blocks = n_tiles * max_slots(p.M, p.E, kSimtBM);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  p.n_tiles = static_cast<int>(n_tiles);
  simt_kernel<T, SWIGLU><<<static_cast<unsigned>(blocks), kSimtThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ============================================================================ per-dtype entry
inline Params make_params(const GemmArgs& a) {
  Params p;
  p.x = a.x;
  p.w = a.w;
  p.expert_offsets = a.expert_offsets;
  p.row_scale = a.row_scale;
  p.y = a.y;
  p.Kd = a.Kd;
  p.N_w = a.N_w;
  p.N_out = a.swiglu ? a.N_w / 2 : a.N_w;
  p.M = static_cast<int>(a.M);
  p.E = a.E;
  p.n_tiles = 1;
  return p;
}

template <typename T>
cudaError_t launch_simt_any(const GemmArgs& a, cudaStream_t stream) {
  const Params p = make_params(a);
  return a.swiglu ? launch_simt<T, true>(p, stream) : launch_simt<T, false>(p, stream);
}

// Rows per expert on average decide the tile: below kSkinnyRows the skinny tile (weights streamed once
// per expert, the mma work is free); above, the big tile (the math dominates).
constexpr int64_t kSkinnyRows = 64;

template <typename T>
cudaError_t launch_tensor_core(const GemmArgs& a, cudaStream_t stream) {
  const bool aligned = a.Kd % 8 == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.w) % 16 == 0;
  if (!aligned || device_cc_major() < 8) return launch_simt_any<T>(a, stream);
  const Params p = make_params(a);
  if (a.M < kSkinnyRows * a.E) {
    return a.swiglu ? launch_tc<T, SkinnyTile, true>(p, stream) : launch_tc<T, SkinnyTile, false>(p, stream);
  }
  // kernels.h: the wgmma kernel where it runs unless the option asks for the mma.sync big tile
  if (gemm_tile_choice().variant == BigVariant::kAuto) {
    const cudaError_t err = launch_grouped_gemm_sm90(a, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  return a.swiglu ? launch_tc<T, BigTile, true>(p, stream) : launch_tc<T, BigTile, false>(p, stream);
}

}  // namespace gemm
}  // namespace cuda
}  // namespace moge
