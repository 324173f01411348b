// Registers deer's ops with the torch dispatcher (torch.ops.deer.<op>): the CPU kernels always,
// the CUDA kernels when built with DEER_WITH_CUDA. Python picks the backend by device (and the
// DEER_BACKEND override) in python/deer/ops/.
#include <torch/extension.h>
#include <torch/library.h>

#include "clip_reduce_noise/clip_reduce_noise.h"
#include "per_sample_grad_norm/per_sample_grad_norm.h"
#include "per_sample_grad_norm/psgn_tile.h"

TORCH_LIBRARY(deer, m) {
  m.def("per_sample_grad_norm(Tensor left, Tensor right, float scale, Tensor? gram, int gram_side) -> (Tensor, Tensor)");
  m.def("per_sample_grad_norm_only(Tensor left, Tensor right, float scale, Tensor? gram, int gram_side, int method) -> Tensor");
  m.def("clip_reduce_noise(Tensor grads, Tensor clip, float noise_std, float expected_batch_size, Tensor? chol, "
        "int noise_side, int seed, int step, int layer, int client, Tensor(a!)[] update_tensors, "
        "float[] update_hyper) -> Tensor");
  m.def("clip_reduce_noise_grouped(Tensor[] grads, Tensor[] clips, float noise_std, float expected_batch_size, "
        "Tensor?[] chols, int[] noise_sides, int seed, int step, int[] layers, int client, "
        "Tensor(a!)[] update_tensors, float[] update_hyper) -> Tensor[]");
  m.def("clip_reduce_noise_fused(Tensor left, Tensor right, float scale, Tensor clip, float noise_std, "
        "float expected_batch_size, Tensor? chol, int noise_side, int seed, int step, int layer, int client) -> Tensor");
}

TORCH_LIBRARY_IMPL(deer, CPU, m) {
  m.impl("per_sample_grad_norm", &deer::per_sample_grad_norm_cpu);
  m.impl("per_sample_grad_norm_only", &deer::per_sample_grad_norm_only);
  m.impl("clip_reduce_noise", &deer::clip_reduce_noise_cpu);
  m.impl("clip_reduce_noise_fused", &deer::clip_reduce_noise_fused_cpu);
  m.impl("clip_reduce_noise_grouped", &deer::clip_reduce_noise_grouped_cpu);
}

#ifdef DEER_WITH_CUDA
TORCH_LIBRARY_IMPL(deer, CUDA, m) {
  m.impl("per_sample_grad_norm", &deer::per_sample_grad_norm_cuda);
  m.impl("per_sample_grad_norm_only", &deer::per_sample_grad_norm_only);
  m.impl("clip_reduce_noise", &deer::clip_reduce_noise_cuda);
  m.impl("clip_reduce_noise_fused", &deer::clip_reduce_noise_fused_cuda);
  m.impl("clip_reduce_noise_grouped", &deer::clip_reduce_noise_grouped_cuda);
}
#endif

static std::vector<std::string> compiled_backends() {
  std::vector<std::string> out{"cpu"};
#ifdef DEER_WITH_CUDA
  out.push_back("cuda");
#endif
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deer's compiled kernels (CPU/OpenMP, and CUDA where built); ops live in torch.ops.deer";
  m.def("compiled_backends", &compiled_backends, "Backends compiled into this build: 'cpu' and possibly 'cuda'");
  m.def("cpu_isa", [] { return std::string(deer::tile::isa()); },
        "Instruction set the CPU tile GEMM dispatched to at load time: avx512, avx2 or generic");
  m.def("openmp_threads", [] { return at::get_num_threads(); }, "Threads the CPU kernels use");
}
