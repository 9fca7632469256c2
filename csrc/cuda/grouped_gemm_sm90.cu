// Hopper grouped GEMM (sm_90a): the big-tile path of grouped_gemm / grouped_mlp on an H100 / H200.
//
// Same contract as the mma.sync kernel of csrc/cuda/grouped_gemm.cuh (a static grid, the tile of each block
// found on the device from expert_offsets, no host sync), but the math is Hopper's:
//   - operands move through the tensor-memory accelerator (TMA): one 2-D tensor map over x [M, K] and one
//     over the weights seen as [E * N_w, K], boxes of 64 k-elements (128 bytes, swizzled 128B) by 128 rows
//     of x / BN rows of w. Rows past M or past the weights are zero-filled by the TMA; rows of the next
//     expert inside a tile are multiplied but never stored. No row padding exists in memory.
//   - warp specialisation: warpgroup 0 is the producer (one thread issues the TMA loads of a STAGES-deep
//     ring, completion tracked by mbarriers), warpgroups 1 and 2 are consumers of 64 rows each, issuing
//     wgmma.m64nBNk16 straight from shared memory, fp32 accumulators in registers (setmaxnreg moves the
//     register budget from the producer to the consumers);
//   - the (row tile, n-tile) blocks in gemm::find_tile's order, one CTA each; a CTA walks blockIdx.x,
//     + gridDim.x, ... until the schedule ends, with the ring of stages running on across its tiles.
//     Tried and removed (git history and bench/results keep them): a persistent grid of one CTA per SM
//     (H100, down GEMM of T=4096: 1.23 ms against 0.95 for one CTA per block, whose hardware dispatch
//     keeps the resident blocks on neighbouring tiles that share x rows and weights in L2), and clusters
//     of two CTAs multicasting a shared weight tile (bench/results/cuda_h100_wgmma.txt: ties at T=4096,
//     4% less time at T=16384, 4% more at T=1024);
//   - a consumer whose 64 rows are all past the expert's last row skips its wgmmas;
//   - SwiGLU: the B tile is BN/2 gate rows then the BN/2 up rows of the same output columns, so gate
//     column c and up column c + BN/2 land in the same thread (accumulator j and j + BN/4) and only
//     silu(gate) * up is stored. BN = 192 for I = 1344 (14 x 96: no idle columns), else 256.
// Why not CUTLASS: the package builds from torch's headers and the toolkit alone (no submodule, no
// download), and this file is the whole kernel.
#include <cuda.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "grouped_gemm.cuh"
#include "wgmma.cuh"

namespace moge {
namespace cuda {
namespace sm90 {

constexpr int BM = 128;                    // two consumer warpgroups of 64 rows
constexpr int BK = 64;                     // 64 x 2 bytes = one 128-byte swizzle row
constexpr int THREADS = 384;               // producer + 2 consumer warpgroups
constexpr int SMEM_BUDGET = 220 * 1024;    // of Hopper's 227 KB per block, leaving room for alignment

template <int BN>
struct TileShape {
  static constexpr int A_BYTES = BM * BK * 2;
  static constexpr int B_BYTES = BN * BK * 2;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  // BN = 256: 4 stages (192 KB); BN = 192: 5 stages (200 KB): as deep as shared memory allows, since
  // one block per SM must hide the whole HBM / L2 latency on its own.
  static constexpr int STAGES = SMEM_BUDGET / STAGE_BYTES < 6 ? SMEM_BUDGET / STAGE_BYTES : 6;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;   // + slack to align the ring to 1 KB
  static constexpr int ACC = BN / 2;                               // fp32 accumulators per thread
  static_assert(A_BYTES % 1024 == 0 && (BN / 2 * BK * 2) % 1024 == 0, "swizzle atoms are 1 KB");
};

// ----------------------------------------------------------------------------- PTX wrappers (sm_90a)
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if MOGE_WGMMA_ENABLED
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
#endif
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
#if MOGE_WGMMA_ENABLED
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if MOGE_WGMMA_ENABLED
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}

// Spins until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if MOGE_WGMMA_ENABLED
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
#endif
}

// One TMA box (coordinates: element k, row) into shared memory, completing `bytes` on barrier `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int k, int row) {
#if MOGE_WGMMA_ENABLED
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(k), "r"(row)
      : "memory");
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if MOGE_WGMMA_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if MOGE_WGMMA_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if MOGE_WGMMA_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving reads of the accumulators above the wgmma wait.
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Matrix descriptor of a K-major tile in 128B-swizzled shared memory: 8-row core groups 1024 bytes
// apart (stride byte offset), leading byte offset unused for this layout (1), layout type 1 = 128B.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// ----------------------------------------------------------------------------- tile schedule
// What one block works on: rows [row0, row1) of `expert` (expert < 0: nothing), output n-tile `n_tile`.
struct Work {
  int expert, row0, row1, n_tile;
};

// Stage and phase of the ring position `it` (k-steps counted over all the tiles of a CTA).
template <class S>
struct Ring {
  uint32_t base;                                     // 1 KB aligned
  uint64_t* full;                                    // [STAGES] TMA bytes of the stage have landed
  uint64_t* empty;                                   // [STAGES] the consumers are done with the stage
  __device__ __forceinline__ int stage(int it) const { return it % S::STAGES; }
  __device__ __forceinline__ uint32_t parity(int it) const { return (it / S::STAGES) & 1; }
  __device__ __forceinline__ uint32_t a(int it) const { return base + stage(it) * S::STAGE_BYTES; }
  __device__ __forceinline__ uint32_t b(int it) const { return a(it) + S::A_BYTES; }
};

// Producer (one thread): the TMA loads of one tile's k-steps, ring positions [it0, it0 + k_tiles). The
// weight tile is two boxes of BN/2 rows: gate and up rows (SwiGLU) or the two halves.
template <class S, int BN, bool SWIGLU>
__device__ __forceinline__ void produce_tile(const CUtensorMap* x_map, const CUtensorMap* w_map,
                                             const gemm::Params& p, const Ring<S>& ring, const Work& work,
                                             int it0, int k_tiles) {
  const int64_t n0 = static_cast<int64_t>(work.n_tile) * (SWIGLU ? BN / 2 : BN);
  // weight rows are < E * N_w <= INT32_MAX (checked by the launcher)
  const int w_row = static_cast<int>(work.expert * p.N_w + n0);
  const int w_row2 = static_cast<int>(SWIGLU ? w_row + p.N_w / 2 : w_row + BN / 2);
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int it = it0 + kt;
    mbar_wait(smem_u32(&ring.empty[ring.stage(it)]), ring.parity(it) ^ 1);
    const uint32_t bar = smem_u32(&ring.full[ring.stage(it)]);
    // out-of-bounds box parts count too (zero-filled)
    mbar_expect_tx(bar, S::STAGE_BYTES);
    tma_load_2d(ring.a(it), x_map, bar, kt * BK, work.row0);
    tma_load_2d(ring.b(it), w_map, bar, kt * BK, w_row);
    tma_load_2d(ring.b(it) + (BN / 2) * BK * 2, w_map, bar, kt * BK, w_row2);
  }
}

// Consumer warpgroup `consumer` (rows [64 c, 64 c + 64) of the tile): acc = its rows times the weight
// tile over ring positions [it0, it0 + k_tiles); every position is handed back to the producer (the
// last one after the final wait), so the ring runs on into the CTA's next tile.
template <class S, typename T, int BN>
__device__ __forceinline__ void consume_tile(float (&acc)[S::ACC], const Ring<S>& ring, int it0, int k_tiles,
                                             int consumer, bool active) {
  const bool signals = (threadIdx.x % 128) == 0;     // one arrival per consumer warpgroup
  auto release = [&](int it) {
    if (!signals) return;
    mbar_arrive(smem_u32(&ring.empty[ring.stage(it)]));
  };
#pragma unroll
  for (int i = 0; i < S::ACC; ++i) acc[i] = 0.f;
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int it = it0 + kt;
    mbar_wait(smem_u32(&ring.full[ring.stage(it)]), ring.parity(it));
    if (active) {
      const uint32_t a_tile = ring.a(it) + consumer * 64 * BK * 2;
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < BK / 16; ++k) {
        // a k16 step is 32 bytes further along the (swizzled) 128-byte rows
        Wgmma<T, BN>::mma(acc, smem_desc(a_tile + 32 * k), smem_desc(ring.b(it) + 32 * k));
      }
      wgmma_commit();
      wgmma_wait<1>();                               // k-step kt-1's products are done ...
    }
    if (kt > 0) release(it - 1);                     // ... so its stage may be refilled
  }
  wgmma_wait<0>();
  fence_registers(acc);
  if (k_tiles > 0) release(it0 + k_tiles - 1);
}

// Epilogue of consumer warpgroup `consumer`: accumulator j of thread (warp w, lane l) in its warpgroup
// is row 16 w + l / 4 + 8 ((j / 2) % 2), column 8 (j / 4) + 2 (l % 4) + j % 2.
template <class S, typename T, int BN, bool SWIGLU>
__device__ __forceinline__ void store_tile(const float (&acc)[S::ACC], const gemm::Params& p, const Work& work,
                                           int consumer) {
  const int t = threadIdx.x % 128, lane = t % 32;
  const int rows = work.row1 - work.row0;
  const int row_base = consumer * 64 + (t / 32) * 16 + lane / 4;
  const int64_t n0 = static_cast<int64_t>(work.n_tile) * (SWIGLU ? BN / 2 : BN);
  T* y = static_cast<T*>(p.y);
  const bool pairs = (p.N_out % 2) == 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row_base + 8 * h;
    if (r >= rows) continue;
    const int64_t grow = static_cast<int64_t>(work.row0) + r;
    T* y_row = y + grow * p.N_out;
    const float scale = (!SWIGLU && p.row_scale != nullptr) ? p.row_scale[grow] : 1.f;
#pragma unroll
    for (int g = 0; g < (SWIGLU ? BN / 16 : BN / 8); ++g) {
      const int j = 4 * g + 2 * h;
      float v0, v1;
      if (SWIGLU) {
        v0 = gemm::silu(acc[j]) * acc[j + BN / 4];
        v1 = gemm::silu(acc[j + 1]) * acc[j + 1 + BN / 4];
      } else {
        v0 = acc[j] * scale;
        v1 = acc[j + 1] * scale;
      }
      const int64_t col = n0 + 8 * g + 2 * (lane % 4);
      if (pairs && col + 1 < p.N_out) {
        store_pair(y_row + col, v0, v1);
      } else {
        if (col < p.N_out) y_row[col] = from_float<T>(v0);
        if (col + 1 < p.N_out) y_row[col + 1] = from_float<T>(v1);
      }
    }
  }
}

// ----------------------------------------------------------------------------- kernel
// A CTA walks the (row tile, n-tile) blocks blockIdx.x, + gridDim.x, ... (gemm::find_tile's order) until
// the schedule ends (one block per CTA: the grid holds every block); the ring of stages runs on across a
// CTA's tiles, so the producer loads the next tile while the consumers store the last one.
template <typename T, int BN, bool SWIGLU>
__global__ void __launch_bounds__(THREADS, 1)
    wgmma_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                 const gemm::Params p) {
#if MOGE_WGMMA_ENABLED
  using S = TileShape<BN>;
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[S::STAGES];
  __shared__ __align__(8) uint64_t empty_bar[S::STAGES];

  const Ring<S> ring{(smem_u32(smem_raw) + 1023u) & ~1023u, full_bar, empty_bar};   // 1 KB: swizzle atoms
  if (threadIdx.x == 0) {
    for (int s = 0; s < S::STAGES; ++s) {
      mbar_init(smem_u32(&full_bar[s]), 1);
      mbar_init(smem_u32(&empty_bar[s]), 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  const int k_tiles = static_cast<int>(ceil_div(p.Kd, BK));
  auto next_work = [&](int block) {
    const gemm::Tile tile = gemm::find_tile_warp<BM>(p, block / p.n_tiles);
    return Work{tile.expert, tile.row0, tile.row1, block % p.n_tiles};
  };
  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x < 32) {                          // warp 0 walks the schedule, lane 0 issues the loads
      if (threadIdx.x == 0) {
        asm volatile("prefetch.tensormap [%0];\nprefetch.tensormap [%1];\n"
                     ::"l"(reinterpret_cast<uint64_t>(&x_map)), "l"(reinterpret_cast<uint64_t>(&w_map)));
      }
      int it = 0;
      for (int block = blockIdx.x;; block += gridDim.x) {
        const Work w = next_work(block);
        if (w.expert < 0) break;
        if (threadIdx.x == 0) produce_tile<S, BN, SWIGLU>(&x_map, &w_map, p, ring, w, it, k_tiles);
        it += k_tiles;
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int consumer = warpgroup - 1;
    float acc[S::ACC];
    int it = 0;
    // The loop ends on the work, not on a `break` after a fixed number of tiles: straight-line code there
    // made ptxas serialize the wgmmas (C7515).
    for (int block = blockIdx.x;; block += gridDim.x) {
      const Work w = next_work(block);
      if (w.expert < 0) break;
      const bool active = consumer * 64 < w.row1 - w.row0;   // a tail tile's empty half skips its wgmmas
      consume_tile<S, T, BN>(acc, ring, it, k_tiles, consumer, active);
      if (active) store_tile<S, T, BN, SWIGLU>(acc, p, w, consumer);
      it += k_tiles;
    }
  }
#endif
}

// ----------------------------------------------------------------------------- host side
#ifdef MOGE_SM90A
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, found through the runtime (no link against libcuda).
inline EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// [rows, Kd] row-major, boxes of box_rows x 64 elements, 128-byte swizzle.
inline bool make_map(CUtensorMap* map, const void* base, DType dtype, int64_t rows, int64_t Kd, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(Kd), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(Kd) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(BK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode_tiled()(map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int BN, bool SWIGLU>
cudaError_t launch(const GemmArgs& a, cudaStream_t stream) {
  using S = TileShape<BN>;
  static uint64_t configured_devices = 0;
  gemm::Params p = gemm::make_params(a);
  const int64_t n_tiles = ceil_div(p.N_out, SWIGLU ? BN / 2 : BN);
  const int64_t slots = gemm::max_slots(p.M, p.E, BM);
  const int64_t blocks = n_tiles * slots;            // one CTA per block
  if (blocks == 0) return cudaSuccess;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  p.n_tiles = static_cast<int>(n_tiles);
  CUtensorMap x_map, w_map;
  if (!make_map(&x_map, a.x, a.dtype, a.M, a.Kd, BM) ||
      !make_map(&w_map, a.w, a.dtype, static_cast<int64_t>(a.E) * a.N_w, a.Kd, BN / 2)) {
    return cudaErrorNotSupported;
  }
  auto kernel = wgmma_kernel<T, BN, SWIGLU>;
  cudaError_t err = allow_dynamic_smem(kernel, S::SMEM_BYTES, configured_devices);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(THREADS);
  config.dynamicSmemBytes = S::SMEM_BYTES;
  config.stream = stream;
  cudaLaunchAttribute cluster;                       // a cluster of one CTA
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 1;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, x_map, w_map, p);
}

// Compute capability of the current device is exactly 9.0 (the sm_90a cubin runs nowhere else).
inline bool device_is_sm90() {
  return device_attribute<cudaDevAttrComputeCapabilityMajor>(0) == 9 &&
         device_attribute<cudaDevAttrComputeCapabilityMinor>(-1) == 0;
}

// cuda_gemm_tile "wgmma[96|128]" (gemm_tile_choice): the SwiGLU tile width (96 or 128 output columns;
// default 96 when it divides I and 128 does not, as for Pangu's I = 1344).
template <typename T>
cudaError_t launch_typed(const GemmArgs& a, cudaStream_t stream) {
  if (!a.swiglu) return launch<T, 256, false>(a, stream);
  const GemmTileChoice tile = gemm_tile_choice();
  const int64_t I = a.N_w / 2;
  bool narrow = I % 96 == 0 && I % 128 != 0;
  if (tile.sm90_width == 96) narrow = true;
  if (tile.sm90_width == 128) narrow = false;
  return narrow ? launch<T, 192, true>(a, stream) : launch<T, 256, true>(a, stream);
}
#endif  // MOGE_SM90A

}  // namespace sm90

namespace {
// Set by moge_cuda_set_gemm_tile below; relaxed atomics: a launch only needs some recent value.
std::atomic<int> g_tile_variant{0}, g_tile_width{0};
}  // namespace

GemmTileChoice gemm_tile_choice() {
  return GemmTileChoice{static_cast<BigVariant>(g_tile_variant.load(std::memory_order_relaxed)),
                        g_tile_width.load(std::memory_order_relaxed)};
}

cudaError_t launch_grouped_gemm_sm90(const GemmArgs& a, cudaStream_t stream) {
#ifdef MOGE_SM90A
  // TMA needs 16-byte aligned bases and row strides; the weights' rows are addressed as int32 box rows.
  const bool fits = (a.dtype == DType::kBFloat16 || a.dtype == DType::kFloat16) && a.Kd % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && reinterpret_cast<uintptr_t>(a.w) % 16 == 0 &&
                    static_cast<int64_t>(a.E) * a.N_w <= 2147483647 && a.M <= 2147483647;
  if (!fits || !sm90::device_is_sm90() || sm90::encode_tiled() == nullptr) return cudaErrorNotSupported;
  return a.dtype == DType::kBFloat16 ? sm90::launch_typed<__nv_bfloat16>(a, stream)
                                     : sm90::launch_typed<__half>(a, stream);
#else
  (void)a;
  (void)stream;
  return cudaErrorNotSupported;
#endif
}

}  // namespace cuda
}  // namespace moge

// The cuda_gemm_tile option (moge_kernels/_cuda.py, which validated it): BigVariant, width 0/96/128.
// Returns 0, or -1 (and changes nothing) for a value outside those.
extern "C" __attribute__((visibility("default"))) int moge_cuda_set_gemm_tile(int variant, int width) {
  if (variant < 0 || variant > static_cast<int>(moge::cuda::BigVariant::kBig) ||
      (width != 0 && width != 96 && width != 128)) {
    return -1;
  }
  moge::cuda::g_tile_variant.store(variant, std::memory_order_relaxed);
  moge::cuda::g_tile_width.store(width, std::memory_order_relaxed);
  return 0;
}

// 1 when this build holds the wgmma kernel (TORCH_CUDA_ARCH_LIST with 9.0a); read by moge_kernels._cuda.
extern "C" __attribute__((visibility("default"))) int moge_cuda_wgmma_built() {
#ifdef MOGE_SM90A
  return 1;
#else
  return 0;
#endif
}
