// grouped_permute on CUDA: a stable counting sort of the T*K (token, slot) pairs by the given expert ids
// (bucket E: the dropped slots, id -1, after every expert), then the copy of each hidden row to its K rows.
//
// Three launches on the caller's stream, no host synchronisation:
//   1. rank_kernel, one block per chunk of kChunkSlots consecutive flat slots (t*K + k order): each slot's
//      rank among the chunk's earlier slots of its bucket (a scan of the chunk kept in shared memory), and
//      the chunk's per-bucket counts (integer shared-memory atomics: the counts do not depend on order).
//   2. scan_kernel, one block: expert_offsets (exclusive cumsum of the bucket totals) and, in place, the
//      first row of every (chunk, bucket).
//   3. copy_kernel, one block per (kCopyTokens tokens, column chunk): row_index, then each hidden row read
//      once and written to its K rows; a dropped slot's row (row >= expert_offsets[E]) gets zeros.
// Ids outside [-1, E) (the Python checks reject them on CPU, and on a GPU with validation on) are treated
// as dropped, so no write ever leaves the outputs.
#include "common.cuh"

namespace moge {
namespace cuda {

namespace {

constexpr int kChunkSlots = 1024;   // slots per rank block (one per thread)
constexpr int kScanThreads = 1024;
constexpr int kCopyThreads = 128;
constexpr int kCopyTokens = 4;

__device__ __forceinline__ int bucket_of(const PermuteArgs& p, int64_t slot) {
  const int64_t t = slot / p.K, k = slot % p.K;
  const int64_t off = t * p.ids_stride_t + k * p.ids_stride_k;
  const int64_t id = p.ids_are_int64 ? static_cast<const int64_t*>(p.topk_ids)[off]
                                     : static_cast<int64_t>(static_cast<const int32_t*>(p.topk_ids)[off]);
  return (id >= 0 && id < p.E) ? static_cast<int>(id) : p.E;
}

__global__ void __launch_bounds__(kChunkSlots) rank_kernel(const PermuteArgs p, int32_t* slot_rank,
                                                           int32_t* chunk_counts) {
  extern __shared__ int smem[];
  int* buckets = smem;                 // [kChunkSlots]
  int* counts = smem + kChunkSlots;    // [E + 1]
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kChunkSlots + threadIdx.x;
  const int64_t num_slots = p.T * p.K;
  for (int e = threadIdx.x; e <= p.E; e += blockDim.x) counts[e] = 0;
  const int mine = slot < num_slots ? bucket_of(p, slot) : -1;
  buckets[threadIdx.x] = mine;
  __syncthreads();
  if (mine >= 0) {
    int rank = 0;
    for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) rank += buckets[j] == mine;
    slot_rank[slot] = rank;
    atomicAdd(&counts[mine], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= p.E; e += blockDim.x) {
    chunk_counts[static_cast<int64_t>(blockIdx.x) * (p.E + 1) + e] = counts[e];
  }
}

__global__ void __launch_bounds__(kScanThreads) scan_kernel(int32_t* chunk_counts, int num_chunks, int E,
                                                            int32_t* expert_offsets) {
  extern __shared__ int totals[];   // [E + 1]
  for (int e = threadIdx.x; e <= E; e += blockDim.x) {
    int total = 0;
    for (int c = 0; c < num_chunks; ++c) total += chunk_counts[static_cast<int64_t>(c) * (E + 1) + e];
    totals[e] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {   // E + 1 buckets: a sequential exclusive scan is a few hundred adds
    int running = 0;
    for (int e = 0; e <= E; ++e) {
      const int total = totals[e];
      totals[e] = running;
      running += total;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= E; e += blockDim.x) {
    int row = totals[e];
    expert_offsets[e] = row;
    for (int c = 0; c < num_chunks; ++c) {
      int32_t* cell = chunk_counts + static_cast<int64_t>(c) * (E + 1) + e;
      const int count = *cell;
      *cell = row;
      row += count;
    }
  }
}

template <typename vec_t>
__global__ void __launch_bounds__(kCopyThreads) copy_kernel(const PermuteArgs p, const int32_t* slot_rank,
                                                            const int32_t* chunk_base) {
  extern __shared__ int64_t dest_rows[];   // [kCopyTokens * K]; -1 - row for a dropped slot
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kCopyTokens;
  for (int i = threadIdx.x; i < kCopyTokens * p.K; i += blockDim.x) {
    const int64_t slot = t0 * p.K + i;
    if (slot < p.T * p.K) {
      const int b = bucket_of(p, slot);
      const int row = chunk_base[(slot / kChunkSlots) * (p.E + 1) + b] + slot_rank[slot];
      dest_rows[i] = b < p.E ? row : -1 - static_cast<int64_t>(row);
      if (blockIdx.y == 0) p.row_index[slot] = row;
    }
  }
  __syncthreads();
  const int64_t n_vec = p.row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kCopyThreads + threadIdx.x;
  if (col >= n_vec) return;
  const char* src = static_cast<const char*>(p.hidden);
  vec_t* dst = static_cast<vec_t*>(p.permuted_hidden);
  const vec_t zero{};
  for (int j = 0; j < kCopyTokens && t0 + j < p.T; ++j) {
    const vec_t v = reinterpret_cast<const vec_t*>(src + (t0 + j) * p.hidden_stride_bytes)[col];
    for (int k = 0; k < p.K; ++k) {
      const int64_t row = dest_rows[j * p.K + k];
      if (row >= 0) {
        dst[row * n_vec + col] = v;
      } else {
        dst[(-1 - row) * n_vec + col] = zero;
      }
    }
  }
}

template <typename vec_t>
cudaError_t launch_copy(const PermuteArgs& p, const int32_t* slot_rank, const int32_t* chunk_base,
                        cudaStream_t stream) {
  const int64_t n_vec = p.row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t col_blocks = n_vec > 0 ? ceil_div(n_vec, kCopyThreads) : 1;   // H = 0: row_index only
  if (col_blocks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.T, kCopyTokens)), static_cast<unsigned>(col_blocks));
  copy_kernel<vec_t><<<grid, kCopyThreads, sizeof(int64_t) * kCopyTokens * p.K, stream>>>(p, slot_rank, chunk_base);
  return cudaGetLastError();
}

}  // namespace

int64_t permute_workspace_ints(int64_t T, int K, int E) {
  return T * K + ceil_div(T * K, kChunkSlots) * (E + 1);
}

int64_t permute_smem_bytes(int E) { return static_cast<int64_t>(sizeof(int)) * (kChunkSlots + E + 1); }

cudaError_t launch_grouped_permute(const PermuteArgs& p, cudaStream_t stream) {
  const int64_t num_chunks = ceil_div(p.T * p.K, kChunkSlots);
  int32_t* slot_rank = p.workspace;                  // [T*K]
  int32_t* chunk_base = p.workspace + p.T * p.K;     // [NC, E+1]: counts, then first rows
  // permute_smem_bytes(E) <= 48 KB (checked by the caller): no opt-in to more shared memory needed.
  rank_kernel<<<num_chunks, kChunkSlots, permute_smem_bytes(p.E), stream>>>(p, slot_rank, chunk_base);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scan_kernel<<<1, kScanThreads, sizeof(int) * (p.E + 1), stream>>>(chunk_base, static_cast<int>(num_chunks), p.E,
                                                      p.expert_offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  // Widest access that the row length, the row stride and both base addresses allow.
  const uint64_t bits = static_cast<uint64_t>(p.row_bytes) | static_cast<uint64_t>(p.hidden_stride_bytes) |
                        reinterpret_cast<uintptr_t>(p.hidden) | reinterpret_cast<uintptr_t>(p.permuted_hidden);
  if (bits % 16 == 0) return launch_copy<uint4>(p, slot_rank, chunk_base, stream);
  if (bits % 8 == 0) return launch_copy<uint2>(p, slot_rank, chunk_base, stream);
  if (bits % 4 == 0) return launch_copy<uint32_t>(p, slot_rank, chunk_base, stream);
  if (bits % 2 == 0) return launch_copy<uint16_t>(p, slot_rank, chunk_base, stream);
  return launch_copy<uint8_t>(p, slot_rank, chunk_base, stream);
}

// ----------------------------------------------------------------------------- rows of no expert
namespace {

constexpr int kZeroThreads = 256;

__global__ void __launch_bounds__(kZeroThreads) zero_tail_kernel(uint32_t* y, int64_t row_words,
                                                                 const int32_t* rows_end, int64_t M) {
  const int64_t begin = static_cast<int64_t>(*rows_end) * row_words;
  const int64_t end = M * row_words;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += stride) {
    y[i] = 0u;
  }
}

__global__ void __launch_bounds__(kZeroThreads) zero_tail_kernel_u16(uint16_t* y, int64_t row_elems,
                                                                     const int32_t* rows_end, int64_t M) {
  const int64_t begin = static_cast<int64_t>(*rows_end) * row_elems;
  const int64_t end = M * row_elems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += stride) {
    y[i] = 0;
  }
}

}  // namespace

cudaError_t launch_zero_rows_past_experts(void* y, int64_t row_bytes, const int32_t* rows_end, int64_t M,
                                          cudaStream_t stream) {
  if (M == 0 || row_bytes == 0) return cudaSuccess;
  // A fixed grid striding over the tail: sized for a full tail, and a few loads when there is none.
  const int64_t bytes = M * row_bytes;
  const int64_t want = ceil_div(bytes / 2, kZeroThreads);
  const unsigned blocks = static_cast<unsigned>(want < 264 ? want : 264);
  if (row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(y) % 4 == 0) {
    zero_tail_kernel<<<blocks, kZeroThreads, 0, stream>>>(static_cast<uint32_t*>(y), row_bytes / 4, rows_end, M);
  } else {
    zero_tail_kernel_u16<<<blocks, kZeroThreads, 0, stream>>>(static_cast<uint16_t*>(y), row_bytes / 2, rows_end, M);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moge
