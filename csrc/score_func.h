// grouped_dispatch's score_func argument: the values of moge_kernels.reference.ScoreFunc (the Python
// router converts the public op's name to it once). Every kernel switches on it and fails on a value it
// has no branch for. Plain C++: the CUDA kernels (no ATen) include it too.
#pragma once

#include <cstdint>

namespace moge {

enum ScoreFunc : int64_t { kScoreSoftmax = 0, kScoreSigmoid = 1 };

}  // namespace moge
