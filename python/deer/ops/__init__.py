"""Backend dispatch for deer's ops. One name per op across csrc/, deer_kernels/, python/deer/ops/,
tests/ and bench/.

Ops: per_sample_grad_norm (+ per_sample_grad_norm_only: norms alone, materialised or ghost by cost),
clip_reduce_noise (+ clip_reduce_noise_fused: from the factors, no per-sample gradients;
clip_reduce_noise_grouped: every layer of a model in one call); each has a
`<op>_reference` twin in PyTorch ops (float64-capable) that the tests use as the oracle.

Backends: 'cpu' (C++/OpenMP in deer._C), 'cuda' (CUDA C++ in deer._C), 'triton' (deer_kernels/),
'reference' (pure PyTorch, float64-capable oracle). The choice comes from the call's `backend`
argument, else the DEER_BACKEND environment variable, else the tensor's device: CPU tensors use
'cpu', CUDA tensors use 'cuda' (or 'triton' when deer._C was built without CUDA). A backend that
cannot run says why.
"""
from __future__ import annotations

import os

from .. import _ext

BACKENDS = ("cpu", "cuda", "triton", "reference")


class BackendUnavailable(RuntimeError):
    pass


def _triton_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return ("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 (set before triton is "
                "imported) to run them on the CPU through the interpreter")
    return None


def _triton_op_reason(op: str) -> str | None:
    """None if deer_kernels.<op> defines <op>, else why not (the Triton kernels are written per op)."""
    import importlib
    try:
        mod = importlib.import_module(f"deer_kernels.{op}")
    except ImportError as e:
        return (f"the Triton kernel deer_kernels/{op}.py cannot be imported ({e}); run from the repository "
                "root or install deer with its deer_kernels package")
    if not hasattr(mod, op):
        return f"deer_kernels/{op}.py does not define {op}()"
    return None


def _compiled_op_reason(op: str) -> str | None:
    import torch
    if not hasattr(torch.ops.deer, op):
        return (f"this build of deer._C does not register torch.ops.deer.{op} (it predates the op); rebuild "
                "with `python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`")
    return None


def unavailable_reason(backend: str, device_type: str, op: str | None = None) -> str | None:
    """None if `backend` can run on tensors of `device_type` (and, given `op`, has that op), else a
    sentence saying why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_reason(device_type) or (_triton_op_reason(op) if op else None)
    if not _ext.available():
        return _ext.BUILD_HINT
    if op is not None:
        _ext.load()  # registers torch.ops.deer.*
        why = _compiled_op_reason(op)
        if why:
            return why
    if backend == "cpu":
        return None if device_type == "cpu" else f"the 'cpu' backend needs CPU tensors, got {device_type}"
    # cuda
    if "cuda" not in _ext.compiled_backends():
        return ("deer._C was built without CUDA kernels (no nvcc, a CPU-only torch, or "
                "DEER_SKIP_CUDA=1). Rebuild on a CUDA machine with DEER_FORCE_CUDA=1.")
    return None if device_type == "cuda" else f"the 'cuda' backend needs CUDA tensors, got {device_type}"


def acc_dtype(dtype):
    """Accumulation and output dtype of an op on `dtype` inputs: fp32 for fp16/bf16/fp32, fp64 for fp64
    (the C++ kernels' acc_dtype_of)."""
    import torch
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_backend(device, backend: str | None = None, op: str | None = None, dtype=None) -> str:
    """The backend `op` will use for tensors on `device` (raises BackendUnavailable, saying why, when
    the requested backend cannot run). Automatic choice never routes float64 to Triton (its kernels
    take fp32/bf16/fp16 and say so); float64 on CUDA without deer's CUDA kernels uses the reference."""
    import torch
    device_type = device.type if hasattr(device, "type") else str(device).split(":")[0]
    choice = backend or os.environ.get("DEER_BACKEND") or "auto"
    if choice == "auto":
        order = ("cuda", "triton", "reference") if device_type == "cuda" else ("cpu", "reference")
        if dtype == torch.float64:
            order = tuple(b for b in order if b != "triton")
        for b in order:
            if unavailable_reason(b, device_type, op) is None:
                return b
        return "reference"
    why = unavailable_reason(choice, device_type, op)
    if why is not None:
        src = "backend= argument" if backend else "DEER_BACKEND environment variable"
        what = f" for {op}" if op else ""
        raise BackendUnavailable(f"deer backend {choice!r} (from the {src}) cannot run{what} on {device_type} "
                                 f"tensors: {why}")
    return choice


def available_backends(device_type: str = "cpu", op: str | None = None) -> list[str]:
    return [b for b in BACKENDS if unavailable_reason(b, device_type, op) is None]


from .per_sample_grad_norm import (  # noqa: E402,F401
    per_sample_grad_norm, per_sample_grad_norm_only, per_sample_grad_norm_reference,
    per_sample_grad_norm_only_reference)
from .clip_reduce_noise import (  # noqa: E402,F401
    FusedUpdate, clip_reduce_noise, clip_reduce_noise_fused, clip_reduce_noise_grouped, clip_reduce_noise_reference,
    clip_reduce_noise_fused_reference,
    philox_normal_reference)
