"""The one place that chooses block sizes, warps, pipeline depth and split counts for deer's Triton
kernels. Kernels never pick their own tiles; launchers ask here and return what they used.

Two regimes:
- GPU (CUDA tensors): tiles sized for an H100-class part. The per-sample products are memory bound
  for LoRA ranks (arithmetic intensity 2pq / (itemsize (p + q)) flops per byte, about 8-30 for
  r = 16-64), so tiles aim at wide coalesced loads along the contiguous feature axis, several loads
  in flight (num_stages) and enough programs to cover every SM (batch splits for the reductions).
- Interpreter (TRITON_INTERPRET=1 on CPU tensors): every program and every loop iteration costs
  Python overhead while numpy makes a large tile nearly free, so tiles are as large as the problem
  (capped) and there is one batch split.
Nothing here touches CUDA at import time; the SM count is read lazily and cached per device.
"""
from __future__ import annotations

import functools
import os

import torch

# tl.dot needs every dimension >= 16 on the GPU.
MIN_DOT = 16
# Largest dimension a regulated metric / regulated noise may put in one tile: K is r x r with the
# LoRA rank r, and the whole of r must sit in one tile (the metric and the noise mix all of it).
MAX_GRAM = 128
# Interpreter cap on any tile side: keeps numpy temporaries small while still one tile for tests.
_INTERP_CAP = 256


def next_pow2(n: int, lo: int = MIN_DOT) -> int:
    """Smallest power of two >= max(n, lo)."""
    n = max(int(n), lo, 1)
    return 1 << (n - 1).bit_length()


def interpreted(device: torch.device) -> bool:
    """True when kernels on `device` run in the Triton interpreter (CPU tensors)."""
    return device.type != "cuda"


def check_runnable(device: torch.device, op: str, kernel=None) -> None:
    """Clear error when Triton cannot run on tensors of `device`. On the CPU the kernels must have
    been built for the interpreter: triton.jit reads TRITON_INTERPRET when the kernel module is
    imported, so setting it later changes nothing."""
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if kernel is not None:
            from triton.runtime.interpreter import InterpretedFunction
            if isinstance(kernel, InterpretedFunction):
                return
            raise RuntimeError(
                f"{op} (triton backend): got CPU tensors but deer_kernels was imported without "
                "TRITON_INTERPRET=1, so its kernels were built for the GPU. Set TRITON_INTERPRET=1 "
                "before anything imports triton or deer_kernels (slow, for tests), or use backend='cpu'.")
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return
    raise RuntimeError(
        f"{op} (triton backend): got tensors on {device}; Triton kernels need CUDA tensors, or CPU "
        "tensors with TRITON_INTERPRET=1 set before triton is first imported (slow, for tests). "
        "Use backend='cpu' or 'reference' for CPU tensors.")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def grad_tiles(p: int, q: int, T: int, itemsize: int, gram_axis: int | None,
               device: torch.device) -> dict:
    """Tiles for g_i = L_i^T R_i (p x q per sample), reducing over T tokens.

    gram_axis: None (Euclidean norm: any tiling), 0 (K acts on the p axis: a tile holds all p rows),
    1 (K acts on the q axis: a tile holds all q columns)."""
    if interpreted(device):
        bt = min(next_pow2(T), _INTERP_CAP)
        bp = min(next_pow2(p), _INTERP_CAP)
        bq = min(next_pow2(q), _INTERP_CAP)
        num_warps, num_stages = 4, 1
    else:
        # 16-bit inputs: 64 tokens per step is a 128-byte row of a 64-wide tile per stage; fp32 halves it
        # to keep the same shared-memory footprint ((bt*bp + bt*bq) * itemsize * stages <= ~100 KB).
        bt = 64 if itemsize <= 2 else 32
        bp = min(64, next_pow2(p))
        bq = min(64, next_pow2(q))
        num_stages = 3
    if gram_axis == 1:
        bq = next_pow2(q)
        if not interpreted(device):
            bp = min(bp, 64 if bq <= 64 else 32)
    elif gram_axis == 0:
        bp = next_pow2(p)
        if not interpreted(device):
            bq = min(bq, 64 if bp <= 64 else 32)
    if not interpreted(device):
        # fp32 accumulator tile in registers: 64 x 64 over 4 warps is 32 registers a thread.
        num_warps = 4 if bp * bq <= 64 * 64 else 8
    return dict(BLOCK_T=bt, BLOCK_P=bp, BLOCK_Q=bq, num_warps=num_warps, num_stages=num_stages)


def reduce_tiles(p: int, q: int, device: torch.device) -> dict:
    """Tiles for the clip-weighted sum over samples of (p x q) gradients (streaming, memory bound)."""
    if interpreted(device):
        return dict(BLOCK_P=min(next_pow2(p), _INTERP_CAP), BLOCK_Q=min(next_pow2(q), _INTERP_CAP),
                    num_warps=4, num_stages=1)
    # 32 x 128 fp32 = 16 KB per sample and stage; 128 contiguous floats per row = 512-byte rows.
    bq = min(128, next_pow2(q))
    bp = min(32, next_pow2(p))
    return dict(BLOCK_P=bp, BLOCK_Q=bq, num_warps=4, num_stages=3)


def noise_tiles(p: int, q: int, noise_side: int | None, device: torch.device) -> dict:
    """Tiles for the finishing pass (sum of batch splits + noise). Regulated noise mixes all r rows
    (noise_side 0) or all r columns (noise_side 1): that axis is one tile. On the GPU a thread holds
    about 4 elements: each runs Philox (a dozen live 32-bit words) and a float64 Box-Muller (log,
    sin/cos in double), and 16 elements a thread spilled ~1.5 KB to local memory at 255 registers.
    Regulated tiles that must hold all of a large r get more warps instead of more elements."""
    if interpreted(device):
        bp = min(next_pow2(p), _INTERP_CAP)
        bq = min(next_pow2(q), _INTERP_CAP)
        if noise_side == 0:
            bp = next_pow2(p)
        elif noise_side == 1:
            bq = next_pow2(q)
        return dict(BLOCK_P=bp, BLOCK_Q=bq, num_warps=4, num_stages=1)
    budget = 512
    if noise_side == 0:
        bp = next_pow2(p)
        bq = min(next_pow2(q), max(MIN_DOT, budget // bp))
    elif noise_side == 1:
        bq = next_pow2(q)
        bp = min(next_pow2(p), max(MIN_DOT, budget // bq))
    else:
        bq = min(32, next_pow2(q))
        bp = min(next_pow2(p), max(MIN_DOT, budget // bq))
    num_warps = min(16, max(4, bp * bq // 128))
    return dict(BLOCK_P=bp, BLOCK_Q=bq, num_warps=num_warps, num_stages=1)


def batch_splits(n_tiles: int, b: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(splits, samples per split) for a reduction over b samples on n_tiles output tiles: enough
    programs to cover every SM about four times, but each split keeps >= 4 samples so the partial
    sums (written once, read once by the finishing pass) stay small next to the inputs.
    `splits` forces a count (tests use it to run the multi-split path in the interpreter)."""
    if splits is None:
        if interpreted(device) or b <= 1:
            return 1, max(b, 1)
        target = 4 * sm_count(device)
        splits = max(1, min(-(-target // max(n_tiles, 1)), max(1, b // 4)))
    if splits < 1:
        raise ValueError(f"batch splits must be >= 1, got {splits}")
    per = -(-max(b, 1) // splits)
    return -(-max(b, 1) // per), per
