// Shared checks for deer's kernels. Every op validates its inputs here so that a bad call fails
// with a message naming the argument and the expected shape, never with a silent wrong answer.
#pragma once
#include <torch/types.h>

#define DEER_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, "deer: ", __VA_ARGS__)

namespace deer {

// Accumulation type: fp32 for fp16/bf16/fp32 inputs (low precision products summed over T tokens
// lose digits fast), fp64 for fp64 inputs (the oracle path).
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };

// The same choice as a dtype: the accumulation and output dtype of an op whose inputs are t's dtype.
inline at::ScalarType acc_dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace deer
