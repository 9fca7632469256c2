// grouped_dispatch on CUDA: grouped top-k routing fused with the stable permute, three launches, no
// host synchronisation (so it runs under CUDA graph capture and torch.compile):
//
//   1. route_kernel    one warp per token: fp32 scores (softmax over all E, or sigmoid), per group the
//                      k_g best (ties -> lower index, NaN ranked below every number, kept experts of an
//                      expert_mask above masked ones, as moge_kernels/reference.py route()),
//                      renormalize, expert_scale. Each block owns a
//                      chunk of kChunkTokens tokens; it then ranks the chunk's (token, slot) pairs among
//                      the pairs of the same expert and writes the chunk's per-expert counts.
//   2. offsets_kernel  one block: per expert, the exclusive scan of the counts over chunks (in place),
//                      and expert_offsets as the exclusive scan of the per-expert totals. Plain integer
//                      sums in a fixed order: deterministic.
//   3. permute_kernel  row_index[t,k] = expert_offsets[e] + chunk_base[chunk(t), e] + local_rank[t,k],
//                      then each token's hidden row is read once and stored to its K destination rows
//                      with 16-byte accesses where the alignment allows.
//
// The result is the stable order of the reference: within an expert, ascending token, then slot.
//
// Index arrays passed between the launches (the int32 workspace):
//   local_rank  [T*K]   pair (t,k)'s rank among its chunk's pairs routed to the same expert, in
//                       (token, slot) order
//   chunk_base  [NC, E] written by route_kernel as the number of pairs of chunk c routed to expert e;
//                       offsets_kernel turns it in place into the number of rows of expert e in chunks
//                       before c. NC = ceil(T / kChunkTokens).
#include "common.cuh"

namespace moge {
namespace cuda {

namespace {

constexpr int kRouteWarps = 8;
// Tokens per route block, 4 per warp: each warp walks its tokens one after another, so fewer tokens per
// block means a shorter latency chain (T = 128 runs 4 blocks, not 2); the scan over chunks (NC = T / 32)
// stays short.
constexpr int kChunkTokens = 32;
constexpr int kOffsetsThreads = 1024;
constexpr int kPermuteThreads = 128;
// Tokens per permute block: their 4 row loads are all in flight before the K stores of each.
constexpr int kPermuteTokens = 4;

// NaN ranks below every number when experts are selected (the reference's NaN policy).
__device__ __forceinline__ float selection_key(float score) { return isnan(score) ? -INFINITY : score; }

template <typename logit_t>
__device__ __forceinline__ float load_logit(const void* base, int64_t offset) {
  return to_float(static_cast<const logit_t*>(base)[offset]);
}

template <typename logit_t>
__global__ void __launch_bounds__(kRouteWarps * 32)
    route_kernel(const DispatchArgs p, int32_t* __restrict__ local_rank, int32_t* __restrict__ chunk_counts) {
  extern __shared__ float route_smem[];
  const int E = p.E, G = p.G, k_g = p.k_g, K = G * k_g, S = E / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Shared memory: scores [kRouteWarps][E] fp32 | slot weights [kRouteWarps][K] fp32 |
  //                chunk_ids [kChunkTokens][K] int32 | counts [E] int32
  float* scores = route_smem + warp * E;
  float* slot_w = route_smem + kRouteWarps * E + warp * K;
  int* chunk_ids = reinterpret_cast<int*>(route_smem + kRouteWarps * (E + K));
  int* counts = chunk_ids + kChunkTokens * K;

  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kChunkTokens;
  const int n_tok = static_cast<int>(p.T - t0 < kChunkTokens ? p.T - t0 : kChunkTokens);
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;

  for (int j = warp; j < n_tok; j += kRouteWarps) {
    const int64_t t = t0 + j;
    const int64_t row = t * p.logits_stride_t;
    float row_max = -INFINITY;
    for (int e = lane; e < E; e += 32) {
      const float v = load_logit<logit_t>(p.logits, row + e * p.logits_stride_e);
      scores[e] = v;
      row_max = fmaxf(row_max, v);
    }
    if (p.score_func == kScoreSoftmax) {
      // A NaN logit makes its exp NaN, the sum NaN, hence the whole row NaN, as torch.softmax does.
      row_max = warp_max(row_max);
      float total = 0.f;
      for (int e = lane; e < E; e += 32) {
        const float x = expf(scores[e] - row_max);
        scores[e] = x;
        total += x;
      }
      total = warp_sum(total);
      for (int e = lane; e < E; e += 32) scores[e] = scores[e] / total;
    } else if (p.score_func == kScoreSigmoid) {
      for (int e = lane; e < E; e += 32) scores[e] = 1.f / (1.f + expf(-scores[e]));
    }   // no other value reaches the kernel: launch_grouped_dispatch checks dispatch_has_score_func
    __syncwarp();
    // One lane per group: k_g passes, each taking the best expert in the order (kept desc, key desc,
    // index asc) strictly after the previous pick, so no "taken" marks are needed. Without a mask every
    // expert is kept; with one, masked experts come last (reached only if a group keeps fewer than k_g).
    for (int g = lane; g < G; g += 32) {
      float prev_key = 0.f;
      int prev = -1;
      bool prev_kept = true;
      for (int pick = 0; pick < k_g; ++pick) {
        int best = -1;
        float best_key = 0.f;
        bool best_kept = false;
        for (int s = 0; s < S; ++s) {
          const float key = selection_key(scores[g * S + s]);
          const bool kept = p.expert_mask == nullptr || p.expert_mask[g * S + s];
          const bool after_prev = prev < 0 || (prev_kept && !kept) ||
                                  (kept == prev_kept && (key < prev_key || (key == prev_key && s > prev)));
          const bool better = best < 0 || (kept && !best_kept) || (kept == best_kept && key > best_key);
          if (after_prev && better) best = s, best_key = key, best_kept = kept;
        }
        prev = best, prev_key = best_key, prev_kept = best_kept;
        const int k = g * k_g + pick;
        slot_w[k] = scores[g * S + best];
        chunk_ids[j * K + k] = g * S + best;
      }
    }
    __syncwarp();
    for (int k = lane; k < K; k += 32) {
      float w = slot_w[k];
      if (p.renormalize) {
        float total = 0.f;
        for (int i = 0; i < K; ++i) total += slot_w[i];
        w = w / total;
      }
      const int id = chunk_ids[j * K + k];
      if (p.expert_scale != nullptr) w = w * p.expert_scale[id];
      p.topk_weights[t * K + k] = w;
      p.topk_ids[t * K + k] = id;
    }
    __syncwarp();  // this warp's next token overwrites scores and slot_w
  }
  __syncthreads();

  // Stable ranks inside the chunk: warp 0 walks the pairs in (token, slot) order, 32 at a time; lanes
  // holding the same expert split one counter by their lane order.
  if (warp == 0) {
    const int n_pairs = n_tok * K;
    for (int i0 = 0; i0 < n_pairs; i0 += 32) {
      const int i = i0 + lane;
      const bool valid = i < n_pairs;
      const int id = valid ? chunk_ids[i] : E + lane;  // idle lanes get distinct ids that match nothing
      const unsigned peers = __match_any_sync(kFullMask, id);
      const int before = __popc(peers & ((1u << lane) - 1u));
      const int base = valid ? counts[id] : 0;
      if (valid) local_rank[t0 * K + i] = base + before;
      __syncwarp();
      if (valid && before == 0) counts[id] = base + __popc(peers);
      __syncwarp();
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    chunk_counts[static_cast<int64_t>(blockIdx.x) * E + e] = counts[e];
  }
}

__global__ void __launch_bounds__(kOffsetsThreads)
    offsets_kernel(int32_t* __restrict__ chunk_base, int num_chunks, int E, int32_t* __restrict__ expert_offsets) {
  __shared__ int partial[32][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Warp w scans chunks [lo, hi) for 32 experts at a time (lane = expert): coalesced 128-byte rows.
  const int per_warp = static_cast<int>(ceil_div(num_chunks, 32));
  const int lo = min(num_chunks, warp * per_warp), hi = min(num_chunks, lo + per_warp);
  for (int e0 = 0; e0 < E; e0 += 32) {
    const int e = e0 + lane;
    int sum = 0;
    if (e < E) {
      for (int c = lo; c < hi; ++c) sum += chunk_base[static_cast<int64_t>(c) * E + e];
    }
    partial[warp][lane] = sum;
    __syncthreads();
    int run = 0;
    for (int w = 0; w < warp; ++w) run += partial[w][lane];
    if (e < E) {
      if (warp == 31) expert_offsets[e + 1] = run + sum;   // the expert's total, scanned below
      for (int c = lo; c < hi; ++c) {
        const int64_t at = static_cast<int64_t>(c) * E + e;
        const int count = chunk_base[at];
        chunk_base[at] = run;
        run += count;
      }
    }
    __syncthreads();
  }
  // expert_offsets[1..E] hold the totals (written before the last barrier): scan them in place.
  if (warp == 0) {
    int carry = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
      const int e = e0 + lane;
      const int v = e < E ? expert_offsets[e + 1] : 0;
      const int inclusive = warp_inclusive_scan(v);
      if (e < E) expert_offsets[e + 1] = carry + inclusive;
      carry += __shfl_sync(kFullMask, inclusive, 31);
    }
    if (lane == 0) expert_offsets[0] = 0;
  }
}

template <typename vec_t>
__global__ void __launch_bounds__(kPermuteThreads)
    permute_kernel(const DispatchArgs p, const int32_t* __restrict__ local_rank,
                   const int32_t* __restrict__ chunk_base) {
  extern __shared__ int64_t dest_rows[];  // [kPermuteTokens * K]
  const int K = p.G * p.k_g;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kPermuteTokens;
  for (int i = threadIdx.x; i < kPermuteTokens * K; i += blockDim.x) {
    const int64_t t = t0 + i / K;
    if (t < p.T) {
      const int64_t pair = t0 * K + i;
      const int e = p.topk_ids[pair];
      const int row = p.expert_offsets[e] + chunk_base[(t / kChunkTokens) * p.E + e] + local_rank[pair];
      dest_rows[i] = row;
      if (blockIdx.y == 0) p.row_index[pair] = row;
    }
  }
  __syncthreads();
  const int64_t n_vec = p.row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kPermuteThreads + threadIdx.x;
  if (col >= n_vec) return;
  const char* src = static_cast<const char*>(p.hidden);
  vec_t* dst = static_cast<vec_t*>(p.permuted_hidden);
  vec_t v[kPermuteTokens];
#pragma unroll
  for (int j = 0; j < kPermuteTokens; ++j) {
    if (t0 + j < p.T) v[j] = reinterpret_cast<const vec_t*>(src + (t0 + j) * p.hidden_stride_bytes)[col];
  }
#pragma unroll
  for (int j = 0; j < kPermuteTokens; ++j) {
    if (t0 + j < p.T) {
      for (int k = 0; k < K; ++k) dst[dest_rows[j * K + k] * n_vec + col] = v[j];
    }
  }
}

template <typename vec_t>
cudaError_t launch_permute(const DispatchArgs& p, const int32_t* local_rank, const int32_t* chunk_base,
                           cudaStream_t stream) {
  const int K = p.G * p.k_g;
  const int64_t n_vec = p.row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t col_blocks = n_vec > 0 ? ceil_div(n_vec, kPermuteThreads) : 1;   // H = 0: rows only
  if (col_blocks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.T, kPermuteTokens)), static_cast<unsigned>(col_blocks));
  const size_t smem = sizeof(int64_t) * kPermuteTokens * K;
  permute_kernel<vec_t><<<grid, kPermuteThreads, smem, stream>>>(p, local_rank, chunk_base);
  return cudaGetLastError();
}

uint64_t route_smem_configured[3] = {0, 0, 0};

}  // namespace

int64_t dispatch_workspace_ints(int64_t T, int K, int E) {
  return T * K + ceil_div(T, kChunkTokens) * E;
}

int64_t dispatch_route_smem_bytes(int E, int K) {
  return static_cast<int64_t>(sizeof(float)) * kRouteWarps * (E + K) +
         static_cast<int64_t>(sizeof(int)) * (kChunkTokens * K + E);
}

bool dispatch_has_score_func(int score_func) {
  switch (score_func) {
    case kScoreSoftmax:
    case kScoreSigmoid:
      return true;
    default:
      return false;
  }
}

cudaError_t launch_grouped_dispatch(const DispatchArgs& p, cudaStream_t stream) {
  if (!dispatch_has_score_func(p.score_func)) return cudaErrorInvalidValue;
  const int K = p.G * p.k_g;
  const int64_t num_chunks = ceil_div(p.T, kChunkTokens);
  int32_t* local_rank = p.workspace;                 // [T*K]
  int32_t* chunk_base = p.workspace + p.T * K;       // [NC, E]

  const int64_t smem = dispatch_route_smem_bytes(p.E, K);
  cudaError_t err = cudaSuccess;
  switch (p.logits_dtype) {
    case DType::kFloat32:
      err = allow_dynamic_smem(route_kernel<float>, smem, route_smem_configured[0]);
      if (err == cudaSuccess)
        route_kernel<float><<<num_chunks, kRouteWarps * 32, smem, stream>>>(p, local_rank, chunk_base);
      break;
    case DType::kFloat16:
      err = allow_dynamic_smem(route_kernel<__half>, smem, route_smem_configured[1]);
      if (err == cudaSuccess)
        route_kernel<__half><<<num_chunks, kRouteWarps * 32, smem, stream>>>(p, local_rank, chunk_base);
      break;
    case DType::kBFloat16:
      err = allow_dynamic_smem(route_kernel<__nv_bfloat16>, smem, route_smem_configured[2]);
      if (err == cudaSuccess)
        route_kernel<__nv_bfloat16><<<num_chunks, kRouteWarps * 32, smem, stream>>>(p, local_rank, chunk_base);
      break;
  }
  if (err != cudaSuccess) return err;
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(chunk_base, static_cast<int>(num_chunks), p.E,
                                                    p.expert_offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // Widest access that the row length, the row stride and both base addresses allow.
  const uint64_t bits = static_cast<uint64_t>(p.row_bytes) | static_cast<uint64_t>(p.hidden_stride_bytes) |
                        reinterpret_cast<uintptr_t>(p.hidden) | reinterpret_cast<uintptr_t>(p.permuted_hidden);
  if (bits % 16 == 0) return launch_permute<uint4>(p, local_rank, chunk_base, stream);
  if (bits % 8 == 0) return launch_permute<uint2>(p, local_rank, chunk_base, stream);
  if (bits % 4 == 0) return launch_permute<uint32_t>(p, local_rank, chunk_base, stream);
  if (bits % 2 == 0) return launch_permute<uint16_t>(p, local_rank, chunk_base, stream);
  return launch_permute<uint8_t>(p, local_rank, chunk_base, stream);
}

}  // namespace cuda
}  // namespace moge
