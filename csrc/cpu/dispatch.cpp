// grouped_dispatch on CPU: grouped top-k routing per token (parallel over tokens; among the kept experts
// when an expert_mask is given), a stable counting
// sort of the T*K (token, slot) pairs by expert, then the copy of each hidden row to its K slots.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../moge.h"

namespace moge {

namespace {

// Scores of one token in fp32. A NaN anywhere in a softmax row makes the whole row NaN, as
// torch.softmax does; sigmoid keeps NaN per expert.
void softmax_scores(const float* logits, int64_t E, float* scores) {
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) {
    row_max = std::isnan(logits[e]) || std::isnan(row_max) ? NAN : std::max(row_max, logits[e]);
  }
  float total = 0.f;
  for (int64_t e = 0; e < E; ++e) {
    scores[e] = std::exp(logits[e] - row_max);
    total += scores[e];
  }
  for (int64_t e = 0; e < E; ++e) scores[e] /= total;
}

void sigmoid_scores(const float* logits, int64_t E, float* scores) {
  for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
}

using ScoresFn = void (*)(const float* logits, int64_t E, float* scores);

ScoresFn scores_fn(int64_t score_func) {
  switch (score_func) {
    case kScoreSoftmax: return softmax_scores;
    case kScoreSigmoid: return sigmoid_scores;
    default:
      MOGE_CHECK_VALUE(false, "grouped_dispatch (cpu backend): no kernel for score_func ", score_func,
                        " (a moge_kernels.reference.ScoreFunc value)");
  }
  return nullptr;
}

// Selection key: NaN ranks below every number (the NaN policy in moge_kernels/reference.py).
inline float selection_key(float score) {
  return std::isnan(score) ? -std::numeric_limits<float>::infinity() : score;
}

}  // namespace

DispatchOutputs grouped_dispatch_cpu(const at::Tensor& hidden, const at::Tensor& router_logits,
                                     int64_t num_groups, int64_t topk_per_group,
                                     const std::optional<at::Tensor>& expert_scale, bool renormalize,
                                     int64_t score_func,
                                     const std::optional<at::Tensor>& expert_mask) {
  check_dispatch_args(hidden, router_logits, num_groups, topk_per_group, expert_scale, expert_mask);
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  const int64_t G = num_groups, k_g = topk_per_group, S = E / G, K = G * k_g;
  const ScoresFn token_scores = scores_fn(score_func);

  auto logits = router_logits.to(at::kFloat).contiguous();           // [T, E] fp32
  at::Tensor scale;                                                   // [E] fp32
  if (expert_scale.has_value()) scale = expert_scale->to(at::kFloat).contiguous();
  at::Tensor mask;                                                    // [E] bool
  if (expert_mask.has_value()) mask = expert_mask->contiguous();
  auto topk_weights = at::empty({T, K}, logits.options());           // [T, K] fp32
  auto topk_ids = at::empty({T, K}, logits.options().dtype(at::kInt));  // [T, K] int32
  const float* logits_ptr = logits.data_ptr<float>();
  const float* scale_ptr = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  float* weights_ptr = topk_weights.data_ptr<float>();
  int32_t* ids_ptr = topk_ids.data_ptr<int32_t>();

  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(E);
    std::vector<char> taken(S);
    for (int64_t t = begin; t < end; ++t) {
      token_scores(logits_ptr + t * E, E, scores.data());
      float* w = weights_ptr + t * K;
      int32_t* ids = ids_ptr + t * K;
      for (int64_t g = 0; g < G; ++g) {
        std::fill(taken.begin(), taken.end(), 0);
        for (int64_t j = 0; j < k_g; ++j) {   // k_g passes of an argmax: ties go to the lower index
          // Kept experts rank above masked ones (reached only if a group keeps fewer than k_g).
          int64_t best = -1;
          float best_key = 0.f;
          bool best_kept = false;
          for (int64_t s = 0; s < S; ++s) {
            if (taken[s]) continue;
            const float key = selection_key(scores[g * S + s]);
            const bool kept = mask_ptr == nullptr || mask_ptr[g * S + s];
            if (best < 0 || (kept && !best_kept) || (kept == best_kept && key > best_key)) {
              best = s, best_key = key, best_kept = kept;
            }
          }
          taken[best] = 1;
          ids[g * k_g + j] = static_cast<int32_t>(g * S + best);
          w[g * k_g + j] = scores[g * S + best];
        }
      }
      if (renormalize) {
        float total = 0.f;
        for (int64_t k = 0; k < K; ++k) total += w[k];
        for (int64_t k = 0; k < K; ++k) w[k] /= total;
      }
      if (scale_ptr != nullptr) {
        for (int64_t k = 0; k < K; ++k) w[k] *= scale_ptr[ids[k]];
      }
    }
  });

  // The permutation is grouped_permute's: a stable counting sort by expert, then the row copies.
  auto [permuted_hidden, expert_offsets, row_index] = grouped_permute_cpu(hidden, topk_ids, E);
  return {permuted_hidden, topk_weights, topk_ids, expert_offsets, row_index};
}

}  // namespace moge
