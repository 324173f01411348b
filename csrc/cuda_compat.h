// One launch syntax for deer's kernel sources (*_cuda.cuh), compiled two ways:
//   nvcc (the product):              DEER_LAUNCH -> kernel<<<grid, block, 0, stream>>>(...) + launch check
//   g++ with DEER_CUDA_EMULATION:    DEER_LAUNCH -> deer::emu::launch (csrc/tests/cuda_emu.h), so the
//                                    ctest suite runs the same kernel code on a CPU-only CI machine.
// `kernel` must be a single token (bind a templated kernel to a local function pointer first: the
// commas of a template argument list would split the macro arguments).
#pragma once
#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#define DEER_LAUNCH(kernel, grid, block, stream, ...)          \
  do {                                                         \
    kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__);     \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                            \
  } while (0)
#elif defined(DEER_CUDA_EMULATION)
#include "tests/cuda_emu.h"
#define DEER_LAUNCH(kernel, grid, block, stream, ...) ::deer::emu::launch((grid), (block), kernel, __VA_ARGS__)
#else
#error "a *_cuda.cuh is compiled by nvcc, or by the ctest emulator with DEER_CUDA_EMULATION"
#endif
