"""Peak memory of one benchmark case.

CUDA: `torch.cuda.max_memory_allocated` (bytes held by torch's caching allocator for live tensors,
peak) minus what was allocated before the case was built: model weights, LoRA factors, optimizer
state, activations, per-sample gradients and noise.

CPU: peak resident set size (RSS) of this process while the case is built and stepped, minus the
RSS just before it. The kernel's high-water mark (VmHWM in /proc/self/status) is reset to the current
RSS by writing "5" to /proc/self/clear_refs (Linux >= 4.0), and glibc is first asked to hand freed
heap pages back (malloc_trim), so memory freed by earlier cases is not silently reused and missed.
This counts everything the case touches (weights, activations, per-sample gradients, allocator
slack) but not the Python interpreter or the libraries loaded before it. Where clear_refs is not
writable the CPU measurement is reported as unavailable (None), never guessed.
"""
from __future__ import annotations

import ctypes
import gc
import re
from contextlib import contextmanager

import torch

CPU_KIND = "cpu_peak_rss_delta"      # VmHWM - VmRSS(before), bytes
CUDA_KIND = "cuda_max_allocated_delta"


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _libc():
    """glibc, or None where it is not this process's C library."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel:
    blocks up to 1 GiB come from the heap (not one mmap each), and the heap is not trimmed on free.

    By default every block above glibc's mmap threshold (at most 32 MiB) is mapped on allocation
    and unmapped on free, so each step touches its large tensors (a decoder's (b, T, vocab) logits,
    activations) as fresh pages: measured on a T = 512 decoder step, about 210,000 page faults per
    step, 20% of the step time, varying by +-15% between steps, far more than the differences the
    benchmark compares. Kept, the faults go away and every method's step is measured without them.
    peak_memory switches back to returning freed memory while it measures a case. Returns False
    where this is not glibc."""
    global _KEPT
    _KEPT = _KEPT or _mallopt(keep=True)
    return _KEPT


def _mallopt(keep: bool) -> bool:
    """keep: the settings above; else glibc's initial ones fixed (mmap and trim thresholds 128 KiB,
    no top pad), so every large block is mapped on allocation and unmapped on free and the RSS
    follows the live memory."""
    mmap, trim, pad = ((1 << 30), (1 << 31) - 1, 1 << 26) if keep else (128 << 10, 128 << 10, 0)
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return (libc.mallopt(_M_MMAP_THRESHOLD, mmap) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
            and libc.mallopt(_M_TOP_PAD, pad) == 1)


_KEPT = False


def malloc_state() -> str:
    """'keep-freed' once keep_freed_memory() took effect in this process, else 'default'."""
    return "keep-freed" if _KEPT else "default"


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Result holder: bytes (int or None) and kind (CPU_KIND or CUDA_KIND)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.bytes: int | None = None


@contextmanager
def peak_memory(device: str | torch.device):
    """with peak_memory(device) as pm: ...build and run...; then pm.bytes, pm.kind."""
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        pm = PeakMemory(CUDA_KIND)
        yield pm
        torch.cuda.synchronize(dev)
        pm.bytes = int(torch.cuda.max_memory_allocated(dev) - base)
        return
    # Memory kept for reuse (keep_freed_memory) would hide a case's allocations in pages an earlier
    # one left, or count pages freed inside the case: measure with freed memory returned at once.
    if _KEPT:
        _mallopt(keep=False)
    try:
        _malloc_trim()
        ok = _reset_hwm()
        base = _status_kb("VmRSS")
        pm = PeakMemory(CPU_KIND)
        yield pm
        hwm = _status_kb("VmHWM")
    finally:
        if _KEPT:
            _mallopt(keep=True)
    if ok and base is not None and hwm is not None:
        pm.bytes = int(max(0, hwm - base) * 1024)
