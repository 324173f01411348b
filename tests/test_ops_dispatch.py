"""Backend dispatch of deer.ops: DEER_BACKEND and backend= override the device's default, an
unavailable backend raises saying why (and what to do), the reference is always available."""
import pytest
import torch

import deer.ops as ops
from deer.ops import BackendUnavailable, available_backends, resolve_backend, unavailable_reason


def test_reference_always_available(monkeypatch):
    monkeypatch.delenv("DEER_BACKEND", raising=False)
    for dev in ("cpu", "cuda"):
        assert unavailable_reason("reference", dev) is None
        assert resolve_backend(torch.device(dev), "reference") == "reference"
        assert "reference" in available_backends(dev)


def test_default_follows_device(monkeypatch):
    monkeypatch.delenv("DEER_BACKEND", raising=False)
    expect = "cpu" if unavailable_reason("cpu", "cpu", "clip_reduce_noise") is None else "reference"
    assert resolve_backend(torch.device("cpu"), op="clip_reduce_noise") == expect


def test_env_overrides_device_and_argument_overrides_env(monkeypatch, gen):
    monkeypatch.setenv("DEER_BACKEND", "reference")
    assert resolve_backend(torch.device("cpu")) == "reference"
    if unavailable_reason("cpu", "cpu") is None:
        assert resolve_backend(torch.device("cpu"), "cpu") == "cpu"
    # The override reaches the ops: a backend that cannot run raises instead of silently falling back.
    monkeypatch.setenv("DEER_BACKEND", "no-such-backend")
    g, clip = torch.randn(2, 3, 4, generator=gen), torch.rand(2, generator=gen)
    with pytest.raises(BackendUnavailable, match="DEER_BACKEND environment variable"):
        ops.clip_reduce_noise(g, clip, 0.0, 1.0)
    out = ops.clip_reduce_noise(g, clip, 0.0, 1.0, backend="reference")
    torch.testing.assert_close(out, torch.einsum("b,bpq->pq", clip, g))


def test_unknown_backend_lists_choices(monkeypatch):
    monkeypatch.delenv("DEER_BACKEND", raising=False)
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'gpu'.*choose one of"):
        resolve_backend(torch.device("cpu"), "gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_backend_on_cpu_tensors_says_why(monkeypatch, gen):
    monkeypatch.delenv("DEER_BACKEND", raising=False)
    L, R = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 5, generator=gen)
    with pytest.raises(BackendUnavailable, match=r"backend= argument.*(CUDA tensors|without CUDA|deer\._C)"):
        ops.per_sample_grad_norm(L, R, 1.0, backend="cuda")


def test_cpu_backend_refuses_cuda_tensors():
    why = unavailable_reason("cpu", "cuda")
    assert why is not None and ("CPU tensors" in why or "deer._C" in why)


def test_triton_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = unavailable_reason("triton", "cpu")
    assert why is not None and ("TRITON_INTERPRET" in why or "not installed" in why)


def test_missing_triton_kernel_names_the_file(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = ops._triton_op_reason("no_such_op")
    assert "deer_kernels/no_such_op.py" in why


def test_missing_extension_names_the_build_command(monkeypatch):
    monkeypatch.setattr(ops._ext, "available", lambda: False)
    why = unavailable_reason("cpu", "cpu")
    assert "setup.sh" in why or "pip install" in why
    monkeypatch.delenv("DEER_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "reference"   # auto falls back to the oracle


def test_auto_never_routes_float64_to_triton(monkeypatch):
    """On a CUDA machine whose deer._C has no CUDA kernels, auto picks Triton for fp32 but the
    reference for float64 (Triton kernels take fp32/bf16/fp16 only)."""
    import torch
    import deer.ops as ops
    avail = {"cuda": "built without CUDA", "triton": None, "reference": None, "cpu": "needs CPU tensors"}
    monkeypatch.setattr(ops, "unavailable_reason", lambda b, dev, op=None: avail[b])
    monkeypatch.delenv("DEER_BACKEND", raising=False)
    for op in ("per_sample_grad_norm", "clip_reduce_noise"):
        assert ops.resolve_backend("cuda", op=op, dtype=torch.float32) == "triton"
        assert ops.resolve_backend("cuda", op=op, dtype=torch.float64) == "reference"
    avail["cuda"] = None   # with deer's CUDA kernels, both dtypes go there
    assert ops.resolve_backend("cuda", op="per_sample_grad_norm", dtype=torch.float64) == "cuda"
