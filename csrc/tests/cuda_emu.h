// A CPU emulator for deer's CUDA kernels, so that CI (no GPU) executes the very kernel source that
// nvcc compiles, not a re-implementation of it. Test-only; included before a *_cuda.cuh when
// DEER_CUDA_EMULATION is defined (see csrc/cuda_compat.h).
//
// Model: a launch runs its blocks one after another; the threads of a block are user-space fibers
// (ucontext) on one OS thread. A fiber runs until it reaches a barrier (__syncthreads, or the two
// warp-wide exchanges inside a shuffle) or returns. Between barriers the runnable fibers are run in
// a freshly shuffled order each phase, so a kernel that reads shared memory another thread writes
// in the same phase (a missing __syncthreads) gets a wrong answer in some phases instead of a lucky
// right one. Exited threads count as arrived at __syncthreads (as on Volta and later).
//
// What it checks beyond the arithmetic: launch limits (block <= 1024 threads, grid.x < 2^31,
// grid.y/z <= 65535, zero-sized launches), a full-mask shuffle in a warp with exited or missing
// lanes, and a deadlock (live threads waiting at different barriers). Each of these aborts with a
// message. What it cannot check: timing, the memory model beyond barrier ordering, occupancy,
// shared-memory capacity, and the device math library (it uses the host's).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one static array per kernel instantiation is exactly one block's
// shared memory.
#define __shared__ static

namespace deer::emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

enum class State { runnable, at_sync, at_warp, done };

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  State state = State::runnable;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t sched;
  int current = 0, nthreads = 0, nwarps = 0;
  int done = 0, at_sync = 0;
  std::vector<int> warp_done, warp_waiting;
  std::vector<uint64_t> shfl;  // one slot per lane
  std::function<void()> body;
};

inline Block* g_block = nullptr;
inline std::mt19937_64 g_rng{0x5eed};

// Seeds the order in which runnable threads are interleaved (tests pass their fresh seed).
inline void seed_schedule(uint64_t s) { g_rng.seed(s); }

inline void fiber_entry() {
  Block& b = *g_block;
  b.body();
  Fiber& f = b.fibers[b.current];
  f.state = State::done;
  ++b.done;
  ++b.warp_done[b.current / 32];
  // returning switches to uc_link (the scheduler)
}

inline void yield_to_scheduler() {
  Block& b = *g_block;
  swapcontext(&b.fibers[b.current].ctx, &b.sched);
}

inline void syncthreads() {
  Block& b = *g_block;
  b.fibers[b.current].state = State::at_sync;
  ++b.at_sync;
  yield_to_scheduler();
}

inline void warp_barrier() {
  Block& b = *g_block;
  b.fibers[b.current].state = State::at_warp;
  ++b.warp_waiting[b.current / 32];
  yield_to_scheduler();
}

// Releases every barrier whose participants have all arrived; returns whether anything was released.
inline bool release(Block& b) {
  bool any = false;
  for (int w = 0; w < b.nwarps; ++w) {
    const int lanes = std::min(32, b.nthreads - 32 * w);
    if (b.warp_waiting[w] > 0 && b.warp_waiting[w] + b.warp_done[w] == lanes) {
      if (b.warp_done[w] != 0) fail("a full-mask warp shuffle ran while lanes of its warp had exited");
      for (int l = 0; l < lanes; ++l) b.fibers[32 * w + l].state = State::runnable;
      b.warp_waiting[w] = 0;
      any = true;
    }
  }
  if (b.at_sync > 0 && b.at_sync + b.done == b.nthreads) {
    for (auto& f : b.fibers)
      if (f.state == State::at_sync) f.state = State::runnable;
    b.at_sync = 0;
    any = true;
  }
  return any;
}

inline void run_block(Block& b, const dim3& block) {
  b.done = b.at_sync = 0;
  std::fill(b.warp_done.begin(), b.warp_done.end(), 0);
  std::fill(b.warp_waiting.begin(), b.warp_waiting.end(), 0);
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = b.fibers[t];
    f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    f.state = State::runnable;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks[t].data();
    f.ctx.uc_stack.ss_size = b.stacks[t].size();
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> order(b.nthreads);
  while (b.done < b.nthreads) {
    order.clear();
    for (int t = 0; t < b.nthreads; ++t)
      if (b.fibers[t].state == State::runnable) order.push_back(t);
    if (order.empty()) {
      if (!release(b)) fail("deadlock: live threads wait at different barriers (__syncthreads in divergent code?)");
      continue;
    }
    std::shuffle(order.begin(), order.end(), g_rng);
    for (int t : order) {
      b.current = t;
      threadIdx = b.fibers[t].tid;
      swapcontext(&b.sched, &b.fibers[t].ctx);
    }
    release(b);
  }
}

// kernel<<<grid, block>>>(args...) on the CPU.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) fail("block size must be 1..1024 threads");
  if (block.z > 64) fail("block.z must be <= 64");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("zero-sized grid (an invalid launch on the device)");
  if (grid.x >= (1u << 31) || grid.y > 65535 || grid.z > 65535) fail("grid exceeds the device limits");
  Block b;
  b.nthreads = static_cast<int>(nthreads);
  b.nwarps = (b.nthreads + 31) / 32;
  b.fibers.resize(b.nthreads);
  b.stacks.assign(b.nthreads, std::vector<char>(64 * 1024));
  b.warp_done.assign(b.nwarps, 0);
  b.warp_waiting.assign(b.nwarps, 0);
  b.shfl.assign(b.nthreads, 0);
  b.body = [&] { kernel(args...); };
  Block* prev = g_block;
  g_block = &b;
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block(b, block);
      }
  g_block = prev;
}

}  // namespace deer::emu

inline void __syncthreads() { deer::emu::syncthreads(); }

// __shfl_down_sync with the full mask: lane l gets lane l + delta's value (its own when that lane
// is past the warp). Two warp barriers: all lanes publish, then all read before any slot is reused.
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  deer::emu::Block& b = *deer::emu::g_block;
  if (mask != 0xffffffffu) deer::emu::fail("only full-mask shuffles are emulated");
  if (b.nthreads % 32 != 0) deer::emu::fail("a full-mask shuffle in a block whose size is not a multiple of 32");
  const int me = b.current, lane = me % 32;
  std::memcpy(&b.shfl[me], &v, sizeof(T));
  deer::emu::warp_barrier();
  T r = v;
  if (lane + delta < 32) std::memcpy(&r, &b.shfl[me + delta], sizeof(T));
  deer::emu::warp_barrier();
  return r;
}
