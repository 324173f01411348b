// CUDA backend of per_sample_grad_norm: the device guard and stream around the kernels and launch
// logic of per_sample_grad_norm_cuda.cuh (shared with the CPU emulator test, see that file).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "per_sample_grad_norm/per_sample_grad_norm_cuda.cuh"

namespace deer {

std::tuple<at::Tensor, at::Tensor> per_sample_grad_norm_cuda(
    const at::Tensor& left, const at::Tensor& right, double scale,
    const c10::optional<at::Tensor>& gram, int64_t gram_side) {
  c10::cuda::CUDAGuard guard(left.device());
  return psgn_cuda::per_sample_grad_norm_launch(left, right, scale, gram, gram_side,
                                                at::cuda::getCurrentCUDAStream().stream());
}

}  // namespace deer
